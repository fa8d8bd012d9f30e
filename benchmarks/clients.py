"""Load clients for the benchmark: a minimal asyncio HTTP/1.1 client over raw sockets.

Light on purpose (no HTTP library, frames found by scanning for blank lines),
so that on a 2-core machine the client takes as little as it can from the
servers it measures.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

CONTENT_MARK = b'"content":"w'  # a content frame carrying the fake provider's words
IDLE_WAVE = 200
WORD_RE = re.compile(rb"w\d+ ")  # one scripted delta: servers that merge deltas carry several per frame


@attrs.frozen
class Target:
    """A server under test: where it is, and what its requests must carry."""

    name: str
    host: str
    port: int
    path: str = "/v1/chat/completions"
    model: str = "bench"
    headers: tuple[tuple[str, str], ...] = ()

    def request(self, prompt: str, *, stream: bool) -> bytes:
        body = orjson.dumps({"model": self.model, "stream": stream, "messages": [{"role": "user", "content": prompt}]})
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in self.headers)]  # fmt: skip
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, target: Target) -> Connection:
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=2**20)
        return cls(reader, writer)

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    async def body_chunks(self, headers: dict[str, str]) -> Any:
        """Yield the body as it arrives (chunked or by length)."""
        if "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
            return
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    async def exchange(self, payload: bytes) -> tuple[int, bytes]:
        self.writer.write(payload)
        status, headers = await self.head()
        body = b"".join([chunk async for chunk in self.body_chunks(headers)])
        return status, body

    def close(self, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


async def latency(target: Target, requests: int, prompt: str = "bench chunks=8") -> dict[str, float]:
    """Non-streamed requests one after another on one keep-alive connection."""
    connection = await Connection.open(target)
    payload = target.request(prompt, stream=False)
    await connection.exchange(payload)  # warm up
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        status, _ = await connection.exchange(payload)
        times.append(time.perf_counter() - start)
        assert status == 200, status
    connection.close()
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000}


async def ttft(target: Target, requests: int) -> dict[str, float]:
    """Time from sending a streamed request to its first content delta."""
    connection = await Connection.open(target)
    payload = target.request("bench chunks=4", stream=True)
    times = []
    for _ in range(requests + 1):
        start = time.perf_counter()
        connection.writer.write(payload)
        _, headers = await connection.head()
        first = None
        async for chunk in connection.body_chunks(headers):
            if first is None and CONTENT_MARK in chunk:
                first = time.perf_counter() - start
        times.append(first if first is not None else float("nan"))
    connection.close()
    return {"p50_ms": percentile(times[1:], 50) * 1000}


@attrs.define
class StreamResult:
    completed: bool = False
    content_frames: int = 0
    words: int = 0
    gaps: list[float] = attrs.Factory(list)
    first_at: float = 0.0
    last_at: float = 0.0
    started_at: float = 0.0


async def stream(target: Target, prompt: str) -> StreamResult:
    """One streamed answer, timing each content frame's arrival."""
    result = StreamResult(started_at=time.perf_counter())
    connection = await Connection.open(target)
    try:
        connection.writer.write(target.request(prompt, stream=True))
        status, headers = await connection.head()
        if status != 200:
            return result
        async for chunk in connection.body_chunks(headers):
            count = chunk.count(CONTENT_MARK)
            result.words += len(WORD_RE.findall(chunk))
            if count:
                now = time.perf_counter()
                if result.content_frames:
                    result.gaps.append(now - result.last_at)
                else:
                    result.first_at = now
                result.content_frames += count
                result.last_at = now
            if b"[DONE]" in chunk:
                result.completed = True
    finally:
        connection.close()
    return result


async def burst(target: Target, deltas: int = 1000) -> dict[str, float]:
    result = await stream(target, f"bench chunks={deltas}")
    elapsed = max(result.last_at - result.first_at, 1e-9)
    return {"frames": result.content_frames, "words": result.words, "deltas_per_s": result.words / elapsed}


