"""End to end: the real server on 127.0.0.1:0, the official `openai` SDK as the
client, and a fake OpenAI-compatible provider (a real HTTP server) upstream.

The SDK is synchronous here and runs in a worker thread, exactly as a user's
program would call us; raw bytes are checked with httpx against our own
checks of the official schemas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import openai
import orjson
import pytest
import trio

from tests.conftest import IO_TIMEOUT_S, StartServer, base_url, make_role, sse_events, upstream_role
from tests.fake_upstream import FakeUpstream, Script
from tests.openai_schema import check_chat_completion, check_chunk, check_error, check_model, check_model_list
from trio_serve.server import Running

T = TypeVar("T")
HELLO = [{"role": "user", "content": "Hello!"}]
UPSTREAM_KEY = "sk-test-upstream"


@pytest.fixture(params=["openai", "anthropic"])
def wire(request: pytest.FixtureRequest) -> str:
    """The provider's wire format: each test taking it runs against both."""
    return str(request.param)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), abandon_on_cancel=True)


def sdk(running: Running, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(running) + "/v1", api_key=api_key, max_retries=0, timeout=IO_TIMEOUT_S)


def collect_stream(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(client.chat.completions.create(model="m", messages=HELLO, stream=True, **kwargs))


async def raw_post(running: Running, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(running), timeout=IO_TIMEOUT_S) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


async def test_echo_answers_the_sdk_plain_and_streamed(start_server: StartServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(make_role(agent="my-agent"))
        client = sdk(running)
        completion = await in_thread(client.chat.completions.create, model="whatever", messages=HELLO)
        assert completion.model == "my-agent"
        assert completion.choices[0].message.content == "You said: Hello!"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        chunks = await in_thread(collect_stream, client)
        assert [c.choices[0].delta.content for c in chunks] == ["", "You", " said:", " Hello!", None]
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_upstream_plain_completion(start_server: StartServer, upstream: FakeUpstream) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        completion = await in_thread(sdk(running).chat.completions.create, model="ignored", messages=HELLO)
        assert completion.choices[0].message.content == "Hello, world"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.total_tokens) == (9, 12)
        sent = upstream.exchanges[-1]
        assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert sent.body["model"] == "gpt-test"
        assert sent.body["messages"] == [{"role": "system", "content": "You are a test agent."}, *HELLO]
        # A whole answer is asked for whole (it carries its usage without stream_options).
        assert sent.body["stream"] is False and "stream_options" not in sent.body
        assert sent.headers["accept"] == "application/json"
        assert sent.headers["user-agent"].startswith("trio_serve/")
        assert (sent.body["temperature"], sent.body["max_tokens"]) == (0.1, 4096)


async def test_stream_relays_every_delta_one_to_one(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    deltas = tuple({"content": f"w{i} "} for i in range(50))
    upstream.script(Script(deltas=deltas), Script(deltas=deltas))
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        chunks = await in_thread(collect_stream, sdk(running), stream_options={"include_usage": True})
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].delta.content for c in chunks[1:51]] == [d["content"] for d in deltas]
        assert chunks[51].choices[0].finish_reason == "stop"
        assert chunks[52].choices == [] and chunks[52].usage is not None
        assert chunks[52].usage.total_tokens == 12
        assert len({(c.id, c.created) for c in chunks}) == 1
        # Without include_usage the client gets no usage chunk.
        response = await raw_post(running, {"messages": HELLO, "stream": True})
        events = sse_events(response.content)
        assert events[-1] == "[DONE]" and len(events) == 1 + 50 + 1 + 1


