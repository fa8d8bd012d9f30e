"""The connections to model providers: an httpx transport on trio and h11.

httpx stays the API the providers speak (requests, responses, errors, content
decoding); this replaces its default transport, httpcore, which cost 2.4-3 times
the CPU per streamed request (about 0.85-0.95 ms against 0.3-0.4 ms at concurrency
32 on the 2-core development machine: `python -m benchmarks.upstream_client`).
httpcore's pool also scans every connection with a syscall whenever a request
starts or ends, O(n) in the number of open streams. This is what the server side is:
h11 over trio streams, one write per request, and a body handed on as it
arrives, so the SSE events of one network read reach the client in one write.

Connections are kept per origin (scheme, host, port) for reuse, newest first. A
kept connection is dropped once idle past KEEPALIVE_EXPIRY_S, or, idle for more
than FRESH_S, if it became readable (the provider closed it). A kept connection
that turns out closed as the request goes out is retried once on a new one,
only when not a byte of an answer had come back (the request was never read).
"""

from __future__ import annotations

import select
import ssl
from collections.abc import AsyncIterator

import attrs
import h11
import httpx
import trio

KEEPALIVE_EXPIRY_S = 4.0  # below the 5 s uvicorn-based providers (vLLM, LiteLLM) keep idle connections
FRESH_S = 1.0  # idle less than this, a connection is reused unchecked (a syscall saved per request)
MAX_IDLE_PER_ORIGIN = 64  # kept connections per provider; more are closed after their answer
CONNECT_TIMEOUT_S = 10.0
RECEIVE_BYTES = 64 * 1024

