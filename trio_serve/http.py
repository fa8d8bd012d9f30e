"""HTTP/1.1 without IO: bytes in, `Request` values out; `Response` parts to bytes.

A thin layer over h11 that adds the limits of spec section 3: the request head
is capped (431), the body is capped while it arrives, chunked or not (413), and
every request gets an id. The server module owns the sockets and the clocks.
"""

from __future__ import annotations

import enum
import math
import os
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus

import attrs
import h11

from trio_serve.errors import ApiError, HeaderTooLarge, InvalidRequest, PayloadTooLarge, UriTooLong

MAX_HEAD_BYTES = 16 * 1024  # spec: a request head over 16 KiB is answered 431
MAX_TARGET_BYTES = 8 * 1024  # a longer request line is answered 414 (no path of ours is near it)
MAX_HEADER_COUNT = 100  # many tiny headers cost more to index than their bytes suggest: 431
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SERVER_HEADER = ("server", "trio_serve")


@attrs.frozen(kw_only=True)
class Request:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined by ", "
    body: bytes
    request_id: str
    client: str = ""


Send = Callable[[bytes], Awaitable[None]]
"""Writes one chunk of a streamed body to the client, as it is, at once."""


@attrs.frozen(kw_only=True)
class Response:
    """A whole body, or a producer that sends chunks as they come.

    `produce(send)` runs in the request's task and may use nurseries and cancel
    scopes freely. The head goes out with its first chunk, so an ApiError it
    raises before sending anything is still answered with a proper HTTP error.
    While it is silent for `heartbeat_s`, the server sends `heartbeat` (SSE
    keep-alive comments keep proxies from closing a stream the model is slow
    to fill). `abort_tail` is written when the server has to cut a started
    stream short (graceful shutdown), so the client learns why.
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    produce: Callable[[Send], Awaitable[None]] | None = None
    heartbeat: bytes = b""
    heartbeat_s: float = math.inf
    abort_tail: bytes = b""


class Phase(enum.Enum):
    """What the connection is waiting for; each phase has its own timeout."""

    IDLE = "idle"  # between requests: nothing of the next one has arrived
    HEAD = "head"  # part of a request head has arrived
    BODY = "body"  # the head is complete, the body is not


class NeedData(enum.Enum):
    TOKEN = "need-data"


NEED_DATA = NeedData.TOKEN


# Ids name requests and completions; they are not secrets, so they come from a
# seeded generator: os.urandom is a syscall (17 us each on the development VM).
_ids = random.Random(os.urandom(32))


def random_id(prefix: str) -> str:
    """`prefix` and 96 random bits in hex, like OpenAI's ids."""
    return f"{prefix}{_ids.getrandbits(96):024x}"


def new_request_id() -> str:
    return random_id("req_")


class HttpConnection:
    """One server-side HTTP/1.1 connection: parsing with limits, and framing."""

    def __init__(self, *, max_body_bytes: int, client: str = "") -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._max_body_bytes = max_body_bytes
        self._client = client
        self._head: h11.Request | None = None
        self._body = bytearray()

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the socket; b"" means the client closed its side."""
        self._h11.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    @property
    def phase(self) -> Phase:
        if self._head is not None:
            return Phase.BODY
        return Phase.HEAD if self._h11.trailing_data[0] else Phase.IDLE

    @property
    def client_waits_for_100_continue(self) -> bool:
        return self._h11.they_are_waiting_for_100_continue

    def next_request(self) -> Request | NeedData | None:
        """The next complete request, NEED_DATA, or None once the client closed.

        Raises ApiError (400, 413, 431) for a request that must be refused; the
        connection must then be closed after the error response.
        """
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _protocol_error(exc) from exc
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.Request):
                self._start_request(event)
            elif isinstance(event, h11.Data):
                self._add_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return self._finish_request()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                # PAUSED cannot happen here (we return at EndOfMessage); treat as closed.
                return None

    def _start_request(self, head: h11.Request) -> None:
        # h11 caps only a head still arriving; one that came whole in a single
        # read is measured here, so the limit holds however the bytes were split.
        if _head_size(head) > MAX_HEAD_BYTES:
            raise _protocol_error(h11.RemoteProtocolError("head too large", error_status_hint=431))
        if len(head.target) > MAX_TARGET_BYTES:
            raise UriTooLong(f"Request target is longer than the limit of {MAX_TARGET_BYTES} bytes.")
        if len(head.headers) > MAX_HEADER_COUNT:
            raise HeaderTooLarge(f"Request has more than the limit of {MAX_HEADER_COUNT} header fields.")
        self._head = head
        self._body.clear()
        length = _content_length(head)
        if length is not None and length > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)

    def _add_body(self, data: bytes) -> None:
        # Counted as it arrives, so a chunked body cannot slip past the cap.
        if len(self._body) + len(data) > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)
        self._body += data

    def _finish_request(self) -> Request:
        head = self._head
        assert head is not None, "h11 ends a message only after its head"
        self._head = None
        return self._request(head, bytes(self._body))

    def unfinished_request(self) -> Request | None:
        """The request whose head arrived but whose body was refused or never came."""
        return self._request(self._head, b"") if self._head is not None else None

    def _request(self, head: h11.Request, body: bytes) -> Request:
        headers = _header_map(head.headers)
        path, _, query = head.target.decode("latin-1").partition("?")
        given_id = headers.get("x-request-id", "")
        return Request(
            method=head.method.decode("latin-1"),
            path=path,
            query=query,
            headers=headers,
            body=body,
            request_id=given_id if REQUEST_ID_RE.match(given_id) else new_request_id(),
            client=self._client,
        )

    # -- sending -----------------------------------------------------------

    def continue_100(self) -> bytes:
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def can_respond(self) -> bool:
        """False once a response was started or the connection is dead."""
        return self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    def response_head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        reason = _reason(status)
        event = h11.Response(status_code=status, headers=headers, reason=reason)
        return self._h11.send(event) or b""

    def body(self, data: bytes) -> bytes:
        return self._h11.send(h11.Data(data=data)) or b""

    def end(self) -> bytes:
        return self._h11.send(h11.EndOfMessage()) or b""

    def start_next_cycle(self) -> bool:
        """Ready the connection for the next request; False if it must close."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False


def _header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _head_size(head: h11.Request) -> int:
    """The head's size on the wire, give or take optional whitespace."""
    request_line = len(head.method) + len(head.target) + len(b" HTTP/1.1\r\n") + 1
    return request_line + sum(len(n) + len(v) + 4 for n, v in head.headers.raw_items()) + 2


def _content_length(head: h11.Request) -> int | None:
    for name, value in head.headers:
        if name == b"content-length":
            return int(value)  # h11 has already checked it is a number
    return None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


def _protocol_error(exc: h11.RemoteProtocolError) -> ApiError:
    if exc.error_status_hint == 431:
        return HeaderTooLarge(f"Request head is larger than the limit of {MAX_HEAD_BYTES} bytes.")
    return InvalidRequest(f"Malformed HTTP request: {exc}")


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
