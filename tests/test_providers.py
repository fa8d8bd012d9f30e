"""Provider translation, retries and error mapping, against httpx.MockTransport.

No sockets here: each test scripts the provider's HTTP answers in memory, so
retry back-off runs under the mock clock and every byte sent is inspectable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from trio_serve.config import ModelConfig
from trio_serve.errors import ApiError, InvalidRequest, RateLimited, UpstreamError
from trio_serve.providers.anthropic import Anthropic, anthropic_request
from trio_serve.providers.base import Delta, Event, Finish, ModelCall, Provider, Usage
from trio_serve.providers.openai_compat import OpenAICompatible
from trio_serve.providers.upstream import RetryPolicy, Upstream, status_error
from trio_serve.redact import redact

SECRET = "sk-provider-secret-123456"
Handler = Callable[[httpx.Request], httpx.Response]


def sse(*payloads: Any, event_names: bool = False) -> bytes:
    frames = []
    for payload in payloads:
        data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
        name = f"event: {payload['type']}\n" if event_names and isinstance(payload, dict) else ""
        frames.append(f"{name}data: {data}\n\n")
    return "".join(frames).encode()


def answer(body: bytes, status: int = 200, content_type: str = "text/event-stream", **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": content_type, **headers}, content=body)


class Recorder:
    """A MockTransport handler answering from a script and keeping each request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers: Iterator[httpx.Response | Exception] = iter(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        result = next(self.answers)
        if isinstance(result, Exception):
            raise result
        return result

    def body(self, index: int = -1) -> Any:
        return orjson.loads(self.requests[index].content)


def provider_for(wire: str, recorder: Recorder, **model: Any) -> Provider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    upstream = Upstream(client=client, provider=wire, secrets=(SECRET,), retry=RetryPolicy())
    config = ModelConfig(provider=wire, name="model-x", **model)
    cls = Anthropic if wire == "anthropic" else OpenAICompatible
    return cls(upstream=upstream, base_url="https://provider.test", api_key=SECRET, model=config)


def call(**fields: Any) -> ModelCall:
    defaults: dict[str, Any] = {
        "messages": ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}),
        "temperature": 0.5,
        "max_tokens": 100,
    }
    return ModelCall(**{**defaults, **fields})


async def collect(provider: Provider, model_call: ModelCall | None = None) -> list[Event]:
    async with provider.stream(model_call or call()) as batches:
        return [event async for batch in batches for event in batch]


# -- OpenAI-compatible -----------------------------------------------------------

OPENAI_FRAMES = (
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    "[DONE]",
)
OPENAI_STREAM = sse(*OPENAI_FRAMES)


async def test_openai_request_carries_the_call_and_the_role_extras() -> None:
    recorder = Recorder(answer(OPENAI_STREAM))
    provider = provider_for("openai", recorder, extra_headers={"X-Team": "a"}, extra_body={"user": "u1"})
    tools = ({"type": "function", "function": {"name": "f"}},)
    await collect(
        provider,
        call(top_p=0.9, stop=("END",), seed=3, tools=tools, tool_choice="auto", response_format={"type": "text"}),
    )
    request = recorder.requests[0]
    assert str(request.url) == "https://provider.test/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["x-team"] == "a"
    assert recorder.body() == {
        "model": "model-x",
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "max_tokens": 100,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 3,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "user": "u1",
    }


async def test_openai_stream_becomes_one_event_per_delta() -> None:
    events = await collect(provider_for("openai", Recorder(answer(OPENAI_STREAM))))
    assert events == [Delta({"content": "Hel"}), Delta({"content": "lo"}), Finish("stop"), Usage(4, 2)]


