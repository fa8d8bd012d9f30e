"""Fuzzing: arbitrary bytes at the HTTP layer, arbitrary JSON at the chat endpoint.

Every input must be answered (a response or a quiet close), never with a 500
or an unhandled exception, and the server must answer the next connection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import IO_TIMEOUT_S, make_role
from tests.openai_schema import check_chat_completion, check_chunk, check_error
from trio_serve.app import App
from trio_serve.http import Request
from trio_serve.providers.echo import EchoProvider
from trio_serve.server import HttpServer

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_BODY = 4096
STATUS_RE = re.compile(rb"^HTTP/1\.1 (\d{3}) ")

# -- arbitrary bytes at the HTTP layer --------------------------------------------------

METHODS = st.sampled_from([b"GET", b"POST", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"G\x00T", b""])
TARGETS = st.sampled_from([b"/health", b"/v1/models", b"/v1/models/test-agent", b"/v1/chat/completions", b"*", b""])
HEADER_NAMES = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Authorization", b"Expect",
     b"Connection", b"X-Conversation-Id", b"X-Request-Id", b"Origin", b"X-Forwarded-For", b"Bad Name"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from([b"localhost", b"application/json", b"chunked", b"100-continue", b"close", b"12", b"-1", b""]),
    st.binary(max_size=40),
)
JSON_BODIES = st.sampled_from(
    [b'{"messages":[{"role":"user","content":"hi"}]}', b'{"stream":true,"messages":[{"role":"user","content":"x"}]}',
     b"{}", b"[", b"5\r\nhello\r\n0\r\n\r\n", b""]
)  # fmt: skip


@st.composite
def http_like(draw: st.DrawFn) -> bytes:
    """Requests that are nearly right: the shapes a parser's corner cases hide in."""
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x"]))
    line = draw(METHODS) + b" " + draw(TARGETS) + b" " + version
    body = draw(JSON_BODIES)
    headers = [(b"Host", b"localhost")] if draw(st.integers(0, 9)) else []
    if draw(st.booleans()):
        headers += [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())]
    headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    head = line + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    return (head + body) * draw(st.integers(1, 3))  # pipelined repeats


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_log() -> Iterator[_ErrorLog]:
    """Errors the server logs: its net for unexpected exceptions logs each one."""
    handler = _ErrorLog()
    logger = logging.getLogger("trio_serve")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def make_server() -> HttpServer:
    role = make_role(max_body=MAX_BODY)
    app = App(role=role, provider=EchoProvider(), api_key=None, created=1)
    return HttpServer(app, max_body_bytes=MAX_BODY, grace_s=1.0, on_refused=app.refused)


async def exchange(server: HttpServer, data: bytes) -> bytes:
    """Send `data` on a fresh connection, close our side, and read all the server says."""
    client, server_side = trio.testing.memory_stream_pair()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side)
        await client.send_all(data)
        await client.send_eof()
        while chunk := await client.receive_some(65536):
            received += chunk
    return received


@FUZZ
@given(data=st.one_of(http_like(), http_like(), st.binary(max_size=2048)))
async def test_any_bytes_get_an_answer_or_a_close_never_a_500(data: bytes, error_log: _ErrorLog) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        server = make_server()
        received = await exchange(server, data)
        match = STATUS_RE.match(received)
        assert received == b"" or match, received[:200]
        event(f"status {match.group(1).decode() if match else 'none (closed)'}")  # --hypothesis-show-statistics
        if match:
            assert int(match.group(1)) < 500, received[:400]
        assert b"Internal server error" not in received
        assert not error_log.records, error_log.records[0].getMessage()
        # The server goes on: the next connection is served.
        after = await exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert after.startswith(b"HTTP/1.1 200 ")


# -- arbitrary JSON at the chat endpoint ------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "nobody"])},
    optional={
        "content": st.one_of(
            st.text(max_size=30),
            st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": JSON_VALUES})),
            JSON_VALUES,
        ),
        "name": JSON_VALUES,
        "tool_calls": JSON_VALUES,
        "tool_call_id": JSON_VALUES,
    },
)
CHAT_FIELDS = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON_VALUES)},
    optional={
        key: JSON_VALUES | st.sampled_from([True, False, 0, 1, 0.5, 3, "auto", "none", [], {}])
        for key in (
            "model",
            "stream",
            "stream_options",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "stop",
            "seed",
            "tools",
            "tool_choice",
            "response_format",
            "n",
        )
    },  # fmt: skip
)


async def answer(app: App, body: bytes) -> tuple[int, bytes]:
    request = Request(
        method="POST",
        path="/v1/chat/completions",
        query="",
        headers={"content-type": "application/json", "host": "localhost"},
        body=body,
        request_id="req_fuzz",
    )
    response = await app(request)
    if response.produce is None:
        return response.status, response.body
    chunks: list[bytes] = []

    async def send(chunk: bytes) -> None:
        chunks.append(chunk)

    await response.produce(send)
    return response.status, b"".join(chunks)


VALID_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text()}), min_size=1)},
    optional={
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 10_000),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
        "seed": st.integers(-(2**63), 2**63 - 1),
    },
)


@FUZZ
@given(fields=st.one_of(VALID_CHAT, CHAT_FIELDS, JSON_VALUES))
async def test_any_json_gets_200_or_a_400_naming_the_field(fields: Any) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        app = App(role=make_role(), provider=EchoProvider(), api_key=None, created=1)
        try:
            status, body = await answer(app, orjson.dumps(fields))
        except Exception as exc:  # noqa: BLE001 - any escape is the failure being looked for
            pytest.fail(f"unhandled {type(exc).__name__}: {exc}")
        event(f"status {status}")
        assert status in (200, 400), body[:300]
        if status == 400:
            check_error(orjson.loads(body))
            error = orjson.loads(body)["error"]
            if isinstance(fields, dict) and error["message"] != "The request body must be a JSON object.":
                assert error["param"], error  # the client is told which field is wrong
        elif body.startswith(b"data: "):
            frames = [f.removeprefix(b"data: ") for f in body.split(b"\n\n") if f.startswith(b"data: {")]
            for frame in frames:
                check_chunk(orjson.loads(frame))
        else:
            check_chat_completion(orjson.loads(body))
