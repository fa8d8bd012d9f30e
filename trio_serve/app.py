"""The application: routing, authentication and the chat handler.

Takes a parsed `Request`, returns a `Response`; knows nothing of sockets. A
streamed answer is an async generator of SSE frames that the server writes as
they come, and cancelling the server's task closes the provider's request.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import orjson
import trio

from trio_serve.config import Role
from trio_serve.errors import (
    ApiError,
    AuthenticationFailed,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    UnsupportedMediaType,
    UpstreamError,
)
from trio_serve.http import Request, Response, Send
from trio_serve.openai import (
    JSON_HEADERS,
    SSE_DONE,
    SSE_HEADERS,
    SSE_KEEPALIVE,
    ChatRequest,
    ChunkEncoder,
    MessageAssembler,
    completion_body,
    error_response,
    model_call,
    sse_error,
)
from trio_serve.providers.base import Delta, Event, Finish, ModelCall, Provider, Usage

Handler = Callable[["App", Request], Awaitable[Response]]

SHUTDOWN_TAIL = sse_error(Overloaded("The server is shutting down; the answer was cut short."))


class App:
    """Serves one agent (a role) through one model provider."""

    def __init__(
        self,
        *,
        role: Role,
        provider: Provider,
        api_key: str | None,
        created: int,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._provider = provider
        self._timeout_s = role.guardrails.timeout_seconds
        self._key = api_key.encode("utf-8") if api_key else None
        self._wall_clock = wall_clock
        self._model = {"id": role.name, "object": "model", "created": created, "owned_by": "initrunner"}
        # Bodies that never change are serialised once, not per request.
        self._health_body = b'{"status":"ok"}'
        self._models_body = orjson.dumps({"object": "list", "data": [self._model]})
        self._model_body = orjson.dumps(self._model)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return error_response(exc)

    async def _dispatch(self, request: Request) -> Response:
        if request.path.startswith("/v1/"):
            self._authenticate(request.headers)
        handler, methods = self._route(request.path)
        if request.method not in methods:
            allow = ", ".join(sorted(methods))
            raise MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.path}; use {allow}.",
                headers=[("allow", allow)],
            )
        return await handler(self, request)

    def _route(self, path: str) -> tuple[Handler, frozenset[str]]:
        route = _ROUTES.get(path)
        if route is not None:
            return route
        if path.startswith("/v1/models/"):
            return App._one_model, _READ
        raise NotFound(f"Unknown path: {path}")

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        if self._key is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _auth_error("Missing API key: send the header 'Authorization: Bearer <key>'.")
        # Header text is latin-1 decoded bytes: compare the raw bytes in constant
        # time, so a non-ASCII token is just a wrong key.
        if not hmac.compare_digest(token.strip().encode("latin-1"), self._key):
            raise _auth_error("Incorrect API key provided.")

    async def _health(self, request: Request) -> Response:
        return Response(status=200, headers=JSON_HEADERS, body=self._health_body)

    async def _models(self, request: Request) -> Response:
        return Response(status=200, headers=JSON_HEADERS, body=self._models_body)

    async def _one_model(self, request: Request) -> Response:
        model_id = request.path.removeprefix("/v1/models/")
        if model_id != self._role.name:
            raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return Response(status=200, headers=JSON_HEADERS, body=self._model_body)

    async def _chat(self, request: Request) -> Response:
        _require_json(request.headers)
        chat = ChatRequest.from_json(request.body)
        call = model_call(self._role, chat)
        completion_id = "chatcmpl-" + os.urandom(12).hex()
        created = int(self._wall_clock())
        if chat.stream:
            encoder = ChunkEncoder(completion_id=completion_id, created=created, model=self._role.name)
            return Response(
                status=200,
                headers=SSE_HEADERS,
                produce=partial(self._relay, call, encoder, chat.include_usage),
                heartbeat=SSE_KEEPALIVE,
                heartbeat_s=self._role.server.sse_keepalive_seconds,
                abort_tail=SHUTDOWN_TAIL,
            )
        message, finish_reason, usage = await self._complete(call)
        body = completion_body(
            completion_id=completion_id,
            created=created,
            model=self._role.name,
            message=message,
            finish_reason=finish_reason,
            usage=usage,
        )
        return Response(status=200, headers=JSON_HEADERS, body=body)

    async def _relay(self, call: ModelCall, encoder: ChunkEncoder, include_usage: bool, send: Send) -> None:
        """SSE frames: the role chunk, one chunk per model delta, finish, usage, [DONE].

        A failure before the role chunk is raised, so the client gets an HTTP
        error status; after it, the failure is sent in-band and ends the stream.
        """
        started = False
        try:
            with trio.fail_after(self._timeout_s):
                async with self._provider.stream(call) as events:
                    await send(encoder.role())
                    started = True
                    usage = await _relay_events(events, encoder, send)
        except (ApiError, trio.TooSlowError) as exc:
            error = exc if isinstance(exc, ApiError) else self._timed_out()
            if not started:
                raise error from None
            await send(sse_error(error))
            return
        if include_usage and usage is not None:
            await send(encoder.usage(usage))
        await send(SSE_DONE)

    async def _complete(self, call: ModelCall) -> tuple[dict[str, Any], str, Usage | None]:
        assembler = MessageAssembler()
        finish_reason: str | None = None
        usage: Usage | None = None
        try:
            with trio.fail_after(self._timeout_s):
                async with self._provider.stream(call) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            assembler.add(event.fields)
                        elif isinstance(event, Finish):
                            finish_reason = event.reason
                        else:
                            usage = event
        except trio.TooSlowError:
            raise self._timed_out() from None
        if finish_reason is None:
            raise UpstreamError("The model provider ended without saying why it stopped.")
        return assembler.message(), finish_reason, usage

    def _timed_out(self) -> GatewayTimeout:
        return GatewayTimeout(f"The model did not finish within the agent's {self._timeout_s:g} s time limit.")


async def _relay_events(events: AsyncIterator[Event], encoder: ChunkEncoder, send: Send) -> Usage | None:
    """Send one chunk per delta, as it comes; return the usage, sent last if asked."""
    usage: Usage | None = None
    async for event in events:
        if isinstance(event, Delta):
            await send(encoder.delta(event.fields))
        elif isinstance(event, Finish):
            await send(encoder.finish(event.reason))
        else:
            usage = event
    return usage


_READ = frozenset({"GET", "HEAD"})
_ROUTES: dict[str, tuple[Handler, frozenset[str]]] = {
    "/health": (App._health, _READ),
    "/v1/models": (App._models, _READ),
    "/v1/chat/completions": (App._chat, frozenset({"POST"})),
}


def _auth_error(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_api_key", headers=[("www-authenticate", "Bearer")])


def _require_json(headers: Mapping[str, str]) -> None:
    # Refusing other media types stops cross-site HTML form posts, which cannot
    # send application/json without a CORS preflight.
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {media_type or 'none'}.",
            param="content-type",
        )
