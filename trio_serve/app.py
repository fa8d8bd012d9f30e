"""The application: routing, authentication and the chat handler.

Takes a parsed `Request`, returns a `Response`; knows nothing of sockets. A
streamed answer is an async generator of SSE frames that the server writes as
they come, and cancelling the server's task closes the provider's request.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from trio_serve.config import Role
from trio_serve.errors import (
    ApiError,
    AuthenticationFailed,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    UnsupportedMediaType,
    UpstreamError,
)
from trio_serve.http import Request, Response
from trio_serve.openai import (
    JSON_HEADERS,
    SSE_DONE,
    SSE_HEADERS,
    ChatRequest,
    ChunkEncoder,
    MessageAssembler,
    completion_body,
    error_response,
    model_call,
    sse_error,
)
from trio_serve.providers.base import Delta, Finish, ModelCall, Provider, Usage

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
            frames = self._relay(call, encoder, include_usage=chat.include_usage)
            return Response(status=200, headers=SSE_HEADERS, stream=frames, abort_tail=SHUTDOWN_TAIL)
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

    async def _relay(
        self, call: ModelCall, encoder: ChunkEncoder, *, include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        """SSE frames: the role chunk, one chunk per model delta, finish, usage, [DONE].

        Entering the provider happens before the first frame, so a refusal
        there is still answered with an HTTP error status.
        """
        usage: Usage | None = None
        async with self._provider.stream(call) as events:
            yield encoder.role()
            try:
                async for event in events:
                    if isinstance(event, Delta):
                        yield encoder.delta(event.fields)
                    elif isinstance(event, Finish):
                        yield encoder.finish(event.reason)
                    else:
                        usage = event
            except ApiError as exc:
                yield sse_error(exc)
                return
        if include_usage and usage is not None:
            yield encoder.usage(usage)
        yield SSE_DONE

    async def _complete(self, call: ModelCall) -> tuple[dict[str, Any], str, Usage | None]:
        assembler = MessageAssembler()
        finish_reason: str | None = None
        usage: Usage | None = None
        async with self._provider.stream(call) as events:
            async for event in events:
                if isinstance(event, Delta):
                    assembler.add(event.fields)
                elif isinstance(event, Finish):
                    finish_reason = event.reason
                else:
                    usage = event
        if finish_reason is None:
            raise UpstreamError("The model provider ended without saying why it stopped.")
        return assembler.message(), finish_reason, usage


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
