"""POST /v1/chat/completions: one turn of a chat, plain or streamed.

A turn reads the conversation's history (if the request names one), calls the
model through the provider, relays or assembles its answer, and stores the
history again only when the model finished. What happened is written down in
a `Turn`, from which the app makes the audit record.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import orjson
import trio

from trio_serve.audit import AuditRecord
from trio_serve.config import ContentPolicy, Role
from trio_serve.conversations import HEADER, ConversationStore, History, conversation_id, new_turn
from trio_serve.errors import (
    ApiError,
    GatewayTimeout,
    InvalidRequest,
    Overloaded,
    UnsupportedMediaType,
    UpstreamError,
)
from trio_serve.http import Request, Response, Send, random_id
from trio_serve.openai import (
    JSON_HEADERS,
    SSE_DONE,
    SSE_HEADERS,
    SSE_KEEPALIVE,
    ChatRequest,
    ChunkEncoder,
    MessageAssembler,
    completion_body,
    model_call,
    sse_error,
    text_of,
)
from trio_serve.providers.base import Batch, Delta, Finish, ModelCall, Provider, Usage

SHUTDOWN_TAIL = sse_error(Overloaded("The server is shutting down; the answer was cut short."))


@attrs.define
class Turn:
    """What became of one chat request, filled in as it goes, for the audit log."""

    request: Request
    started_at: float  # trio clock, for durations
    arrived_at: float  # wall clock: formatted only if the turn is audited
    stream: bool = False
    conversation_id: str | None = None
    user_prompt: str = ""
    output: str = ""
    usage: Usage | None = None
    first_token_at: float | None = None
    status: int = 200
    error: str | None = None
    cancelled: bool = False

    @classmethod
    def begin(cls, request: Request, wall_clock: Callable[[], float] = time.time) -> Turn:
        return cls(request=request, started_at=trio.current_time(), arrived_at=wall_clock())

    def saw_token(self) -> None:
        if self.first_token_at is None:  # 0.0 is a valid time under a mock clock
            self.first_token_at = trio.current_time()

    def failed(self, error: ApiError) -> None:
        self.status, self.error = error.status, error.message

    def record(self, role: Role) -> AuditRecord:
        now = trio.current_time()
        usage = self.usage
        return AuditRecord(
            ts=datetime.fromtimestamp(self.arrived_at, UTC).isoformat(timespec="milliseconds"),
            request_id=self.request.request_id,
            agent_name=role.name,
            provider=role.model.provider,
            model=role.model.name,
            conversation_id=self.conversation_id,
            client_addr=self.request.client,
            method=self.request.method,
            path=self.request.path,
            status=self.status,
            stream=self.stream,
            cancelled=self.cancelled,
            user_prompt=self.user_prompt,
            output=self.output,
            tokens_in=usage.prompt_tokens if usage else None,
            tokens_out=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            duration_ms=round((now - self.started_at) * 1000, 3),
            ttft_ms=None if self.first_token_at is None else round((self.first_token_at - self.started_at) * 1000, 3),
            error=self.error,
        )


class KeyedLocks:
    """One lock per key, forgotten as soon as nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str | None) -> AsyncIterator[None]:
        if key is None:
            yield
            return
        lock, users = self._locks.setdefault(key, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]