async def test_every_response_and_chunk_matches_the_official_schemas(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        plain = await raw_post(running, {"messages": HELLO})
        assert upstream.exchanges[-1].path == ("/v1/messages" if wire == "anthropic" else "/v1/chat/completions")
        assert plain.headers["content-type"] == "application/json"
        check_chat_completion(plain.json())
        streamed = await raw_post(
            running, {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert streamed.headers["content-type"] == "text/event-stream"
        assert (streamed.headers["cache-control"], streamed.headers["x-accel-buffering"]) == ("no-cache", "no")
        events = sse_events(streamed.content)
        assert events[-1] == "[DONE]"
        for chunk in events[:-1]:
            check_chunk(chunk)
        check_error((await raw_post(running, {"messages": []})).json())
        async with httpx.AsyncClient(base_url=base_url(running)) as client:
            check_model_list((await client.get("/v1/models")).json())
            check_model((await client.get("/v1/models/test-agent")).json())
            check_error((await client.get("/v1/models/other")).json())
            check_error((await client.get("/nowhere")).json())


async def test_finish_reason_is_what_the_model_said(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    upstream.script(Script(finish_reason="length"), Script(finish_reason="content_filter"))
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        completion = await in_thread(sdk(running).chat.completions.create, model="m", messages=HELLO)
        assert completion.choices[0].finish_reason == "length"
        chunks = await in_thread(collect_stream, sdk(running))
        assert chunks[-1].choices[0].finish_reason == "content_filter"


async def test_tool_calls_are_relayed_and_assembled(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    fragments = (
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
    )  # fmt: skip
    upstream.script(Script(deltas=fragments, finish_reason="tool_calls"))
    upstream.script(Script(deltas=fragments, finish_reason="tool_calls"))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        client = sdk(running)
        completion = await in_thread(client.chat.completions.create, model="m", messages=HELLO, tools=tools)
        sent_tools = upstream.exchanges[-1].body["tools"]
        assert sent_tools == tools if wire == "openai" else sent_tools[0]["name"] == "get_weather"
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert (call.id, call.function.name) == ("call_1", "get_weather")
        # Asked whole, Anthropic answers the input as an object: its JSON text may be spaced differently.
        assert orjson.loads(call.function.arguments) == {"city": "Oslo"}
        chunks = await in_thread(collect_stream, client, tools=tools)
        streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(streamed) == 3  # fragment by fragment, never merged
        assert "".join(t[0].function.arguments or "" for t in streamed) == '{"city": "Oslo"}'


async def test_client_sampling_is_honoured_within_the_role_bounds(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, max_tokens=100), provider_key=UPSTREAM_KEY)
        await in_thread(
            sdk(running).chat.completions.create,
            model="m", messages=HELLO, max_tokens=5000, temperature=0.7, top_p=0.5, stop=["END"], seed=4,
        )  # fmt: skip
        body = upstream.exchanges[-1].body
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
            100, 0.7, 0.5, ["END"], 4)  # fmt: skip


async def test_bearer_key_is_required_on_v1_but_not_on_health(start_server: StartServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(make_role(), api_key="right-key")
        with pytest.raises(openai.AuthenticationError) as info:
            await in_thread(sdk(running, "wrong-key").chat.completions.create, model="m", messages=HELLO)
        assert info.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await in_thread(sdk(running, "wrong-key").models.list)
        completion = await in_thread(sdk(running, "right-key").chat.completions.create, model="m", messages=HELLO)
        assert completion.choices[0].message.content == "You said: Hello!"
        async with httpx.AsyncClient(base_url=base_url(running)) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            missing = await client.get("/v1/models")
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            check_error(missing.json())
            assert missing.json()["error"]["type"] == "authentication_error"
            non_ascii = await client.get("/v1/models", headers={"authorization": "Bearer ключ".encode()})
            assert non_ascii.status_code == 401


async def test_models_endpoints_through_the_sdk(start_server: StartServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(make_role(agent="my-agent"), created=1700000000)
        client = sdk(running)
        models = await in_thread(client.models.list)
        assert [(m.id, m.owned_by, m.created) for m in models.data] == [("my-agent", "initrunner", 1700000000)]
        assert (await in_thread(client.models.retrieve, "my-agent")).id == "my-agent"
        with pytest.raises(openai.NotFoundError):
            await in_thread(client.models.retrieve, "gpt-4")


async def test_provider_failure_is_a_502_envelope(start_server: StartServer, upstream: FakeUpstream, wire: str) -> None:
    upstream.script(*[Script(status=500)] * 6)  # each request: the first try and two retries
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        with pytest.raises(openai.APIStatusError) as info:
            await in_thread(sdk(running).chat.completions.create, model="m", messages=HELLO)
        assert info.value.status_code == 502
        assert len(upstream.exchanges) == 3
        # Streamed too: the failure comes before the stream starts, so it is an HTTP error.
        response = await raw_post(running, {"messages": HELLO, "stream": True})
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "upstream_error"


async def test_wrong_provider_key_never_leaks_into_the_answer(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key="sk-wrong-secret")
        with pytest.raises(openai.APIStatusError) as info:
            await in_thread(sdk(running).chat.completions.create, model="m", messages=HELLO)
        assert info.value.status_code == 502
        assert "credentials" in info.value.message
        assert "sk-wrong-secret" not in str(info.value.body)


async def test_provider_rate_limit_is_a_429_for_the_sdk(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    upstream.script(*[Script(status=429, error={"message": "Rate limit reached"})] * 3)
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        with pytest.raises(openai.RateLimitError) as info:
            await in_thread(sdk(running).chat.completions.create, model="m", messages=HELLO)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.code is None and "Rate limit reached" in info.value.message
        assert len(upstream.exchanges) == 3  # tried, then retried twice


async def test_stream_broken_mid_way_ends_with_an_error_event_and_done(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    upstream.script(Script(finish_reason=None))  # truncated: no finish, no [DONE]
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        response = await raw_post(running, {"messages": HELLO, "stream": True})
        assert response.status_code == 200
        events = sse_events(response.content)
        assert [e["choices"][0]["delta"].get("content") for e in events[1:4]] == ["Hello", ",", " world"]
        assert events[-2]["error"]["type"] == "upstream_error"
        assert events[-1] == "[DONE]"


async def test_many_concurrent_streams_all_complete(start_server: StartServer, upstream: FakeUpstream) -> None:
    upstream.default = Script(deltas=tuple({"content": f"{i}"} for i in range(20)), delta_delay_s=0.001)
    results: list[int] = []
    with trio.fail_after(IO_TIMEOUT_S * 3):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)

        async def one() -> None:
            response = await raw_post(running, {"messages": HELLO, "stream": True})
            results.append(len(sse_events(response.content)))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    assert results == [1 + 20 + 1 + 1] * 50


async def test_provider_reset_mid_stream_ends_with_an_error_event_and_done(
    start_server: StartServer, upstream: FakeUpstream, wire: str
) -> None:
    upstream.script(Script(reset_after=2))
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        response = await raw_post(running, {"messages": HELLO, "stream": True})
        events = sse_events(response.content)
        assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", ","]
        assert events[-2]["error"]["type"] == "upstream_error"
        assert "broke off" in events[-2]["error"]["message"]
        assert events[-1] == "[DONE]"


async def test_multimodal_parts_reach_an_openai_provider_unchanged(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        response = await raw_post(running, {"messages": [{"role": "user", "content": content}]})
        assert response.status_code == 200
        assert upstream.exchanges[-1].body["messages"][1] == {"role": "user", "content": content}
