"""A client that goes away stops the model: in every phase, for every wire format.

The fake provider records when its side of the connection closes. Each script
would keep the provider busy for an hour, so a closed connection can only come
from our cancelling the request; the clients here are raw TCP sockets, so
"going away" is exactly a FIN or an RST.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from tests.conftest import IO_TIMEOUT_S, StartServer, base_url, upstream_role
from tests.fake_upstream import Exchange, FakeUpstream, Script
from trio_serve.server import Running

UPSTREAM_KEY = "sk-test-upstream"
HOUR_S = 3600.0


def chat_request(running: Running, *, stream: bool) -> bytes:
    body = b'{"stream": %s, "messages": [{"role": "user", "content": "Hi"}]}' % (b"true" if stream else b"false")
    host = base_url(running).removeprefix("http://")
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(running: Running) -> trio.SocketStream:
    host, port = running.addresses[0]
    return await trio.open_tcp_stream(host, port)


async def read_until(client: trio.SocketStream, marker: bytes, count: int = 1) -> bytes:
    received = b""
    while received.count(marker) < count:
        chunk = await client.receive_some(65536)
        assert chunk, f"server closed early: {received!r}"
        received += chunk
    return received


async def leave(client: trio.SocketStream, how: str) -> float:
    """Go away with a FIN or an RST; return the time we left."""
    if how == "rst":
        # SO_LINGER with a zero timeout makes close() send an RST.
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left_at = trio.current_time()
    await client.aclose()
    return left_at


# Each phase: the provider's script, the request, and what the client waits for
# before leaving (None: the request is sent and the model reached, nothing more).
Phase = tuple[Script, bool, bytes | None, int]
PHASES: dict[str, Callable[[], Phase]] = {
    "before-first-token": lambda: (Script(first_byte_delay_s=HOUR_S), True, None, 0),
    "mid-stream": lambda: (Script(stall_after=2), True, b'"content":', 3),  # role chunk and two deltas
    "non-streamed": lambda: (Script(stall_after=2), False, None, 0),
}


async def cancel_once(running: Running, upstream: FakeUpstream, phase: str, how: str) -> tuple[Exchange, float]:
    script, stream, marker, count = PHASES[phase]()
    upstream.script(script)
    client = await connect(running)
    await client.send_all(chat_request(running, stream=stream))
    exchange = await upstream.next_exchange()
    if marker is not None:
        await read_until(client, marker, count)
    left_at = await leave(client, how)
    await exchange.closed.wait()
    return exchange, left_at


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_client_leaving_closes_the_provider_request(
    start_server: StartServer, upstream: FakeUpstream, wire: str, phase: str, how: str
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream, wire), provider_key=UPSTREAM_KEY)
        exchange, left_at = await cancel_once(running, upstream, phase, how)
    # The provider would have kept this request busy for an hour.
    assert not exchange.completed
    assert exchange.closed_at >= left_at


def live_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_200_cancellations_leave_nothing_behind(start_server: StartServer, upstream: FakeUpstream) -> None:
    with trio.fail_after(IO_TIMEOUT_S * 6):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        client = await connect(running)  # one whole exchange first, so pools and caches are warm
        await client.send_all(chat_request(running, stream=True))
        await read_until(client, b"[DONE]")
        await upstream.next_exchange()
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        tasks_before, fds_before = live_tasks(), open_fds()
        phases = list(PHASES)
        for run in range(200):
            await cancel_once(running, upstream, phases[run % 3], "fin" if run % 2 else "rst")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert upstream.open_exchanges == 0
        assert sum(1 for exchange in upstream.exchanges if exchange.completed) == 1  # the warm-up only
        assert live_tasks() <= tasks_before
        assert open_fds() <= fds_before


async def test_a_client_that_reads_slowly_slows_the_provider(start_server: StartServer, upstream: FakeUpstream) -> None:
    total = 50_000
    upstream.script(Script(deltas=tuple({"content": "x" * 1000} for _ in range(total))))
    with trio.fail_after(IO_TIMEOUT_S * 3):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        client = await connect(running)
        await client.send_all(chat_request(running, stream=True))
        exchange = await upstream.next_exchange()
        await read_until(client, b'"content":', 2)
        # The client reads nothing more: once every buffer on the way is full,
        # everything stops, the provider included.
        await trio.testing.wait_all_tasks_blocked(cushion=0.3)
        sent = exchange.frames_sent
        assert sent < total / 2, f"{sent} of {total} frames pulled from the provider for a client that stopped"
        await read_until(client, b'"content":', 200)  # reading again lets it go on
        assert exchange.frames_sent > sent
        await client.aclose()
        await exchange.closed.wait()
