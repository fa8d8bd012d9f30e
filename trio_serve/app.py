"""The application: routing, authentication, the models endpoints, and the
audit trail around the chat endpoint (whose turns are `chat.py`'s business).

Takes a parsed `Request`, returns a `Response`; knows nothing of sockets.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import attrs
import orjson

from trio_serve.audit import AuditLog
from trio_serve.chat import ChatHandler, Turn
from trio_serve.config import Role
from trio_serve.conversations import ConversationStore
from trio_serve.errors import ApiError, AuthenticationFailed, MethodNotAllowed, NotFound
from trio_serve.http import Request, Response, Send
from trio_serve.openai import JSON_HEADERS, error_response
from trio_serve.providers.base import Provider

Handler = Callable[["App", Request], Awaitable[Response]]


class App:
    """Serves one agent (a role) through one model provider."""

    def __init__(
        self,
        *,
        role: Role,
        provider: Provider,
        api_key: str | None,
        created: int,
        conversations: ConversationStore | None = None,
        audit: AuditLog | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._chat = ChatHandler(role=role, provider=provider, conversations=conversations, wall_clock=wall_clock)
        self._audit = audit
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

    def refused(self, request: Request, error: ApiError) -> None:
        """A request the server refused while reading it (413, 408): audited if it was a chat."""
        if request.path == CHAT_PATH:
            turn = Turn.begin(request, self._wall_clock)
            turn.failed(error)
            self._log(turn)

    async def _dispatch(self, request: Request) -> Response:
        if request.path == CHAT_PATH:
            return await self._audited_chat(request)
        if request.path.startswith("/v1/"):
            self._authenticate(request.headers)
        handler, methods = self._route(request.path)
        _allow(request, methods)
        return await handler(self, request)

    # -- the chat endpoint, audited whatever happens ------------------------------

    async def _audited_chat(self, request: Request) -> Response:
        turn = Turn.begin(request, self._wall_clock)
        try:
            self._authenticate(request.headers)
            _allow(request, _POST)
            response = await self._chat.respond(request, turn)
        except ApiError as exc:
            turn.failed(exc)
            self._log(turn)
            raise
        except BaseException:
            turn.cancelled = True  # the client left, or the server is stopping
            self._log(turn)
            raise
        if response.produce is None:
            self._log(turn)
            return response
        return attrs.evolve(response, produce=partial(self._logged_stream, response.produce, turn))

    async def _logged_stream(self, produce: Callable[[Send], Awaitable[None]], turn: Turn, send: Send) -> None:
        try:
            await produce(send)
        except ApiError as exc:
            turn.failed(exc)  # before the stream started: the client gets this status
            raise
        except BaseException:
            turn.cancelled = True
            raise
        finally:
            self._log(turn)

    def _log(self, turn: Turn) -> None:
        if self._audit is not None:
            self._audit.record(turn.record(self._role))

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


CHAT_PATH = "/v1/chat/completions"
_READ = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})
_ROUTES: dict[str, tuple[Handler, frozenset[str]]] = {
    "/health": (App._health, _READ),
    "/v1/models": (App._models, _READ),
}


def _allow(request: Request, methods: frozenset[str]) -> None:
    if request.method not in methods:
        allow = ", ".join(sorted(methods))
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allow}.", headers=[("allow", allow)]
        )


def _auth_error(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_api_key", headers=[("www-authenticate", "Bearer")])