async def test_openai_whole_json_answer_is_read_as_one_message() -> None:
    completion = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }  # fmt: skip
    recorder = Recorder(answer(orjson.dumps(completion), content_type="application/json"))
    events = await collect(provider_for("openai", recorder))
    assert events == [
        Delta(
            {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
        ),
        Finish("tool_calls"),
        Usage(5, 1),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (sse(*OPENAI_FRAMES[:3]), "ended before the answer"),  # truncated after two deltas
        (b"data: {not json\n\n", "malformed JSON"),
        (sse({"error": {"message": f"overloaded, key {SECRET}"}}), "reported an error: overloaded, key [redacted]"),
    ],
)
async def test_openai_broken_streams_are_upstream_errors(body: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        await collect(provider_for("openai", Recorder(answer(body))))


async def test_openai_stream_without_done_is_complete_when_the_model_finished() -> None:
    events = await collect(provider_for("openai", Recorder(answer(OPENAI_STREAM.replace(b"data: [DONE]\n\n", b"")))))
    assert events[-2:] == [Finish("stop"), Usage(4, 2)]


# -- Anthropic ---------------------------------------------------------------------


def test_anthropic_request_translation() -> None:
    messages = (
        {"role": "system", "content": "Role prompt."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]},
        {"role": "system", "content": "Client system text."},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "cat"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "dog"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        {"role": "tool", "tool_call_id": "call_2", "content": "a dog"},
    )  # fmt: skip
    tools = ({"type": "function", "function": {"name": "lookup", "description": "Look up.", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}},)  # fmt: skip
    body = anthropic_request(
        call(messages=messages, temperature=1.7, stop=("END",), top_p=0.8, tools=tools, tool_choice="required"),
        ModelConfig(provider="anthropic", name="claude-x"),
    )
    assert body == {
        "model": "claude-x",
        "max_tokens": 100,
        "stream": True,
        "temperature": 1.0,
        "top_p": 0.8,
        "stop_sequences": ["END"],
        "system": "Role prompt.\n\nClient system text.",
        "tools": [{"name": "lookup", "description": "Look up.",
                   "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "cat"}},
                {"type": "tool_use", "id": "call_2", "name": "lookup", "input": {"q": "dog"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "a dog"},
            ]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
     ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"})],
)  # fmt: skip
def test_anthropic_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    tools = ({"type": "function", "function": {"name": "f"}},)
    body = anthropic_request(call(tools=tools, tool_choice=choice), ModelConfig(provider="anthropic", name="c"))
    assert body["tool_choice"] == expected


def test_anthropic_refuses_parts_it_cannot_take() -> None:
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]}
    with pytest.raises(InvalidRequest, match="input_audio"):
        anthropic_request(call(messages=(audio,)), ModelConfig(provider="anthropic", name="c"))


ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
     "model": "claude-x", "stop_reason": None, "usage": {"input_tokens": 20, "cache_read_input_tokens": 5,
                                                         "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " now."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1,
     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"q": '}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"cat"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
    event_names=True,
)  # fmt: skip


async def test_anthropic_stream_becomes_openai_shaped_events() -> None:
    recorder = Recorder(answer(ANTHROPIC_STREAM))
    events = await collect(provider_for("anthropic", recorder))
    request = recorder.requests[0]
    assert str(request.url) == "https://provider.test/v1/messages"
    assert (request.headers["x-api-key"], request.headers["anthropic-version"]) == (SECRET, "2023-06-01")
    assert "authorization" not in request.headers
    assert recorder.body()["system"] == "Be kind."
    assert events == [
        Delta({"content": "Checking"}),
        Delta({"content": " now."}),
        Delta({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                               "function": {"name": "lookup", "arguments": ""}}]}),
        Delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
        Delta({"tool_calls": [{"index": 0, "function": {"arguments": '"cat"}'}}]}),
        Finish("tool_calls"),
        Usage(25, 15),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter")],
)  # fmt: skip
async def test_anthropic_stop_reasons_map_to_openai_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    message = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hi"}],
               "stop_reason": stop_reason, "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
    recorder = Recorder(answer(orjson.dumps(message), content_type="application/json"))
    assert await collect(provider_for("anthropic", recorder)) == [
        Delta({"content": "Hi"}), Finish(finish_reason), Usage(3, 1)]  # fmt: skip


