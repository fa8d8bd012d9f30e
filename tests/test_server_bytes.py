"""The connection loop, byte by byte, over in-memory streams with a real h11 client.

Covers what a socket peer can do: malformed, oversized and pipelined requests,
slow clients, disconnecting mid-stream, and graceful shutdown with live streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import IO_TIMEOUT_S, make_role, sse_events
from tests.openai_schema import check_chunk, check_error
from trio_serve.app import App
from trio_serve.config import Guardrails, Role, ServerLimits
from trio_serve.http import MAX_HEAD_BYTES, MAX_HEADER_COUNT, MAX_TARGET_BYTES, Request, Response
from trio_serve.providers.base import Batch, Delta, ModelCall, Provider
from trio_serve.providers.echo import EchoProvider
from trio_serve.server import HEAD_TIMEOUT_S, KEEPALIVE_IDLE_S, SEND_TIMEOUT_S, HttpServer

CHAT = b'{"messages": [{"role": "user", "content": "hi there"}]}'
STREAM_CHAT = b'{"stream": true, "messages": [{"role": "user", "content": "hi there"}]}'


class EndlessProvider:
    """Streams a token every `gap_s` until closed, and records when that happens."""

    def __init__(self, gap_s: float = 0.01, first_token_after_s: float = 0.0) -> None:
        self.gap_s = gap_s
        self.first_token_after_s = first_token_after_s
        self.opened = trio.Event()
        self.closed = trio.Event()

    @asynccontextmanager
    async def stream(self, call: ModelCall) -> AsyncIterator[AsyncIterator[Batch]]:
        self.opened.set()
        try:
            await trio.sleep(self.first_token_after_s)  # like a provider slow to answer at all
            yield self._events()
        finally:
            self.closed.set()

    async def _events(self) -> AsyncIterator[Batch]:
        count = 0
        while True:
            yield [Delta({"content": f" t{count}"})]
            count += 1
            await trio.sleep(self.gap_s)


def make_server(
    provider: Provider | None = None, *, max_body: int = 1000, app: Any = None, role: Role | None = None
) -> HttpServer:
    role = role or make_role(max_body=max_body)
    app = app or App(role=role, provider=provider or EchoProvider(), api_key=None, created=1)
    return HttpServer(app, max_body_bytes=max_body, grace_s=5.0)


class Client:
    """One connection to the server under test, spoken to with h11's client side."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, *events: Any) -> None:
        for event in events:
            await self.stream.send_all(self.h11.send(event) or b"")

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        base = [("host", "test"), ("content-type", "application/json"), ("content-length", str(len(body)))]
        await self.send(h11.Request(method=method, target=target, headers=base + list(headers)))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        return head, body

    def next_cycle(self) -> None:
        self.h11.start_next_cycle()


async def connect(nursery: trio.Nursery, server: HttpServer) -> Client:
    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_side)
    return Client(client_side)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def parse_raw(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode() == name:
            return value.decode()
    return None


async def test_keep_alive_serves_requests_one_after_another(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server())
        for _ in range(3):
            await client.request("POST", "/v1/chat/completions", CHAT)
            response, body = await client.response()
            assert response.status_code == 200
            assert orjson.loads(body)["choices"][0]["message"]["content"] == "You said: hi there"
            client.next_cycle()


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server())
        await client.stream.send_all(
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        statuses = []
        for _ in range(3):
            client.h11.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
            client.h11.send(h11.EndOfMessage())
            response, _ = await client.response()
            statuses.append(response.status_code)
            client.next_cycle()
        assert statuses == [200, 200, 404]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"THIS IS NOT HTTP\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo-Colon-Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * MAX_TARGET_BYTES + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * MAX_HEADER_COUNT + b"\r\n", 431),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         + (b"100\r\n" + b"a" * 256 + b"\r\n") * 4, 413),
    ],
)  # fmt: skip
async def test_refused_requests_get_an_envelope_and_the_connection_closes(
    nursery: trio.Nursery, raw: bytes, status: int
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server())
        await client.stream.send_all(raw)
        code, headers, body = parse_raw(await read_until_closed(client.stream))
        assert code == status
        assert headers["connection"] == "close"
        assert headers["x-request-id"].startswith("req_")
        check_error(orjson.loads(body))


