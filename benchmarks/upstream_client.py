"""The cost of the provider side alone: httpx's default transport against ours.

    python -m benchmarks.upstream_client [--requests 4000]

Streams 8-delta answers from the benchmarks' fake provider (its own process)
through an httpx.AsyncClient, first on httpx's default transport (httpcore),
then on trio_serve's TrioTransport, and last with h11 on trio sockets and no
httpx at all (the floor: what httpx's client layer costs on top), at
concurrency 1 and 32; prints requests per second and CPU time per request of
this process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import h11
import httpx
import orjson
import trio

from benchmarks.servers import fake_provider
from trio_serve.providers.transport import TrioTransport

BODY = orjson.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "bench chunks=8"}]})
HEADERS = {"content-type": "application/json"}


Exchange = Callable[[], Awaitable[None]]


def through_httpx(client: httpx.AsyncClient, url: str) -> Exchange:
    async def exchange() -> None:
        async with client.stream("POST", url, content=BODY, headers=HEADERS) as response:
            async for _ in response.aiter_bytes():
                pass

    return exchange


def through_h11(host: str, port: int) -> Exchange:
    """One request on a kept connection, read to its end: no pool logic, no checks."""
    idle: list[tuple[trio.SocketStream, h11.Connection]] = []
    head = h11.Request(
        method="POST",
        target="/v1/chat/completions",
        headers=[("host", f"{host}:{port}"), ("content-length", str(len(BODY))), *HEADERS.items()],
    )

    async def exchange() -> None:
        if idle:
            stream, connection = idle.pop()
        else:
            stream, connection = await trio.open_tcp_stream(host, port), h11.Connection(h11.CLIENT)
        events = (head, h11.Data(data=BODY), h11.EndOfMessage())
        await stream.send_all(b"".join(connection.send(event) or b"" for event in events))
        while not isinstance(event := connection.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
        connection.start_next_cycle()
        idle.append((stream, connection))

    return exchange


async def load(exchange: Exchange, requests: int, concurrency: int) -> tuple[float, float]:
    """Requests per second and CPU microseconds per request."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await exchange()

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, requests // concurrency)
    return requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests * 1e6


async def measure(name: str, exchange: Exchange, requests: int) -> None:
    await load(exchange, 200, 1)  # warm up: connections, caches
    for concurrency in (1, 32):
        rate, cpu_us = await load(exchange, requests, concurrency)
        print(f"{name:24s} concurrency {concurrency:<3d} {rate:8,.0f} req/s {cpu_us:7,.0f} us CPU/request")


async def compare(host: str, port: int, requests: int) -> None:
    url = f"http://{host}:{port}/v1/chat/completions"
    async with httpx.AsyncClient(trust_env=False, timeout=None) as client:
        await measure("httpx (httpcore)", through_httpx(client, url), requests)
    async with httpx.AsyncClient(transport=TrioTransport(), timeout=None) as client:
        await measure("httpx + TrioTransport", through_httpx(client, url), requests)
    await measure("h11 alone (no httpx)", through_h11(host, port), requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with fake_provider() as (host, port):
        trio.run(compare, host, port, args.requests)


if __name__ == "__main__":
    main()
