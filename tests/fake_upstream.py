"""A fake OpenAI-compatible model provider: a real HTTP server on 127.0.0.1:0.

Scripted per request (fast, slow, first-byte delay, hang, error status,
truncated stream, tool calls) and recording what it was sent and when each
connection closed, so tests can prove that cancellation reaches the provider.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import attrs
import h11
import orjson
import trio

DEFAULT_DELTAS = ({"content": "Hello"}, {"content": ","}, {"content": " world"})


@attrs.define
class Script:
    deltas: tuple[dict[str, Any], ...] = DEFAULT_DELTAS
    finish_reason: str | None = "stop"  # None: the stream ends without one (truncated)
    usage: dict[str, int] | None = attrs.Factory(
        lambda: {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    )
    status: int = 200
    error: dict[str, Any] | None = None  # body of a non-200 answer
    first_byte_delay_s: float = 0.0  # before the response head
    delta_delay_s: float = 0.0  # before each delta
    hang: bool = False  # never answer at all


@attrs.define
class Exchange:
    """One request the fake received, and what became of its connection."""

    headers: dict[str, str]
    body: dict[str, Any]
    started_at: float
    closed_at: float = math.inf  # when the client's side of the connection closed
    closed: trio.Event = attrs.Factory(trio.Event)
    completed: bool = False  # the whole scripted answer was sent


class FakeUpstream:
    def __init__(self, api_key: str = "sk-test-upstream") -> None:
        self.api_key = api_key
        self.default = Script()
        self.scripts: deque[Script] = deque()
        self.exchanges: list[Exchange] = []
        self.arrived = trio.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *scripts: Script) -> None:
        """Answer the next requests with these, then with `default`."""
        self.scripts.extend(scripts)

    @property
    def open_exchanges(self) -> int:
        """Requests still being answered: neither finished nor closed by the client."""
        return sum(1 for e in self.exchanges if not (e.completed or e.closed.is_set()))

    async def next_exchange(self) -> Exchange:
        """Wait for the next request to arrive (counted from the last call)."""
        await self.arrived.wait()
        self.arrived = trio.Event()
        return self.exchanges[-1]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request, body = await _read_request(stream, conn)
            if request is None:
                return
            exchange = Exchange(
                headers={k.decode(): v.decode() for k, v in request.headers},
                body=orjson.loads(body),
                started_at=trio.current_time(),
            )
            self.exchanges.append(exchange)
            self.arrived.set()
            script = self.scripts.popleft() if self.scripts else self.default
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_close, stream, exchange, nursery.cancel_scope)
                await self._answer(stream, conn, exchange, script)
                exchange.completed = True
                nursery.cancel_scope.cancel()
            if exchange.closed.is_set() or conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(
        self, stream: trio.SocketStream, conn: h11.Connection, exchange: Exchange, script: Script
    ) -> None:
        if script.hang:
            await trio.sleep_forever()
        await trio.sleep(script.first_byte_delay_s)
        if exchange.headers.get("authorization") != f"Bearer {self.api_key}":
            script = Script(
                status=401, error={"message": "Incorrect API key provided", "type": "invalid_request_error"}
            )
        if script.status != 200:
            body = orjson.dumps({"error": script.error or {"message": "failure"}})
            await _send(
                stream, conn, h11.Response(status_code=script.status, headers=[("content-length", str(len(body)))])
            )
            await _send(stream, conn, h11.Data(data=body))
            await _send(stream, conn, h11.EndOfMessage())
            return
        await _send(stream, conn, h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        for frame in _frames(script, exchange.body):
            if frame.startswith(b"data: {") and b'"delta"' in frame:
                await trio.sleep(script.delta_delay_s)
            await _send(stream, conn, h11.Data(data=frame))
        await _send(stream, conn, h11.EndOfMessage())


def _frames(script: Script, request: dict[str, Any]) -> list[bytes]:
    base = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1, "model": request.get("model")}

    def frame(payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**base, **payload}) + b"\n\n"

    frames = [frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    frames += [frame({"choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in script.deltas]
    if script.finish_reason is None:
        return frames
    frames.append(frame({"choices": [{"index": 0, "delta": {}, "finish_reason": script.finish_reason}]}))
    wants_usage = (request.get("stream_options") or {}).get("include_usage")
    if wants_usage and script.usage is not None:
        frames.append(frame({"choices": [], "usage": script.usage}))
    frames.append(b"data: [DONE]\n\n")
    return frames


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive_some(65536))
            except trio.BrokenResourceError:
                return None, b""
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            return None, b""


async def _watch_close(stream: trio.SocketStream, exchange: Exchange, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(65536):
            pass  # our client never pipelines; anything else would be a bug there
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    exchange.closed_at = trio.current_time()
    exchange.closed.set()
    scope.cancel()


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)
