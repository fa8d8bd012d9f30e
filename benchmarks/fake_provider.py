"""A fast fake OpenAI-compatible provider for benchmarks, in its own process.

    python -m benchmarks.fake_provider [--port 0]     # prints "port N" when ready

A bare asyncio protocol with no HTTP library, so that it is never the
bottleneck. The request's last message scripts the answer:
"bench chunks=N delay_ms=D first_ms=F" streams N one-word deltas, D ms apart,
after F ms of silence. `GET /stats` reports when each connection closed that
was still being answered (CLOCK_MONOTONIC, comparable across processes), so
cancellation latency can be measured from the client's side.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import Any

import orjson

SCRIPT_RE = re.compile(r"(chunks|delay_ms|first_ms)=(\d+(?:\.\d+)?)")
CHUNK_HEAD = b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":"fake","choices":[{"index":0,"delta":'  # noqa: E501
CHUNK_TAIL = b',"finish_reason":null}]}\n\n'
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def script(body: dict[str, Any]) -> tuple[int, float, float]:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content")
    found = dict(SCRIPT_RE.findall(content if isinstance(content, str) else ""))
    return int(found.get("chunks", 3)), float(found.get("delay_ms", 0)) / 1000, float(found.get("first_ms", 0)) / 1000


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_frames(chunks: int, include_usage: bool) -> list[bytes]:
    frames = [CHUNK_HEAD + b'{"role":"assistant","content":""}' + CHUNK_TAIL]
    frames += [CHUNK_HEAD + b'{"content":"w%d "}' % n + CHUNK_TAIL for n in range(chunks)]
    frames.append(CHUNK_HEAD[: -len(b'"delta":')] + b'"delta":{},"finish_reason":"stop"}]}\n\n')
    if include_usage:
        usage = {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks}
        frames.append(
            b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","choices":[],"usage":'
            + orjson.dumps(usage)
            + b"}\n\n"
        )
    return [*frames, b"data: [DONE]\n\n"]


def completion(chunks: int) -> bytes:
    message = {"role": "assistant", "content": " ".join(f"w{n}" for n in range(chunks)), "refusal": None}
    body = orjson.dumps(
        {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": message}],
            "usage": {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks},
        }
    )  # fmt: skip
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class Stats:
    def __init__(self) -> None:
        self.answering = 0  # requests being answered now
        self.aborted: list[float] = []  # CLOCK_MONOTONIC times of connections closed mid-answer
        self.completed = 0


STATS = Stats()


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.task is None or self.task.done():
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            length = int(re.search(r"(?i)content-length:\s*(\d+)", head).group(1)) if "ontent-" in head else 0  # type: ignore[union-attr]
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self.task = asyncio.ensure_future(self.answer(head.split(" ", 2)[1], body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            STATS.aborted.append(time.monotonic())
            self.task.cancel()

    async def answer(self, path: str, body: bytes) -> None:
        assert self.transport is not None
        if path == "/stats":
            payload = orjson.dumps(
                {"answering": STATS.answering, "aborted": STATS.aborted, "completed": STATS.completed}
            )
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
            return
        if not path.endswith("/chat/completions"):
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            return
        request = orjson.loads(body)
        chunks, delay, first = script(request)
        STATS.answering += 1
        try:
            if first:
                await asyncio.sleep(first)
            if not request.get("stream"):
                self.transport.write(completion(chunks))
            else:
                await self.stream(chunks, delay, bool((request.get("stream_options") or {}).get("include_usage")))
            STATS.completed += 1
        finally:
            STATS.answering -= 1

    async def stream(self, chunks: int, delay: float, include_usage: bool) -> None:
        assert self.transport is not None
        frames = sse_frames(chunks, include_usage)
        if not delay:
            self.transport.write(SSE_HEAD + b"".join(chunked(frame) for frame in frames) + b"0\r\n\r\n")
            return
        self.transport.write(SSE_HEAD + chunked(frames[0]))
        for frame in frames[1 : chunks + 1]:
            await asyncio.sleep(delay)
            self.transport.write(chunked(frame))
        self.transport.write(b"".join(chunked(frame) for frame in frames[chunks + 1 :]) + b"0\r\n\r\n")


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args().port))
