"""The provider transport on its own, against small scripted servers on loopback:
reuse, expiry, connections the provider closed, the close-as-we-send race,
TLS, content decoding, and errors in httpx's own types."""

from __future__ import annotations

import gzip
import os
import resource
import ssl
from collections.abc import Awaitable, Callable

import h11
import httpx
import pytest
import trio
import trustme

from tests.conftest import IO_TIMEOUT_S
from trio_serve.providers.transport import TrioTransport

# How the scripted server treats the n-th request (from 0) on a connection:
# it gets the connection's h11 state and stream and answers (or not).
Answer = Callable[[trio.abc.Stream, h11.Connection, int], Awaitable[None]]


class ScriptedServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.port = 0

    async def run(self, *, tls: ssl.SSLContext | None = None, task_status: trio.TaskStatus[None]) -> None:
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(await trio.open_tcp_listeners(0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if tls is not None:
            listeners = [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        with trio.move_on_after(IO_TIMEOUT_S):
            async with stream:
                for number in range(1000):
                    if not await _read_request(stream, conn):
                        return
                    self.requests += 1
                    await self.answer(stream, conn, number)
                    if conn.our_state is not h11.DONE:
                        return  # the script closed without answering
                    conn.start_next_cycle()


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            return True
        if isinstance(event, h11.ConnectionClosed):
            return False
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive_some(65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False  # reset by the client, or closed by the script


async def respond(
    stream: trio.abc.Stream, conn: h11.Connection, body: bytes = b"ok", headers: list[tuple[str, str]] | None = None
) -> None:
    head = h11.Response(status_code=200, headers=[("content-length", str(len(body))), *(headers or [])])
    await stream.send_all(conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))  # type: ignore[operator]


async def always_ok(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
    await respond(stream, conn)


async def served(nursery: trio.Nursery, answer: Answer, tls: ssl.SSLContext | None = None) -> ScriptedServer:
    server = ScriptedServer(answer)
    await nursery.start(lambda task_status: server.run(tls=tls, task_status=task_status))
    return server


def client(transport: TrioTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=None)


async def test_a_connection_is_reused_for_requests_one_after_another(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, always_ok)
        transport = TrioTransport()
        async with client(transport) as http:
            for _ in range(5):
                answer = await http.post(f"http://127.0.0.1:{server.port}/v1/x", content=b"{}")
                assert (answer.status_code, answer.content) == (200, b"ok")
        assert (server.connections, server.requests, transport.connections_opened) == (1, 5, 1)


async def test_a_connection_idle_past_its_expiry_is_not_reused(nursery: trio.Nursery) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, always_ok)
        async with client(TrioTransport(keepalive_expiry_s=0.0)) as http:
            for _ in range(3):
                assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
        assert server.connections == 3


async def test_a_connection_the_provider_closed_while_idle_is_replaced(nursery: trio.Nursery) -> None:
    async def answer_then_close(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
        await respond(stream, conn)
        await stream.aclose()  # without saying so: no Connection: close

    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, answer_then_close)
        async with client(TrioTransport()) as http:
            for _ in range(3):
                assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
        assert (server.connections, server.requests) == (3, 3)


async def test_the_close_as_we_send_race_is_retried_once_on_a_new_connection(nursery: trio.Nursery) -> None:
    async def second_request_unanswered(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
        if number == 0:
            await respond(stream, conn)
        # The second request on a connection: closed unread, as a provider
        # whose keep-alive timer fired just as it arrived would.

    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, second_request_unanswered)
        async with client(TrioTransport()) as http:
            for _ in range(3):
                assert (await http.post(f"http://127.0.0.1:{server.port}/", content=b"{}")).status_code == 200
        assert server.connections == 3


async def test_a_new_connection_closed_without_an_answer_is_an_error(nursery: trio.Nursery) -> None:
    async def never(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
        pass

    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, never)
        async with client(TrioTransport()) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(f"http://127.0.0.1:{server.port}/", content=b"{}")
        assert server.requests == 1  # not retried: the provider may have read it


async def test_a_refused_connection_is_a_connect_error() -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        async with client(TrioTransport()) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")


async def test_tls_with_certificate_checks(nursery: trio.Nursery) -> None:
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, always_ok, tls=server_tls)
        async with client(TrioTransport(ssl_context=trusting)) as http:
            for _ in range(2):
                assert (await http.get(f"https://localhost:{server.port}/")).content == b"ok"
        assert server.connections == 1
        async with client(TrioTransport(ssl_context=ssl.create_default_context())) as http:
            with pytest.raises(httpx.ConnectError, match="TLS handshake"):
                await http.get(f"https://localhost:{server.port}/")  # an authority we do not trust


async def test_a_compressed_body_is_decoded_by_httpx(nursery: trio.Nursery) -> None:
    async def gzipped(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
        await respond(stream, conn, gzip.compress(b'{"answer": 42}'), [("content-encoding", "gzip")])

    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, gzipped)
        async with client(TrioTransport()) as http:
            assert (await http.get(f"http://127.0.0.1:{server.port}/")).json() == {"answer": 42}


async def test_events_that_arrive_together_come_out_together(nursery: trio.Nursery) -> None:
    events = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"

    async def chunked_stream(stream: trio.abc.Stream, conn: h11.Connection, number: int) -> None:
        head = conn.send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        chunks = b"".join(conn.send(h11.Data(data=events[i : i + 9])) or b"" for i in range(0, len(events), 9))
        await stream.send_all((head or b"") + chunks + (conn.send(h11.EndOfMessage()) or b""))

    with trio.fail_after(IO_TIMEOUT_S):
        server = await served(nursery, chunked_stream)
        async with (
            client(TrioTransport()) as http,
            http.stream("GET", f"http://127.0.0.1:{server.port}/") as response,
        ):
            pieces = [piece async for piece in response.aiter_bytes()]
        assert pieces == [events]  # three HTTP chunks of one read: one piece, one write to our client


async def test_connections_on_descriptors_above_1023_are_reused(nursery: trio.Nursery) -> None:
    # select() cannot watch descriptors past 1023, and a busy server has many.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 1100, f"this test needs an open-file limit above 1100, not {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 4096, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))  # the next sockets get high numbers
        with trio.fail_after(IO_TIMEOUT_S):
            server = await served(nursery, always_ok)
            transport = TrioTransport()
            async with client(transport) as http:
                for _ in range(3):
                    assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 200
            assert transport.connections_opened == 1
    finally:
        for descriptor in fillers:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
