"""A fake OpenAI-compatible model provider: a real HTTP server on 127.0.0.1:0.

Scripted per request (fast, slow, first-byte delay, hang, error status,
truncated stream, tool calls), streamed, or as one JSON body when the request
says `"stream": false`, as providers answer. It records what it was sent and
when each connection closed, so tests can prove that cancellation reaches the
provider.
"""

from __future__ import annotations

import math
import socket
import struct
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
    stall_after: int | None = None  # go silent forever after this many deltas
    reset_after: int | None = None  # reset the connection (RST) after this many deltas
    garbage: bytes | None = None  # sent after the deltas instead of the rest; then the stream ends
    trickle_s: float | None = None  # send every frame a byte at a time, this far apart


@attrs.define
class Exchange:
    """One request the fake received, and what became of its connection."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    started_at: float
    frames_sent: int = 0
    closed_at: float = math.inf  # when the client's side of the connection closed
    closed: trio.Event = attrs.Factory(trio.Event)
    completed: bool = False  # the whole scripted answer was sent


class FakeUpstream:
    def __init__(self, api_key: str = "sk-test-upstream") -> None:
        self.api_key = api_key
        self.default = Script()
        self.scripts: deque[Script] = deque()
        self.exchanges: list[Exchange] = []
        self.arrived = trio.Event()  # replaced by a fresh one at each arrival
        self._taken = 0
        self.port = 0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def script(self, *scripts: Script) -> None:
        """Answer the next requests with these, then with `default`."""
        self.scripts.extend(scripts)

    @property
    def open_exchanges(self) -> int:
        """Requests still being answered: neither finished nor closed by the client."""
        return sum(1 for e in self.exchanges if not (e.completed or e.closed.is_set()))

    async def next_exchange(self) -> Exchange:
        """The next request not yet taken by this method, once it has arrived."""
        while len(self.exchanges) <= self._taken:
            await self.arrived.wait()
        self._taken += 1
        return self.exchanges[self._taken - 1]

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
                path=request.target.decode(),
                headers={k.decode(): v.decode() for k, v in request.headers},
                body=orjson.loads(body),
                started_at=trio.current_time(),
            )
            self.exchanges.append(exchange)
            arrived, self.arrived = self.arrived, trio.Event()
            arrived.set()
            script = self.scripts.popleft() if self.scripts else self.default
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_close, stream, conn, exchange, nursery.cancel_scope)
                try:
                    await self._answer(stream, conn, exchange, script)
                    exchange.completed = True
                except trio.BrokenResourceError:
                    _closed(exchange)  # reset before the watcher saw it
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
        anthropic = exchange.path == "/v1/messages"
        if not self._authorized(exchange, anthropic):
            script = Script(status=401, error={"message": f"Incorrect API key provided: {exchange.headers}"})
        if script.status != 200:
            await _send_error(stream, conn, script)
            return
        if not exchange.body.get("stream"):
            await _answer_whole(stream, conn, exchange, script, anthropic)
            return
        await _send(stream, conn, h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        frames = _anthropic_frames(script, exchange.body) if anthropic else _openai_frames(script, exchange.body)
        if script.garbage is not None:
            last_delta = max(i for i, (is_delta, _) in enumerate(frames) if is_delta)
            frames = [*frames[: last_delta + 1], (False, script.garbage)]
        deltas_sent = 0
        for is_delta, frame in frames:
            if is_delta:
                if deltas_sent == script.stall_after:
                    await trio.sleep_forever()
                if deltas_sent == script.reset_after:
                    _reset(stream)
                await trio.sleep(script.delta_delay_s)
                deltas_sent += 1
            if script.trickle_s is None:
                await _send(stream, conn, h11.Data(data=frame))
            else:
                for byte in range(len(frame)):
                    await _send(stream, conn, h11.Data(data=frame[byte : byte + 1]))
                    await trio.sleep(script.trickle_s)
            exchange.frames_sent += 1
        await _send(stream, conn, h11.EndOfMessage())

    def _authorized(self, exchange: Exchange, anthropic: bool) -> bool:
        if anthropic:
            return exchange.headers.get("x-api-key") == self.api_key
        return exchange.headers.get("authorization") == f"Bearer {self.api_key}"


async def _answer_whole(
    stream: trio.SocketStream, conn: h11.Connection, exchange: Exchange, script: Script, anthropic: bool
) -> None:
    """A non-streamed request: the script's answer as one JSON body, once the model would have finished."""
    if script.stall_after is not None:
        await trio.sleep_forever()  # the model never finishes
    if script.reset_after is not None:
        _reset(stream)
    await trio.sleep(script.delta_delay_s * len(script.deltas))
    message = _assembled(script.deltas)
    whole = (
        _anthropic_message(script, exchange.body, message)
        if anthropic
        else _openai_completion(script, exchange.body, message)
    )
    body = script.garbage if script.garbage is not None else orjson.dumps(whole)
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await _send(stream, conn, h11.Response(status_code=200, headers=headers))
    pieces = [body] if script.trickle_s is None else [body[i : i + 1] for i in range(len(body))]
    for piece in pieces:
        await _send(stream, conn, h11.Data(data=piece))
        await trio.sleep(script.trickle_s or 0)
    exchange.frames_sent += 1
    await _send(stream, conn, h11.EndOfMessage())