class CallSlots:
    """A cap on concurrent model calls: past it, refuse at once (503), never queue.

    Queueing would hold the client's connection with no answer and no bound;
    a fast 503 with Retry-After lets the client (the SDKs retry it) or a load
    balancer go elsewhere.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self._in_use >= self._limit:
            raise Overloaded(
                f"The server is at its limit of {self._limit} concurrent model calls; retry shortly.",
                code="overloaded",
                headers=[("retry-after", "1")],
            )
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1


class InputPolicy:
    """The role's `security.content`: user messages over `max_prompt_length`
    characters, or matching a blocked pattern, are refused before the model sees them."""

    def __init__(self, policy: ContentPolicy) -> None:
        self._max_chars = policy.max_prompt_length
        self._blocked = [re.compile(pattern) for pattern in policy.blocked_input_patterns]

    def check(self, messages: History) -> None:
        for index, message in enumerate(messages):
            if message["role"] != "user":
                continue
            text = text_of(message)
            if len(text) > self._max_chars:
                raise InvalidRequest(
                    f"The message is {len(text)} characters long; this agent takes at most {self._max_chars}.",
                    param=f"messages[{index}].content",
                    code="prompt_too_long",
                )
            if any(pattern.search(text) for pattern in self._blocked):
                raise InvalidRequest(
                    "The message was refused by this agent's content policy.",
                    param=f"messages[{index}].content",
                    code="content_policy_violation",
                )


class ChatHandler:
    def __init__(
        self,
        *,
        role: Role,
        provider: Provider,
        conversations: ConversationStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._provider = provider
        self._conversations = conversations
        self._turn_locks = KeyedLocks()  # serialises concurrent turns of one conversation
        self._calls = CallSlots(role.server.max_upstream_calls)
        self._content = InputPolicy(role.content)
        self._timeout_s = role.guardrails.timeout_seconds
        self._wall_clock = wall_clock

    async def respond(self, request: Request, turn: Turn) -> Response:
        _require_json(request.headers)
        conversation = conversation_id(request.headers)
        chat = ChatRequest.from_json(request.body)
        turn.stream, turn.conversation_id = chat.stream, conversation
        turn.user_prompt = next((text_of(m) for m in reversed(chat.messages) if m["role"] == "user"), "")
        self._content.check(chat.messages)
        completion_id = random_id("chatcmpl-")
        created = int(self._wall_clock())
        echo = ((HEADER, conversation),) if conversation else ()
        if chat.stream:
            encoder = ChunkEncoder(completion_id=completion_id, created=created, model=self._role.name)
            return Response(
                status=200,
                headers=SSE_HEADERS + echo,
                produce=partial(self._stream_turn, chat, conversation, encoder, turn),
                heartbeat=SSE_KEEPALIVE,
                heartbeat_s=self._role.server.sse_keepalive_seconds,
                abort_tail=SHUTDOWN_TAIL,
            )
        async with self._turn_locks.hold(conversation):
            history = self._history(chat, conversation)
            message, finish_reason, usage = await self._complete(self._call(chat, history), turn)
            self._remember(conversation, history, message)
        body = completion_body(
            completion_id=completion_id,
            created=created,
            model=self._role.name,
            message=message,
            finish_reason=finish_reason,
            usage=usage,
        )
        return Response(status=200, headers=JSON_HEADERS + echo, body=body)

    # -- conversations -------------------------------------------------------------

    def _history(self, chat: ChatRequest, conversation: str | None) -> History:
        """The messages of this turn: stored history plus the request's new turn."""
        if conversation is None or self._conversations is None:
            return chat.messages
        stored = self._conversations.get(self._role.name, conversation, trio.current_time())
        return chat.messages if stored is None else stored + new_turn(chat.messages)

    def _remember(self, conversation: str | None, history: History, answer: Mapping[str, Any]) -> None:
        if conversation is None or self._conversations is None:
            return
        stored_answer = {key: value for key, value in answer.items() if value is not None}
        self._conversations.put(self._role.name, conversation, (*history, stored_answer), trio.current_time())

    def _call(self, chat: ChatRequest, history: History) -> ModelCall:
        return model_call(self._role, attrs.evolve(chat, messages=history))

    # -- answering -------------------------------------------------------------------

    async def _stream_turn(
        self, chat: ChatRequest, conversation: str | None, encoder: ChunkEncoder, turn: Turn, send: Send
    ) -> None:
        async with self._turn_locks.hold(conversation):
            history = self._history(chat, conversation)
            assembler = MessageAssembler()
            finished = await self._relay(self._call(chat, history), encoder, chat.include_usage, send, assembler, turn)
            if finished:
                self._remember(conversation, history, assembler.message())

    async def _relay(
        self,
        call: ModelCall,
        encoder: ChunkEncoder,
        include_usage: bool,
        send: Send,
        assembler: MessageAssembler,
        turn: Turn,
    ) -> bool:
        """SSE frames: the role chunk, one chunk per model delta, finish, usage, [DONE].

        A failure before the role chunk is raised, so the client gets an HTTP
        error status; after it, the failure is sent in-band and ends the stream.
        Returns whether the model finished its answer.
        """
        started = False
        try:
            with self._calls.hold(), trio.fail_after(self._timeout_s):
                async with self._provider.stream(call) as events:
                    await send(encoder.role())
                    started = True
                    await _relay_events(events, encoder, send, assembler, turn)
        except (ApiError, trio.TooSlowError) as exc:
            error = exc if isinstance(exc, ApiError) else self._timed_out()
            if not started:
                raise error from None
            turn.error = error.message
            await send(sse_error(error))
            return False
        finally:
            turn.output = _output_text(assembler.message())
        if include_usage and turn.usage is not None:
            await send(encoder.usage(turn.usage))
        await send(SSE_DONE)
        return True

    async def _complete(self, call: ModelCall, turn: Turn) -> tuple[dict[str, Any], str, Usage | None]:
        assembler = MessageAssembler()
        finish_reason: str | None = None
        try:
            with self._calls.hold(), trio.fail_after(self._timeout_s):
                async with self._provider.stream(call) as batches:
                    async for batch in batches:
                        for event in batch:
                            if isinstance(event, Delta):
                                turn.saw_token()
                                assembler.add(event.fields)
                            elif isinstance(event, Finish):
                                finish_reason = event.reason
                            else:
                                turn.usage = event
        except trio.TooSlowError:
            raise self._timed_out() from None
        finally:
            turn.output = _output_text(assembler.message())
        if finish_reason is None:
            raise UpstreamError("The model provider ended without saying why it stopped.")
        return assembler.message(), finish_reason, turn.usage

    def _timed_out(self) -> GatewayTimeout:
        return GatewayTimeout(f"The model did not finish within the agent's {self._timeout_s:g} s time limit.")


async def _relay_events(
    batches: AsyncIterator[Batch], encoder: ChunkEncoder, send: Send, assembler: MessageAssembler, turn: Turn
) -> None:
    """One chunk per delta, each sent as soon as it arrived: the chunks of deltas
    that arrived together go out in one write. Answer and usage are kept aside."""
    async for batch in batches:
        frames = []
        for event in batch:
            if isinstance(event, Delta):
                turn.saw_token()
                assembler.add(event.fields)
                frames.append(encoder.delta(event.fields))
            elif isinstance(event, Finish):
                frames.append(encoder.finish(event.reason))
            else:
                turn.usage = event
        if frames:
            await send(b"".join(frames))


def _output_text(message: Mapping[str, Any]) -> str:
    """The answer as the audit log keeps it: its text, then its tool calls as JSON."""
    parts = [message.get("content") or ""]
    if message.get("tool_calls"):
        parts.append(orjson.dumps(message["tool_calls"]).decode())
    return "\n".join(part for part in parts if part)


def _require_json(headers: Mapping[str, str]) -> None:
    # Refusing other media types stops cross-site HTML form posts, which cannot
    # send application/json without a CORS preflight.
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {media_type or 'none'}.",
            param="content-type",
        )