async def test_expect_100_continue_is_honoured(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server())
        await client.send(
            h11.Request(
                method="POST",
                target="/v1/chat/completions",
                headers=[
                    ("host", "t"),
                    ("content-type", "application/json"),
                    ("content-length", str(len(CHAT))),
                    ("expect", "100-continue"),
                ],
            )  # fmt: skip
        )
        informational = await client.next_event()
        assert isinstance(informational, h11.InformationalResponse) and informational.status_code == 100
        await client.send(h11.Data(data=CHAT), h11.EndOfMessage())
        response, _ = await client.response()
        assert response.status_code == 200


async def test_head_request_has_length_but_no_body(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server())
        await client.request("HEAD", "/health")
        response, body = await client.response()
        assert (response.status_code, body, header(response, "content-length")) == (200, b"", "15")


async def test_client_gone_mid_stream_closes_the_provider_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The model is silent for an hour after its first token: only watching the
    # socket, not the next failed send, can notice the client leaving in time.
    provider = EndlessProvider(gap_s=3600)
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server(provider))
        await client.request("POST", "/v1/chat/completions", STREAM_CHAT)
        head = await client.next_event()
        assert isinstance(head, h11.Response) and head.status_code == 200
        for _ in range(2):  # the role chunk and the first token
            assert isinstance(await client.next_event(), h11.Data)
        assert not provider.closed.is_set()
        left_at = trio.current_time()
        await client.stream.aclose()
        await provider.closed.wait()
        assert trio.current_time() - left_at < 0.001


async def test_client_gone_before_a_whole_answer_closes_the_provider(nursery: trio.Nursery) -> None:
    provider = EndlessProvider()  # never finishes: only the disconnect can end it
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, make_server(provider))
        await client.request("POST", "/v1/chat/completions", CHAT)
        await provider.opened.wait()
        await client.stream.aclose()
        await provider.closed.wait()


async def test_slow_header_client_gets_408_after_the_head_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(HEAD_TIMEOUT_S * 2):
        client = await connect(nursery, make_server())
        start = trio.current_time()
        await client.stream.send_all(b"GET /health HTTP/1.1\r\nHo")
        code, headers, body = parse_raw(await read_until_closed(client.stream))
        assert code == 408 and headers["connection"] == "close"
        assert orjson.loads(body)["error"]["type"] == "timeout"
        assert trio.current_time() - start == pytest.approx(HEAD_TIMEOUT_S)


async def test_slowloris_dripping_bytes_still_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(HEAD_TIMEOUT_S * 2):
        client = await connect(nursery, make_server())
        start = trio.current_time()
        received = b""
        for byte in b"GET /health HTTP/1.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                await client.stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            with trio.move_on_after(1):  # virtual time: one byte a second
                received += await client.stream.receive_some(65536)
            if received:
                break
        received += await read_until_closed(client.stream)
        assert parse_raw(received)[0] == 408
        assert trio.current_time() - start <= HEAD_TIMEOUT_S + 1


async def test_idle_keep_alive_connection_is_closed_quietly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(KEEPALIVE_IDLE_S * 2):
        client = await connect(nursery, make_server())
        start = trio.current_time()
        assert await read_until_closed(client.stream) == b""
        assert trio.current_time() - start == pytest.approx(KEEPALIVE_IDLE_S)