Origin = tuple[str, str, int]


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection = attrs.Factory(lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    reused: bool = False
    received: int = 0  # bytes of the current answer received so far


class _StaleConnection(Exception):
    """A kept connection the provider had closed: the request never reached it."""


class TrioTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
    ) -> None:
        self._ssl_context = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._expiry_s = keepalive_expiry_s
        self._max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self.connections_opened = 0  # for tests and benchmarks: how often reuse failed to apply

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = _origin(request.url)
        body = await request.aread()
        kept = self._take_idle(origin)
        if kept is not None:
            try:
                return await self._exchange(origin, kept, request, body)
            except _StaleConnection:
                pass  # closed by the provider as we sent: once more, on a new connection
        connection = await self._connect(origin)
        try:
            return await self._exchange(origin, connection, request, body)
        except _StaleConnection as exc:
            raise httpx.RemoteProtocolError("The server closed the connection without answering.") from exc

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)

    # -- one exchange ------------------------------------------------------------

    async def _exchange(
        self, origin: Origin, connection: _Connection, request: httpx.Request, body: bytes
    ) -> httpx.Response:
        """Send the request and read the response head; the body follows as it is read."""
        try:
            try:
                await connection.stream.send_all(_request_bytes(connection.h11, request, body))
            except trio.BrokenResourceError as exc:
                raise _stale_or(connection, httpx.WriteError(f"the connection broke: {exc.__cause__ or exc}")) from exc
            head = await _read_head(connection)
        except BaseException:
            await trio.aclose_forcefully(connection.stream)  # cancelled or failed: the connection is done for
            raise
        return httpx.Response(
            status_code=head.status_code,
            headers=head.headers.raw_items(),
            stream=_ResponseBody(self, origin, connection),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    def _keep(self, origin: Origin, connection: _Connection) -> bool:
        """Take back a connection whose exchange ended cleanly; False if it cannot be kept."""
        if connection.h11.our_state is not h11.DONE or connection.h11.their_state is not h11.DONE:
            return False
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_idle:
            return False
        connection.h11.start_next_cycle()
        connection.idle_since, connection.reused, connection.received = trio.current_time(), True, 0
        idle.append(connection)
        return True

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the newest: the least likely to have been closed
            idle_s = trio.current_time() - connection.idle_since
            if idle_s >= self._expiry_s:
                # It and every older one have expired: close them all.
                for expired in (*idle, connection):
                    _close_now(expired)
                idle.clear()
                return None
            if idle_s < FRESH_S or not _readable(connection.stream):
                return connection  # (closed under us anyway, it is retried once: see _StaleConnection)
            _close_now(connection)  # the provider closed it (or sent what nobody asked for)
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        with trio.move_on_after(self._connect_timeout_s):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
            if scheme == "https":
                stream = await self._tls(stream, host)
            self.connections_opened += 1
            return _Connection(stream)
        raise httpx.ConnectTimeout(f"cannot connect to {host}:{port}: timed out after {self._connect_timeout_s:g} s")

    async def _tls(self, stream: trio.abc.Stream, host: str) -> trio.SSLStream[trio.abc.Stream]:
        context = self._ssl_context or httpx.create_ssl_context()
        tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise httpx.ConnectError(f"TLS handshake with {host} failed: {exc.__cause__ or exc}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls


class _ResponseBody(httpx.AsyncByteStream):
    """The body as it arrives: what one network read brings is one piece."""

    def __init__(self, transport: TrioTransport, origin: Origin, connection: _Connection) -> None:
        self._transport = transport
        self._origin = origin
        self._connection = connection
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            pieces, ended = _events_so_far(connection.h11)
            if pieces:
                yield b"".join(pieces)
            if ended:
                return
            await _receive(connection)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._transport._keep(self._origin, self._connection):
            # Mid-answer this is how a cancellation reaches the provider: the
            # connection closes, and the provider stops generating.
            await trio.aclose_forcefully(self._connection.stream)


def _origin(url: httpx.URL) -> Origin:
    if url.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _request_bytes(connection: h11.Connection, request: httpx.Request, body: bytes) -> bytes:
    head = h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw)
    return (
        (connection.send(head) or b"")
        + (connection.send(h11.Data(data=body)) or b"")
        + (connection.send(h11.EndOfMessage()) or b"")
    )


async def _read_head(connection: _Connection) -> h11.Response:
    while True:
        try:
            event = connection.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _stale_or(connection, httpx.RemoteProtocolError(f"invalid response: {exc}")) from exc
        if isinstance(event, h11.Response):
            return event
        if event is h11.NEED_DATA:
            await _receive(connection)
        elif isinstance(event, h11.ConnectionClosed):
            raise _stale_or(connection, httpx.RemoteProtocolError("The server closed the connection early."))
        # An InformationalResponse (100 Continue) is skipped.


def _events_so_far(connection: h11.Connection) -> tuple[list[bytes], bool]:
    """Body pieces already received, and whether the body has ended."""
    pieces = []
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(f"invalid response body: {exc}") from exc
        if isinstance(event, h11.Data):
            pieces.append(bytes(event.data))
        elif event is h11.NEED_DATA:
            return pieces, False
        else:  # EndOfMessage, or ConnectionClosed after a close-delimited body
            return pieces, True


async def _receive(connection: _Connection) -> None:
    try:
        data = await connection.stream.receive_some(RECEIVE_BYTES)
    except trio.BrokenResourceError as exc:
        raise _stale_or(connection, httpx.ReadError(f"the connection broke: {exc.__cause__ or exc}")) from exc
    connection.received += len(data)
    connection.h11.receive_data(bytes(data))  # b"" is the end of the stream: h11 decides what it means


def _stale_or(connection: _Connection, error: Exception) -> Exception:
    """A kept connection that failed before a byte came back was closed under us."""
    if connection.reused and connection.received == 0:
        return _StaleConnection()
    return error


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under a connection, TLS or not (None for other streams)."""
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    return getattr(transport, "socket", None)


def _readable(stream: trio.abc.Stream) -> bool:
    """Whether an idle connection has something to read: end of stream, a reset, or junk."""
    sock = _socket_of(stream)
    if sock is None:
        return False
    poller = select.poll()  # not select.select(): descriptors above 1023 are common here
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _close_now(connection: _Connection) -> None:
    # Idle: nothing is in flight, so a plain close (no TLS goodbye) loses nothing.
    sock = _socket_of(connection.stream)
    if sock is not None:
        sock.close()