async def many_streams(target: Target, count: int, deltas: int = 64, delay_ms: int = 20) -> dict[str, float]:
    """`count` streams at once, each `deltas` deltas `delay_ms` apart: stalls are gaps over 2x the pace."""
    prompt = f"bench chunks={deltas} delay_ms={delay_ms}"
    results = await asyncio.gather(*(stream(target, prompt) for _ in range(count)), return_exceptions=True)
    finished = [r for r in results if isinstance(r, StreamResult) and r.completed and r.words == deltas]
    gaps = [gap for r in results if isinstance(r, StreamResult) for gap in r.gaps]
    durations = [r.last_at - r.started_at for r in finished]
    return {
        "streams": count,
        "completed": len(finished),
        "stalls": sum(1 for gap in gaps if gap > 2 * delay_ms / 1000),
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        # A server that holds the words back and sends them late has few gaps but long streams.
        "duration_p99_s": percentile(durations, 99),
    }


async def idle_streams(target: Target, count: int) -> tuple[list[Connection], int]:
    """Open `count` streams whose model stays silent after its first frame.

    Returns the connections (to close later) and how many streams were live:
    the head and a first frame arrived (servers that hold everything back
    until the model speaks get 10 s to show a head, then count as not live).
    """
    payload = target.request("bench chunks=1 delay_ms=3600000", stream=True)

    async def one() -> tuple[Connection, bool]:
        connection = await Connection.open(target)
        connection.writer.write(payload)
        try:
            status, _ = await asyncio.wait_for(connection.head(), 10)
            await asyncio.wait_for(connection.reader.readuntil(b"\n\n"), 10)
        except (TimeoutError, asyncio.IncompleteReadError):
            return connection, False
        return connection, status == 200

    opened: list[tuple[Connection, bool]] = []
    for start in range(0, count, IDLE_WAVE):  # in waves: 10,000 connects at once overflow loopback queues
        opened += await asyncio.gather(*(one() for _ in range(min(IDLE_WAVE, count - start))))
    return [connection for connection, _ in opened], sum(live for _, live in opened)


async def fake_stats(host: str, port: int) -> dict[str, Any]:
    connection = await Connection.open(Target("fake", host, port))
    connection.writer.write(b"GET /stats HTTP/1.1\r\nHost: fake\r\n\r\n")
    _, headers = await connection.head()
    body = b"".join([chunk async for chunk in connection.body_chunks(headers)])
    connection.close()
    return dict(orjson.loads(body))


async def cancellations(target: Target, fake: tuple[str, int], count: int) -> dict[str, float]:
    """Drop `count` live streams (FIN and RST alternately); time until the provider saw its connection close."""
    latencies = []
    for run in range(count):
        before = len((await fake_stats(*fake))["aborted"])
        connection = await Connection.open(target)
        # 30 s of answer: a server that never cancels leaves the provider busy that long.
        connection.writer.write(target.request("bench chunks=3000 delay_ms=10", stream=True))
        _, headers = await connection.head()
        seen = 0
        async for chunk in connection.body_chunks(headers):
            seen += len(WORD_RE.findall(chunk))
            if seen >= 2:
                break
        left_at = time.monotonic()
        connection.close(reset=bool(run % 2))
        deadline = time.monotonic() + 1  # a provider still busy a second later was never stopped
        while time.monotonic() < deadline:
            aborted = (await fake_stats(*fake))["aborted"]
            if len(aborted) > before:
                latencies.append(aborted[-1] - left_at)
                break
            await asyncio.sleep(0.001)  # a benchmark may poll; the provider has no event for us
        else:
            latencies.append(float("inf"))  # never cancelled: the provider kept generating
    await asyncio.sleep(0.5)  # let servers that cancel late do so before counting orphans
    stats = await fake_stats(*fake)
    finite = [v for v in latencies if v != float("inf")]
    return {
        "p50_ms": percentile(finite, 50) * 1000 if finite else float("nan"),
        "p99_ms": percentile(latencies, 99) * 1000,
        "orphans": stats["answering"],
        "not_cancelled": len(latencies) - len(finite),
    }


async def throughput_python(target: Target, concurrency: int, seconds: float) -> dict[str, float]:
    """Requests per second with `concurrency` keep-alive connections (used when wrk is missing)."""
    payload = target.request("bench chunks=8", stream=False)
    times: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        connection = await Connection.open(target)
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await connection.exchange(payload)
            times.append(time.perf_counter() - start)
        connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"rps": len(times) / seconds, "p99_ms": percentile(times, 99) * 1000}


def parse_wrk(output: str) -> dict[str, float]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")}