async def test_a_crashing_handler_is_a_500_and_other_connections_keep_working(nursery: trio.Nursery) -> None:
    echo_app = App(role=make_role(), provider=EchoProvider(), api_key=None, created=1)

    async def app(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return await echo_app(request)

    server = make_server(app=app)
    with trio.fail_after(IO_TIMEOUT_S):
        broken = await connect(nursery, server)
        await broken.request("GET", "/boom")
        response, body = await broken.response()
        assert response.status_code == 500
        assert orjson.loads(body)["error"]["message"] == "Internal server error."
        healthy = await connect(nursery, server)
        await healthy.request("GET", "/health")
        assert (await healthy.response())[0].status_code == 200


async def test_shutdown_closes_idle_connections_and_ends_live_streams_in_band(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = make_server(EndlessProvider())
    with trio.fail_after(60):
        idle = await connect(nursery, server)
        streaming = await connect(nursery, server)
        await streaming.request("POST", "/v1/chat/completions", STREAM_CHAT)
        assert isinstance(await streaming.next_event(), h11.Response)
        start = trio.current_time()
        server.shutdown()
        assert await read_until_closed(idle.stream) == b""
        assert trio.current_time() == start  # the idle one closed at once
        body = b""
        while not isinstance(event := await streaming.next_event(), h11.EndOfMessage):
            body += event.data
        assert trio.current_time() - start == pytest.approx(5.0)  # the grace period
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "overloaded"
        for chunk in events[:-2]:
            check_chunk(chunk)


async def test_request_arriving_during_shutdown_finishes_with_connection_close(nursery: trio.Nursery) -> None:
    server = make_server()
    with trio.fail_after(IO_TIMEOUT_S):
        client = await connect(nursery, server)
        await client.stream.send_all(b"GET /health HTTP/1.1\r\nHost: t")
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
        await client.stream.send_all(b"\r\n\r\n")
        code, headers, body = parse_raw(await read_until_closed(client.stream))
        assert (code, headers["connection"], body) == (200, "close", b'{"status":"ok"}')


async def test_client_that_stops_reading_is_dropped_and_its_provider_closed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider = EndlessProvider(gap_s=0.001)
    # A lockstep pair has no buffer: a send waits until the client reads.
    client_side, server_side = trio.testing.lockstep_stream_pair()
    client = Client(client_side)
    with trio.fail_after(SEND_TIMEOUT_S * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(make_server(provider).handle_connection, server_side)
            await client.request("POST", "/v1/chat/completions", STREAM_CHAT)
            await provider.opened.wait()
            start = trio.current_time()
            await provider.closed.wait()  # the client never reads a byte
            assert trio.current_time() - start == pytest.approx(SEND_TIMEOUT_S)
        # The nursery waited for the connection task: it ended quietly.
    assert "unexpected error" not in caplog.text


async def test_silent_model_gets_keep_alive_comments(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    role = attrs.evolve(make_role(), server=ServerLimits(sse_keepalive_seconds=15))
    provider = EndlessProvider(gap_s=40)
    with trio.fail_after(200):
        client = await connect(nursery, make_server(provider, role=role))
        start = trio.current_time()
        await client.request("POST", "/v1/chat/completions", STREAM_CHAT)
        assert isinstance(await client.next_event(), h11.Response)
        frames = []
        while len(frames) < 6:
            event = await client.next_event()
            frames.append((round(trio.current_time() - start), bytes(event.data)))
    kinds = [(t, b"keep-alive" if data == b": keep-alive\n\n" else b"chunk") for t, data in frames]
    assert kinds == [(0, b"chunk"), (0, b"chunk"), (15, b"keep-alive"), (30, b"keep-alive"),
                     (40, b"chunk"), (55, b"keep-alive")]  # fmt: skip


def timed_role(seconds: float) -> Role:
    return attrs.evolve(make_role(), guardrails=Guardrails(timeout_seconds=seconds))


@pytest.mark.parametrize("body", [CHAT, STREAM_CHAT], ids=["plain", "stream"])
async def test_model_too_slow_to_start_is_a_504(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, body: bytes
) -> None:
    provider = EndlessProvider(first_token_after_s=3600)
    with trio.fail_after(60):
        client = await connect(nursery, make_server(provider, role=timed_role(5)))
        await client.request("POST", "/v1/chat/completions", body)
        response, error = await client.response()
        assert response.status_code == 504
        check_error(orjson.loads(error))
        assert orjson.loads(error)["error"]["type"] == "timeout"
        assert provider.closed.is_set()


async def test_model_too_slow_to_finish_a_stream_ends_in_band(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    provider = EndlessProvider(gap_s=1)
    with trio.fail_after(60):
        client = await connect(nursery, make_server(provider, role=timed_role(5)))
        await client.request("POST", "/v1/chat/completions", STREAM_CHAT)
        response, body = await client.response()
        assert response.status_code == 200
        events = sse_events(body)
        assert events[-2]["error"]["type"] == "timeout"
        assert events[-1] == "[DONE]"
        assert len(events) == 2 + 1 + 5  # role chunk, tokens at 0..4 s, then error and [DONE]
        assert provider.closed.is_set()
