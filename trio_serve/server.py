"""Sockets, timeouts and the one nursery tree.

Lifetimes nest: the httpx client and the audit writer outlive the conversation
sweeper and the connection handlers, which outlive the accept loop. Each connection is one task; while a
request is answered, a sibling task watches the socket, and the client going
away cancels the answer, the provider's HTTP request included.

Graceful shutdown is a deadline on cancel scopes: idle connections close at
once, requests in flight get `grace_s` to finish, and streams still running
then are ended with an in-band error event and `[DONE]`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from email.utils import formatdate
from functools import partial

import attrs
import httpx
import trio

from trio_serve.app import App
from trio_serve.audit import AuditDatabase, AuditLog
from trio_serve.config import Role
from trio_serve.conversations import ConversationStore
from trio_serve.errors import ApiError, Overloaded, RequestTimeout
from trio_serve.guard import LOOPBACK_PROXIES, TrustedProxies
from trio_serve.http import NEED_DATA, SERVER_HEADER, HttpConnection, Phase, Request, Response, Send, new_request_id
from trio_serve.openai import error_response
from trio_serve.providers.factory import make_provider
from trio_serve.providers.transport import TrioTransport
from trio_serve.providers.upstream import DEFAULT_RETRY, RetryPolicy

log = logging.getLogger("trio_serve")

KEEPALIVE_IDLE_S = 30.0  # an idle keep-alive connection is closed after this
HEAD_TIMEOUT_S = 10.0  # slowloris: a request head must be complete within this
BODY_TIMEOUT_S = 30.0  # a slow body holds a connection and a buffer: bounded
SEND_TIMEOUT_S = 30.0  # a client that stops reading is dropped, its upstream cancelled
SHUTDOWN_GRACE_S = 10.0  # in-flight requests may finish within this on SIGTERM
ABORT_WRITE_S = 1.0  # time to write the final error frames after the grace ran out
RECEIVE_BYTES = 64 * 1024
PIPELINE_BUFFER_BYTES = 1024 * 1024  # read ahead of the answer at most this, then stop
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 60.0  # an expired conversation outlives its TTL by at most this
REFUSAL_READ_S = 1.0  # past the connection cap, time given to send the request we refuse
MAX_REFUSING = 64  # connections being refused at once; past this, closed without a word

_PHASE_TIMEOUTS = {Phase.IDLE: KEEPALIVE_IDLE_S, Phase.HEAD: HEAD_TIMEOUT_S, Phase.BODY: BODY_TIMEOUT_S}

App_ = Callable[[Request], Awaitable[Response]]


class _ClientGone(Exception):
    """The client closed, reset, or stopped reading: nothing more can be sent."""


@attrs.define
class _Watch:
    client_gone: bool = False


class HttpServer:
    """Accepts connections and speaks HTTP/1.1 to them on behalf of an app."""

    def __init__(
        self,
        app: App_,
        *,
        max_body_bytes: int,
        max_connections: int = 2048,
        grace_s: float = SHUTDOWN_GRACE_S,
        on_refused: Callable[[Request, ApiError], Response] | None = None,
    ) -> None:
        self._app = app
        self._max_connections = max_connections
        self._open = 0  # connections being served
        self._refusing = 0  # connections being answered 503 for want of room
        self._on_refused = on_refused  # answers requests refused while being read (413, 408, 503)
        self._max_body_bytes = max_body_bytes
        self._grace_s = grace_s
        self._draining = False
        self._drain_deadline = math.inf
        self._shutdown_requested = trio.Event()
        self._idle_scopes: set[trio.CancelScope] = set()
        self._work_scopes: set[trio.CancelScope] = set()
        self._date = _DateHeader()

    # -- lifetime ------------------------------------------------------------

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown()`, then drain and return."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                await acceptors.start(
                    partial(trio.serve_listeners, self.handle_connection, list(listeners), handler_nursery=connections)
                )
                task_status.started()
                await self._shutdown_requested.wait()
                acceptors.cancel_scope.cancel()  # closes the listeners
            # Whatever has not finished by now is cut off.
            connections.cancel_scope.deadline = self._drain_deadline + ABORT_WRITE_S

    def shutdown(self) -> None:
        """Stop accepting; close idle connections; give requests `grace_s` to finish."""
        if self._draining:
            return
        self._draining = True
        self._drain_deadline = trio.current_time() + self._grace_s
        self._shutdown_requested.set()
        for scope in self._idle_scopes:
            scope.cancel()
        for scope in self._work_scopes:
            scope.deadline = min(scope.deadline, self._drain_deadline)

    def draining(self) -> bool:
        return self._draining

    @contextmanager
    def _work_scope(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope(deadline=self._drain_deadline) as scope:
            self._work_scopes.add(scope)
            try:
                yield scope
            finally:
                self._work_scopes.discard(scope)

    # -- one connection ----------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes; never raises."""
        if self._open >= self._max_connections:
            await self._refuse_connection(stream)
            return
        self._open += 1
        try:
            await self._serve_connection(stream)
        finally:
            self._open -= 1  # before the close: a client that saw it has room for its next one
            await trio.aclose_forcefully(stream)

    async def _refuse_connection(self, stream: trio.abc.Stream) -> None:
        """At the connection cap: answer the request 503 at once, or just close
        when even the refusals are too many (they hold descriptors too)."""
        if self._refusing >= MAX_REFUSING:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        http = HttpConnection(max_body_bytes=self._max_body_bytes, client=_peer(stream))
        request: Request | None = None
        try:
            # Read the request first: a response the client never read (closed
            # over its unread request) would reach it as a reset, not a 503.
            with trio.move_on_after(REFUSAL_READ_S):
                with suppress(ApiError, _ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
                    request = await self._read_request(stream, http)
            refusal = Overloaded(
                f"The server is at its limit of {self._max_connections} open connections; retry shortly.",
                code="overloaded",
                headers=[("retry-after", "1")],
            )
            await self._send_error(stream, http, refusal, request)
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve requests until the client closes or must be closed (the caller closes)."""
        http = HttpConnection(max_body_bytes=self._max_body_bytes, client=_peer(stream))
        try:
            await self._serve_requests(stream, http)
        except ApiError as exc:
            await self._send_error(stream, http, exc, http.unfinished_request())
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # One connection's bug must not take the server down: log, answer
            # 500 if nothing was sent yet, and close this connection only.
            log.exception("unexpected error on a connection")
            await self._send_error(stream, http, ApiError("Internal server error."))

    async def _serve_requests(self, stream: trio.abc.Stream, http: HttpConnection) -> None:
        while True:
            request = await self._read_request(stream, http)
            if request is None:
                return
            if not await self._exchange(stream, http, request):
                return
            if self._draining or not http.start_next_cycle():
                return

    async def _read_request(self, stream: trio.abc.Stream, http: HttpConnection) -> Request | None:
        """The next request, or None when the client closed or idled out."""
        phase, deadline = None, math.inf
        while True:
            result = http.next_request()
            if result is not NEED_DATA:
                return result
            if http.client_waits_for_100_continue:
                await send_or_gone(stream, http.continue_100())
            current = http.phase
            if current is not phase:
                phase, deadline = current, trio.current_time() + _PHASE_TIMEOUTS[current]
            data = await self._receive(stream, phase, deadline)
            if data is None:
                return None
            http.receive_data(data)

    async def _receive(self, stream: trio.abc.Stream, phase: Phase, deadline: float) -> bytes | bytearray | None:
        """Bytes from the client; None to close quietly; RequestTimeout if too slow."""
        with trio.move_on_at(deadline) as scope:
            if phase is Phase.IDLE:
                if self._draining:
                    return None
                self._idle_scopes.add(scope)
            try:
                return await stream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                return b""
            finally:
                self._idle_scopes.discard(scope)
        if phase is Phase.IDLE:
            return None  # idle timeout or shutdown: nothing half-said, close quietly
        raise RequestTimeout(f"The request {phase.value} was not received in time.")

    async def _exchange(self, stream: trio.abc.Stream, http: HttpConnection, request: Request) -> bool:
        """Answer one request while watching for the client leaving; False if it left."""
        watch = _Watch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_for_disconnect, stream, http, nursery.cancel_scope, watch)
            try:
                await self._respond(stream, http, request, nursery)
            except _ClientGone:
                # Caught here, not above: out of a nursery it would come wrapped
                # in an ExceptionGroup and look like a bug.
                watch.client_gone = True
            finally:
                nursery.cancel_scope.cancel()
        return not watch.client_gone

    async def _watch_for_disconnect(
        self, stream: trio.abc.Stream, http: HttpConnection, scope: trio.CancelScope, watch: _Watch
    ) -> None:
        # Bytes of a pipelined next request are kept for later; EOF or a reset
        # means nobody will read the answer, so stop producing it.
        buffered = 0
        while buffered < PIPELINE_BUFFER_BYTES:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                watch.client_gone = True
                scope.cancel()
                return
            http.receive_data(data)
            buffered += len(data)
        await trio.sleep_forever()

    # -- answering -----------------------------------------------------------

    async def _respond(
        self, stream: trio.abc.Stream, http: HttpConnection, request: Request, nursery: trio.Nursery
    ) -> None:
        writer = _ResponseWriter(stream, http, request, self._base_headers, nursery)
        with self._work_scope() as work:
            response = await self._call_app(request)
            await writer.write(response)
        if work.cancelled_caught:
            await writer.abort()

    async def _call_app(self, request: Request) -> Response:
        try:
            return await self._app(request)  # the app answers its own ApiErrors
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return error_response(ApiError("Internal server error."))

    def _base_headers(self, request_id: str, close: bool) -> list[tuple[str, str]]:
        headers = [SERVER_HEADER, ("date", self._date.now()), ("x-request-id", request_id)]
        if close or self._draining:
            headers.append(("connection", "close"))
        return headers

    async def _send_error(
        self, stream: trio.abc.Stream, http: HttpConnection, error: ApiError, request: Request | None = None
    ) -> None:
        """Refuse `request` (None if its head never came), then the connection closes."""
        response = error_response(error)
        if request is not None and self._on_refused is not None:
            response = self._on_refused(request, error)  # the app audits it and adds CORS headers
        if not http.can_respond():
            return
        writer = _ResponseWriter(stream, http, request, self._base_headers)
        with suppress(_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            await writer.write(response, close=True)


async def send_or_gone(stream: trio.abc.Stream, data: bytes) -> None:
    """Send all of `data`, or raise _ClientGone if the client cannot take it."""
    with trio.move_on_after(SEND_TIMEOUT_S) as scope:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone() from exc
    if scope.cancelled_caught:
        raise _ClientGone()


class _ResponseWriter:
    """Writes one response: whole, or streamed chunk by chunk as the app sends.

    Sends are serialised by a lock because a heartbeat task may write between
    the app's chunks; `_ended` keeps it from writing after the last one.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        http: HttpConnection,
        request: Request | None,
        base_headers: Callable[[str, bool], list[tuple[str, str]]],
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._stream = stream
        self._http = http
        self._request_id = request.request_id if request else new_request_id()
        self._head_only = request is not None and request.method == "HEAD"
        self._base_headers = base_headers
        self._nursery = nursery  # where a stream's heartbeat task runs
        self._lock = trio.StrictFIFOLock()
        self._last_send = trio.current_time()
        self._head_sent = False
        self._ended = False
        self._abort_tail: bytes | None = None  # set once a stream's head went out
        self._interrupted = False  # a send was cut mid-way: the byte stream is torn

    async def write(self, response: Response, *, close: bool = False) -> None:
        if response.produce is None:
            await self._write_whole(response, close=close)
        else:
            await self._write_stream(response, response.produce)

    async def _send(self, data: bytes) -> None:
        # Uncontended (the usual case) the lock is taken without a trip through
        # the scheduler: one fewer per token of a stream.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            await self._send_locked(data)
        finally:
            self._lock.release()

    async def _send_locked(self, data: bytes) -> None:
        if self._interrupted:
            raise _ClientGone()  # an earlier send was cut mid-way: nothing sent now could be parsed
        self._interrupted = True
        await send_or_gone(self._stream, data)
        self._interrupted = False
        self._last_send = trio.current_time()

    async def _write_whole(self, response: Response, *, close: bool) -> None:
        headers = self._headers(response, close=close)
        headers.append(("content-length", str(len(response.body))))
        out = self._http.response_head(response.status, headers)
        if not self._head_only:
            out += self._http.body(response.body)
        await self._send(out + self._http.end())

    async def _write_stream(self, response: Response, produce: Callable[[Send], Awaitable[None]]) -> None:
        try:
            await produce(partial(self._send_chunk, response))
        except ApiError as exc:
            if self._head_sent:
                raise  # a producer reports late failures in-band; this one is a bug
            await self._write_whole(error_response(exc), close=False)
            return
        if not self._head_sent:
            await self._send_chunk(response, b"")
        async with self._lock:
            self._ended, self._abort_tail = True, None
            await self._send_locked(self._http.end())

    async def _send_chunk(self, response: Response, chunk: bytes) -> None:
        if self._head_sent:
            await self._send(self._http.body(chunk))
            return
        head = self._http.response_head(response.status, self._headers(response, close=False))
        self._head_sent, self._abort_tail = True, response.abort_tail
        if response.heartbeat and self._nursery is not None:
            self._nursery.start_soon(self._heartbeat, response.heartbeat, response.heartbeat_s)
        await self._send(head + self._http.body(chunk))

    async def _heartbeat(self, frame: bytes, interval_s: float) -> None:
        while True:
            await trio.sleep_until(self._last_send + interval_s)
            async with self._lock:
                if self._ended or self._interrupted:
                    return
                if trio.current_time() >= self._last_send + interval_s:
                    await self._send_locked(self._http.body(frame))

    async def abort(self) -> None:
        """The shutdown grace ran out: end what was started, or refuse politely."""
        async with self._lock:
            if self._interrupted or self._ended:
                return  # half a frame went out, or nothing is left to end
            if self._abort_tail is not None:
                self._ended = True
                await self._send_locked(self._http.body(self._abort_tail) + self._http.end())
                return
        if self._http.can_respond():
            refusal = Overloaded("The server is shutting down.", headers=[("retry-after", "1")])
            await self._write_whole(error_response(refusal), close=True)

    def _headers(self, response: Response, *, close: bool) -> list[tuple[str, str]]:
        headers = self._base_headers(self._request_id, close)
        headers.extend(response.headers)
        return headers


class _DateHeader:
    """The Date header, formatted once a second rather than per response."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(trio.current_time())
        if second != self._second:
            self._second, self._value = second, formatdate(usegmt=True)
        return self._value


def _peer(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return ""
    try:
        host, port = socket.getpeername()[:2]
    except OSError:
        return ""
    return f"{host}:{port}"


# -- the whole tree ------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ServeOptions:
    role: Role
    api_key: str | None = None  # clients' Bearer key; None serves without auth
    provider_key: str | None = None
    created: int = 0  # the /v1/models `created` time, fixed for the process
    grace_s: float = SHUTDOWN_GRACE_S
    retry: RetryPolicy = DEFAULT_RETRY
    audit_db: AuditDatabase | None = None  # None: no audit log (--no-audit)
    proxies: TrustedProxies = LOOPBACK_PROXIES  # --forwarded-allow-ips


@attrs.frozen
class Running:
    """What `serve` hands its starter: where it listens, what it holds, how to stop it."""

    addresses: tuple[tuple[str, int], ...]
    shutdown: Callable[[], None]
    draining: Callable[[], bool]
    conversations: ConversationStore
    audit: AuditLog | None


async def serve(
    options: ServeOptions,
    listeners: Sequence[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server on bound listeners until shut down, then drain and return.

    Nurseries nest by lifetime: the audit writer outlives everything that can
    record (it drains after the last connection closed), the conversation
    sweeper lives as long as the connections, and those outlive the accept loop.
    """
    role = options.role
    conversations = ConversationStore(
        ttl_s=role.server.conversation_ttl_seconds,
        max_conversations=role.server.max_conversations,
        max_messages=role.server.max_history_messages,
    )
    secrets = tuple(key for key in (options.api_key, options.provider_key) if key)
    audit = AuditLog(options.audit_db, secrets=secrets) if options.audit_db else None
    async with _upstream_client() as client, trio.open_nursery() as lasting:
        if audit is not None:
            await lasting.start(audit.run)
        try:
            provider = make_provider(role.model, client=client, api_key=options.provider_key, retry=options.retry)
            app = App(
                role=role,
                provider=provider,
                api_key=options.api_key,
                created=options.created,
                conversations=conversations,
                audit=audit,
                proxies=options.proxies,
                loopback_only=_all_loopback(listeners),
            )
            server = HttpServer(
                app,
                max_body_bytes=role.server.max_request_body_bytes,
                max_connections=role.server.max_connections,
                grace_s=options.grace_s,
                on_refused=app.refused,
            )
            running = Running(
                addresses=_addresses(listeners),
                shutdown=server.shutdown,
                draining=server.draining,
                conversations=conversations,
                audit=audit,
            )
            async with trio.open_nursery() as background:
                background.start_soon(sweep_conversations, conversations)
                async with trio.open_nursery() as front:
                    await front.start(server.serve, listeners)
                    task_status.started(running)
                background.cancel_scope.cancel()  # every connection has finished
        finally:
            if audit is not None:
                audit.close()  # the writer drains what is queued, then returns


@asynccontextmanager
async def _upstream_client() -> AsyncIterator[httpx.AsyncClient]:
    """The httpx client every provider request goes through, on our trio transport."""
    # No read timeout: guardrails.timeout_seconds bounds the whole call.
    transport = TrioTransport(ssl_context=httpx.create_ssl_context(), connect_timeout_s=UPSTREAM_CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(transport=transport, timeout=None, trust_env=False) as client:
        yield client


async def sweep_conversations(conversations: ConversationStore, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Forget expired conversations even if nobody asks for them again."""
    while True:
        await trio.sleep(interval_s)
        conversations.sweep(trio.current_time())


def _all_loopback(listeners: Sequence[trio.SocketListener]) -> bool:
    return all(ipaddress.ip_address(host.partition("%")[0]).is_loopback for host, _ in _addresses(listeners))


def _addresses(listeners: Sequence[trio.SocketListener]) -> tuple[tuple[str, int], ...]:
    return tuple((listener.socket.getsockname()[0], listener.socket.getsockname()[1]) for listener in listeners)