async def test_anthropic_whole_message_with_tool_use() -> None:
    message = {"type": "message", "role": "assistant", "stop_reason": "tool_use",
               "content": [{"type": "text", "text": "On it."},
                           {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"a": 1}}],
               "usage": {"input_tokens": 7, "output_tokens": 4}}  # fmt: skip
    recorder = Recorder(answer(orjson.dumps(message), content_type="application/json"))
    events = await collect(provider_for("anthropic", recorder))
    call = {"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    assert events[0] == Delta({"content": "On it.", "tool_calls": [call]})
    assert events[1:] == [Finish("tool_calls"), Usage(7, 4)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (ANTHROPIC_STREAM.split(b"event: message_delta")[0], "ended before the answer"),
        (sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
         "reported an error: Overloaded"),
    ],
)  # fmt: skip
async def test_anthropic_broken_streams_are_upstream_errors(body: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        await collect(provider_for("anthropic", Recorder(answer(body))))


# -- retries and error mapping -------------------------------------------------------


def failure(status: int, message: str = "nope", **headers: str) -> httpx.Response:
    return answer(orjson.dumps({"error": {"message": message}}), status, "application/json", **headers)


async def test_retryable_failures_are_retried_then_succeed(autojump_clock: trio.testing.MockClock) -> None:
    refused = httpx.ConnectError("connection refused")
    recorder = Recorder(failure(503), refused, answer(OPENAI_STREAM))
    events = await collect(provider_for("openai", recorder))
    assert len(recorder.requests) == 3
    assert events[-1] == Usage(4, 2)


async def test_retries_stop_after_two(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder(failure(502), failure(500), failure(503, "still down"))
    with pytest.raises(UpstreamError, match=r"HTTP 503\): still down"):
        await collect(provider_for("openai", recorder))
    assert len(recorder.requests) == 3


async def test_retry_after_is_honoured_and_capped(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder(failure(429, **{"retry-after": "3"}), failure(429, **{"retry-after": "120"}),
                        answer(OPENAI_STREAM))  # fmt: skip
    start = trio.current_time()
    await collect(provider_for("openai", recorder))
    assert trio.current_time() - start == pytest.approx(3 + RetryPolicy().retry_after_cap_s)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_failures_are_not_retried(status: int) -> None:
    recorder = Recorder(failure(status))
    with pytest.raises(ApiError):
        await collect(provider_for("openai", recorder))
    assert len(recorder.requests) == 1


async def test_rate_limit_after_retries_is_a_429_with_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    recorder = Recorder(*[failure(429, "slow down", **{"retry-after": "7"})] * 3)
    with pytest.raises(RateLimited) as info:
        await collect(provider_for("openai", recorder))
    assert info.value.headers == (("retry-after", "7"),)


@pytest.mark.parametrize(
    ("status", "body", "kind", "code", "fragment"),
    [
        (429, b'{"error": {"message": "Rate limit reached"}}', RateLimited, None, "Rate limit reached"),
        (401, f'{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}'.encode(), UpstreamError, None,
         "refused this server's credentials (HTTP 401); check the openai API key"),
        (403, b"forbidden", UpstreamError, None, "HTTP 403"),
        (400, b'{"error": {"message": "This model\'s maximum context length is 8192 tokens", '
              b'"code": "context_length_exceeded"}}', InvalidRequest, "context_length_exceeded", "maximum context"),
        (400, b'{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}',
         InvalidRequest, "context_length_exceeded", "prompt is too long"),
        (400, b'{"error": {"message": "Invalid value for temperature"}}', InvalidRequest, None, "Invalid value"),
        (422, b'{"detail": "bad field"}', InvalidRequest, None, "bad field"),
        (404, b'{"error": {"message": "The model does not exist"}}', UpstreamError, None, "HTTP 404"),
        (500, b"<html>oops</html>", UpstreamError, None, "HTTP 500): <html>oops</html>"),
        (503, f'{{"message": "down, Bearer {SECRET}"}}'.encode(), UpstreamError, None, "down, Bearer [redacted]"),
    ],
)  # fmt: skip
def test_status_errors_are_mapped_honestly(
    status: int, body: bytes, kind: type[ApiError], code: str | None, fragment: str
) -> None:
    error = status_error("openai", status, body, None, (SECRET,))
    assert type(error) is kind
    assert error.code == code
    assert fragment in error.message
    assert SECRET not in error.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key {SECRET} leaked", "key [redacted] leaked"),
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer [redacted]"),
        ("sk-ant-api03-AAAAAAAAAAAA and gsk_BBBBBBBBBBBB", "sk-[redacted] and gsk_[redacted]"),
        ("nothing secret here, sk-1", "nothing secret here, sk-1"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text, (SECRET,)) == expected