def _reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
    raise trio.BrokenResourceError("reset by the script")


def _assembled(deltas: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The assistant message the deltas add up to (tool-call fragments joined by index)."""
    content = "".join(delta.get("content") or "" for delta in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for fragment in delta.get("tool_calls") or ():
            call = calls.setdefault(fragment["index"], {"type": "function", "function": {"arguments": ""}})
            if fragment.get("id"):
                call["id"] = fragment["id"]
            function = fragment.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    return message


def _openai_completion(script: Script, request: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream", "object": "chat.completion", "created": 1, "model": request.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": script.finish_reason}],
        "usage": script.usage,
    }  # fmt: skip


def _anthropic_message(script: Script, request: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}] if message["content"] else []
    for call in message.get("tool_calls") or ():
        function = call["function"]
        content.append({"type": "tool_use", "id": call["id"], "name": function["name"],
                        "input": orjson.loads(function["arguments"] or "{}")})  # fmt: skip
    usage = script.usage or {"prompt_tokens": 0, "completion_tokens": 0}
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": request.get("model"), "content": content,
        "stop_reason": STOP_REASONS.get(script.finish_reason or ""),
        "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
    }  # fmt: skip


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, script: Script) -> None:
    body = orjson.dumps({"error": script.error or {"message": "failure"}})
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await _send(stream, conn, h11.Response(status_code=script.status, headers=headers))
    await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


Frames = list[tuple[bool, bytes]]  # (paced like a model delta, the bytes)


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    name = f"event: {event}\n".encode() if event else b""
    return name + b"data: " + orjson.dumps(payload) + b"\n\n"


def _openai_frames(script: Script, request: dict[str, Any]) -> Frames:
    base = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 1, "model": request.get("model")}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    frames = [(False, chunk({"role": "assistant", "content": ""}))]
    frames += [(True, chunk(delta)) for delta in script.deltas]
    if script.finish_reason is None:
        return frames  # truncated: no finish, no usage, no [DONE]
    frames.append((False, chunk({}, script.finish_reason)))
    if (request.get("stream_options") or {}).get("include_usage") and script.usage is not None:
        frames.append((False, _sse({**base, "choices": [], "usage": script.usage})))
    return [*frames, (False, b"data: [DONE]\n\n")]


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def _anthropic_frames(script: Script, request: dict[str, Any]) -> Frames:
    """The same script in Anthropic's event format: text and tool_use blocks."""
    usage = script.usage or {"prompt_tokens": 0, "completion_tokens": 0}
    start = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": request.get("model"),
             "stop_reason": None, "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": 1}}  # fmt: skip
    frames: Frames = [(False, _sse({"type": "message_start", "message": start}, "message_start"))]
    block, open_kind = -1, None
    for delta in script.deltas:
        for kind, payload in _anthropic_parts(delta):
            if kind != open_kind or kind == "tool_start":
                if open_kind is not None:
                    frames.append((False, _sse({"type": "content_block_stop", "index": block}, "content_block_stop")))
                block, open_kind = block + 1, ("tool" if kind == "tool_start" else kind)
                if kind == "text":
                    start_block = {"type": "content_block_start", "index": block,
                                   "content_block": {"type": "text", "text": ""}}  # fmt: skip
                    frames.append((False, _sse(start_block, "content_block_start")))
            event = {"index": block, **payload}
            frames.append((True, _sse(event, str(event["type"]))))
    if open_kind is not None:
        frames.append((False, _sse({"type": "content_block_stop", "index": block}, "content_block_stop")))
    if script.finish_reason is None:
        return frames
    message_delta = {"type": "message_delta", "delta": {"stop_reason": STOP_REASONS[script.finish_reason]},
                     "usage": {"output_tokens": usage["completion_tokens"]}}  # fmt: skip
    frames.append((False, _sse(message_delta, "message_delta")))
    return [*frames, (False, _sse({"type": "message_stop"}, "message_stop"))]


def _anthropic_parts(delta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if delta.get("content"):
        return [("text", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": delta["content"]}})]
    parts = []
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        if call.get("id"):
            block = {"type": "tool_use", "id": call["id"], "name": function.get("name"), "input": {}}
            parts.append(("tool_start", {"type": "content_block_start", "content_block": block}))
        if function.get("arguments"):
            json_delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
            parts.append(("tool", {"type": "content_block_delta", "delta": json_delta}))
    return parts


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


async def _watch_close(
    stream: trio.SocketStream, conn: h11.Connection, exchange: Exchange, scope: trio.CancelScope
) -> None:
    try:
        while data := await stream.receive_some(65536):
            # A client reusing the connection may send its next request the
            # moment it has read this answer, before this watcher is stopped.
            conn.receive_data(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    _closed(exchange)
    scope.cancel()


def _closed(exchange: Exchange) -> None:
    if not exchange.closed.is_set():
        exchange.closed_at = trio.current_time()
        exchange.closed.set()


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)
