"""The OpenAI format without IO: request validation, mapping, chunks, envelopes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import make_role, sse_events
from tests.openai_schema import check_chat_completion, check_chunk, check_error
from trio_serve.errors import InvalidRequest, NotFound
from trio_serve.openai import (
    SSE_DONE,
    ChatRequest,
    ChunkEncoder,
    MessageAssembler,
    completion_body,
    error_body,
    model_call,
    relayed_delta,
    sse_error,
    text_of,
)
from trio_serve.providers.base import Usage

USER = {"role": "user", "content": "Hi"}


def parse(**fields: Any) -> ChatRequest:
    return ChatRequest.from_json(orjson.dumps({"messages": [USER], **fields}))


def test_minimal_request_has_openai_defaults() -> None:
    chat = parse()
    assert chat.messages == (USER,)
    assert (chat.stream, chat.include_usage, chat.model) == (False, False, "")
    assert (chat.temperature, chat.max_tokens, chat.stop) == (None, None, None)


def test_full_request_is_read() -> None:
    chat = parse(
        model="x", stream=True, stream_options={"include_usage": True}, temperature=0.5, top_p=0.9,
        max_completion_tokens=50, stop="END", seed=7, tools=[{"type": "function"}],
        tool_choice="auto", response_format={"type": "json_object"}, unknown_field=1,
    )  # fmt: skip
    assert (chat.stream, chat.include_usage, chat.temperature, chat.top_p) == (True, True, 0.5, 0.9)
    assert (chat.max_tokens, chat.stop, chat.seed, chat.tool_choice) == (50, ("END",), 7, "auto")
    assert chat.tools == ({"type": "function"},)
    assert chat.response_format == {"type": "json_object"}


def test_message_shapes_that_openai_accepts() -> None:
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "system", "content": [{"type": "text", "text": "Also polite."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]  # fmt: skip
    chat = ChatRequest.from_json(orjson.dumps({"messages": messages}))
    assert [m["role"] for m in chat.messages] == ["developer", "system", "user", "assistant", "tool"]


BAD_REQUESTS: list[tuple[bytes, str | None, str]] = [
    (b"{not json", None, "could not parse the JSON body"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'"\xff"', None, "could not parse"),
    (b"{}", "messages", "'messages' must be a non-empty array"),
    (b'{"messages": []}', "messages", "non-empty"),
    (b'{"messages": "hi"}', "messages", "non-empty array"),
    (b'{"messages": [1]}', "messages[0]", "must be an object"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "must be one of"),
    (b'{"messages": [{"role": "user"}]}', "messages[0].content", "string or an array"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", "string or an array"),
    (b'{"messages": [{"role": "user", "content": [{"type": "video"}]}]}', "messages[0].content[0]", "'type'"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages[0].content[0].text", "string"),
    (b'{"messages": [{"role": "system", "content": "x"}]}', "messages", "at least one user message"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]}',
     "messages[1].tool_call_id", "must be a string"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "must be a boolean"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 3}', "temperature", "between 0 and 2"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": true}', "temperature", "a number"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 2}', "top_p", "between 0 and 1"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens", "at least 1"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', "max_tokens", "an integer"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop", "array of strings"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop", "at most 4"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": "7"}', "seed", "an integer"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": 5}', "model", "a string"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}',
     "stream_options", "only allowed when 'stream' is true"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"include_usage": 1}}',
     "stream_options.include_usage", "a boolean"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": 3}', "tool_choice", "string or an object"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param", "message"), BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_param(body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        ChatRequest.from_json(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert message in info.value.message


def test_model_call_puts_the_role_prompt_first_and_keeps_client_system_text_in_place() -> None:
    chat = ChatRequest.from_json(
        orjson.dumps({"messages": [{"role": "developer", "content": "D"}, USER, {"role": "system", "content": "S"}]})
    )
    call = model_call(make_role(), chat)
    assert call.messages == (
        {"role": "system", "content": "You are a test agent."},
        {"role": "system", "content": "D"},
        USER,
        {"role": "system", "content": "S"},
    )


def test_model_call_uses_role_defaults_and_caps_client_max_tokens() -> None:
    role = make_role(temperature=0.2, max_tokens=100, stop=("X",))
    defaults = model_call(role, parse())
    assert (defaults.temperature, defaults.max_tokens, defaults.stop, defaults.top_p) == (0.2, 100, ("X",), None)
    chosen = model_call(role, parse(temperature=1.5, max_tokens=5000, stop=["Y"], top_p=0.5, seed=3))
    assert (chosen.temperature, chosen.max_tokens, chosen.stop, chosen.top_p, chosen.seed) == (1.5, 100, ("Y",), 0.5, 3)
    assert model_call(role, parse(max_tokens=10)).max_tokens == 10


def test_stream_chunks_match_the_schema_and_share_id_and_created() -> None:
    encoder = ChunkEncoder(completion_id="chatcmpl-1", created=1700000000, model="my-agent")
    body = b"".join(
        [
            encoder.role(),
            encoder.delta({"content": "Hel"}),
            encoder.delta({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                           "function": {"name": "f", "arguments": ""}}]}),
            encoder.finish("stop"),
            encoder.usage(Usage(prompt_tokens=3, completion_tokens=2)),
            SSE_DONE,
        ]
    )  # fmt: skip
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        check_chunk(chunk)
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {("chatcmpl-1", 1700000000, "my-agent")}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0] == {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    assert chunks[3]["choices"][0]["delta"] == {} and chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}  # fmt: skip


def test_completion_body_matches_the_schema() -> None:
    body = completion_body(
        completion_id="chatcmpl-1", created=1, model="m",
        message={"role": "assistant", "content": "Hi", "refusal": None}, finish_reason="length",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
    )  # fmt: skip
    completion = orjson.loads(body)
    check_chat_completion(completion)
    assert completion["choices"][0]["finish_reason"] == "length"


def test_error_envelope_always_has_four_keys() -> None:
    check_error(orjson.loads(error_body(InvalidRequest("bad", param="messages"))))
    envelope = orjson.loads(error_body(NotFound("nope")))
    assert envelope == {"error": {"message": "nope", "type": "not_found_error", "param": None, "code": None}}


def test_in_band_stream_error_is_an_error_event_then_done() -> None:
    events = sse_events(sse_error(InvalidRequest("broke")))
    check_error(events[0])
    assert events[1] == "[DONE]"


@pytest.mark.parametrize(
    ("upstream", "relayed"),
    [
        ({"role": "assistant", "content": ""}, {}),
        ({"content": ""}, {}),
        ({"content": "x", "role": "assistant"}, {"content": "x"}),
        ({"content": None, "tool_calls": [{"index": 0}]}, {"tool_calls": [{"index": 0}]}),
        ({"reasoning_content": "hmm"}, {}),
        ({"refusal": "no"}, {"refusal": "no"}),
    ],
)
def test_relayed_delta_keeps_only_schema_fields(upstream: dict[str, Any], relayed: dict[str, Any]) -> None:
    assert relayed_delta(upstream) == relayed


def test_assembler_joins_text_and_tool_call_fragments() -> None:
    assembler = MessageAssembler()
    for delta in [
        {"content": "Let me"},
        {"content": " check."},
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "put", "arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
    ]:
        assembler.add(delta)
    assert assembler.message() == {
        "role": "assistant",
        "content": "Let me check.",
        "refusal": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "put", "arguments": "{}"}},
        ],
    }


def test_assembler_tool_calls_only_has_null_content() -> None:
    assembler = MessageAssembler()
    assembler.add({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]})
    assert assembler.message()["content"] is None


def test_text_of_reads_every_content_shape() -> None:
    assert text_of({"content": "a"}) == "a"
    assert (
        text_of({"content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]})
        == "a b"
    )
    assert text_of({"content": None}) == ""
