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
import trio

from trio_serve.audit import AuditLog
from trio_serve.chat import ChatHandler, Turn
from trio_serve.config import Role
from trio_serve.conversations import ConversationStore
from trio_serve.errors import ApiError, AuthenticationFailed, InvalidRequest, MethodNotAllowed, NotFound, RateLimited
from trio_serve.guard import LOOPBACK_PROXIES, Cors, RateLimiter, TrustedProxies, is_loopback_host
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
        proxies: TrustedProxies = LOOPBACK_PROXIES,
        loopback_only: bool = False,
    ) -> None:
        """`loopback_only`: every listener is on loopback (then, without a key,
        requests must name localhost). `proxies` may vouch for HTTPS and addresses."""
        self._role = role
        self._chat = ChatHandler(role=role, provider=provider, conversations=conversations, wall_clock=wall_clock)
        self._audit = audit
        self._key = api_key.encode("utf-8") if api_key else None
        self._wall_clock = wall_clock
        self._proxies = proxies
        self._loopback_guard = loopback_only and self._key is None
        self._cors = Cors(role.server.cors_origins)
        self._limiter = RateLimiter(per_minute=role.rate_limit.requests_per_minute, burst=role.rate_limit.burst_size)
        self._model = {"id": role.name, "object": "model", "created": created, "owned_by": "initrunner"}
        # Bodies that never change are serialised once, not per request.
        self._health_body = b'{"status":"ok"}'
        self._models_body = orjson.dumps({"object": "list", "data": [self._model]})
        self._model_body = orjson.dumps(self._model)

    async def __call__(self, request: Request) -> Response:
        try:
            if request.path != HEALTH_PATH:  # /health answers anyone: load balancers probe it
                self._check_where_from(request)
                preflight = self._cors.preflight(request.method, request.headers)
                if preflight is not None:
                    return preflight  # before authentication: browsers send no key with it
            response = await self._dispatch(request)
        except ApiError as exc:
            response = error_response(exc)
        return _with_headers(response, self._cors.headers(request.headers.get("origin")))

    def refused(self, request: Request, error: ApiError) -> Response:
        """The answer to a request the server refused while reading it (413, 408,
        503 at the connection cap): audited if it was a chat, CORS headers added."""
        if request.path == CHAT_PATH:
            turn = Turn.begin(request, self._wall_clock)
            turn.failed(error)
            self._log(turn)
        return _with_headers(error_response(error), self._cors.headers(request.headers.get("origin")))

    async def _dispatch(self, request: Request) -> Response:
        if request.path == CHAT_PATH:
            return await self._audited_chat(request)
        handler, methods = self._route(request.path)
        if not request.path.startswith("/v1/"):
            _allow(request, methods)
            return await handler(self, request)
        return await self._metered(request, methods, partial(handler, self))

    # -- who may ask, and how often ---------------------------------------------------

    def _check_where_from(self, request: Request) -> None:
        if self._loopback_guard and not is_loopback_host(request.headers.get("host", "localhost")):
            raise InvalidRequest(
                "This server listens on loopback without an API key and answers only requests for "
                f"localhost; the Host header was {request.headers['host']!r}.",
                param="host",
                code="invalid_host",
            )
        if self._role.server.require_https and not self._proxies.view(request.client, request.headers).https:
            raise InvalidRequest(
                "This server requires HTTPS: connect through its TLS-terminating proxy.",
                code="https_required",
            )

    async def _metered(
        self, request: Request, methods: frozenset[str], answer: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Authenticate, count against the client's rate limit, answer; every
        answer (errors too) tells the client its quota."""
        self._authenticate(request.headers)
        quota = self._limiter.take(self._client_id(request), trio.current_time())
        if not quota.allowed:
            raise RateLimited(
                f"Rate limit reached: {self._role.rate_limit.requests_per_minute} requests per minute. "
                "Retry after the time in the Retry-After header.",
                code="rate_limit_exceeded",
                headers=quota.headers(),
            )
        try:
            _allow(request, methods)
            response = await answer(request)
        except ApiError as exc:
            exc.headers += quota.headers()
            raise
        return _with_headers(response, quota.headers())

    def _client_id(self, request: Request) -> str:
        # Per key when there is one (every holder of the key shares it), else per address.
        if self._key is not None:
            return "key"
        return "addr:" + self._proxies.view(request.client, request.headers).address

    # -- the chat endpoint, audited whatever happens ------------------------------

    async def _audited_chat(self, request: Request) -> Response:
        turn = Turn.begin(request, self._wall_clock)
        try:
            response = await self._metered(request, _POST, partial(self._chat.respond, turn=turn))
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
        """The handler of a path and the methods it takes; NotFound if none."""
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
HEALTH_PATH = "/health"
_READ = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})
_ROUTES: dict[str, tuple[Handler, frozenset[str]]] = {
    HEALTH_PATH: (App._health, _READ),
    "/v1/models": (App._models, _READ),
}


def _allow(request: Request, methods: frozenset[str]) -> None:
    if request.method not in methods:
        allow = ", ".join(sorted(methods))
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed on {request.path}; use {allow}.", headers=[("allow", allow)]
        )


def _with_headers(response: Response, headers: tuple[tuple[str, str], ...]) -> Response:
    return attrs.evolve(response, headers=response.headers + headers) if headers else response


def _auth_error(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_api_key", headers=[("www-authenticate", "Bearer")])
