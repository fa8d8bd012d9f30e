"""The cost of the provider side alone: httpx's default transport against ours.

    python -m benchmarks.upstream_client [--requests 4000]

Streams 8-delta answers from the benchmarks' fake provider (its own process)
through an httpx.AsyncClient, first on httpx's default transport (httpcore),
then on trio_serve's TrioTransport, at concurrency 1 and 32; prints requests
per second and CPU time per request of this process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import httpx
import orjson
import trio

from benchmarks.servers import fake_provider
from trio_serve.providers.transport import TrioTransport

BODY = orjson.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "bench chunks=8"}]})
HEADERS = {"content-type": "application/json"}


async def load(client: httpx.AsyncClient, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """Requests per second and CPU microseconds per request."""

    async def worker(count: int) -> None:
        for _ in range(count):
            async with client.stream("POST", url, content=BODY, headers=HEADERS) as response:
                async for _ in response.aiter_bytes():
                    pass

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, requests // concurrency)
    return requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests * 1e6


async def compare(url: str, requests: int) -> None:
    clients: list[tuple[str, Callable[[], httpx.AsyncClient]]] = [
        ("httpx (httpcore)", lambda: httpx.AsyncClient(trust_env=False, timeout=None)),
        ("httpx + TrioTransport", lambda: httpx.AsyncClient(transport=TrioTransport(), timeout=None)),
    ]
    for name, make in clients:
        async with make() as client:
            await load(client, url, 200, 1)  # warm up: connections, caches
            for concurrency in (1, 32):
                rate, cpu_us = await load(client, url, requests, concurrency)
                print(f"{name:24s} concurrency {concurrency:<3d} {rate:8,.0f} req/s {cpu_us:7,.0f} us CPU/request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with fake_provider() as (host, port):
        trio.run(compare, f"http://{host}:{port}/v1/chat/completions", args.requests)


if __name__ == "__main__":
    main()
