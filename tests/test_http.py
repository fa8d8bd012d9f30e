"""The HTTP layer and the SSE decoder without IO: bytes in, values out."""

from __future__ import annotations

import pytest

from trio_serve.errors import HeaderTooLarge, InvalidRequest, PayloadTooLarge
from trio_serve.http import MAX_HEAD_BYTES, NEED_DATA, HttpConnection, Phase, Request
from trio_serve.sse import SseDecoder


def feed(data: bytes, max_body: int = 100) -> HttpConnection:
    http = HttpConnection(max_body_bytes=max_body, client="1.2.3.4:5")
    http.receive_data(data)
    return http


def test_a_complete_request_becomes_a_request_value() -> None:
    http = feed(
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Accept: a\r\nAccept: b\r\nContent-Length: 2\r\n\r\n{}"
    )
    request = http.next_request()
    assert isinstance(request, Request)
    assert (request.method, request.path, request.query, request.body) == ("POST", "/v1/chat/completions", "x=1", b"{}")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "a, b"
    assert request.client == "1.2.3.4:5"
    assert request.request_id.startswith("req_")


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123", True), ("x" * 128, True), ("x" * 129, False), ("bad id", False), ("", False)],
)
def test_client_request_id_is_echoed_only_when_sane(given: str, kept: bool) -> None:
    request = feed(f"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: {given}\r\n\r\n".encode()).next_request()
    assert isinstance(request, Request)
    assert (request.request_id == given) is kept


def test_partial_input_needs_data_and_reports_its_phase() -> None:
    http = HttpConnection(max_body_bytes=100)
    assert http.phase is Phase.IDLE
    http.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\n")
    assert http.next_request() is NEED_DATA
    assert http.phase is Phase.HEAD
    http.receive_data(b"Content-Length: 4\r\n\r\nab")
    assert http.next_request() is NEED_DATA
    assert http.phase is Phase.BODY
    http.receive_data(b"cd")
    request = http.next_request()
    assert isinstance(request, Request) and request.body == b"abcd"


def test_content_length_over_the_cap_is_refused_before_reading_the_body() -> None:
    with pytest.raises(PayloadTooLarge, match="limit of 100 bytes"):
        feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n").next_request()


def test_chunked_body_over_the_cap_is_refused_while_it_arrives() -> None:
    http = feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"a" * 64 + b"\r\n")
    assert http.next_request() is NEED_DATA  # 64 of 100 bytes: still fine
    http.receive_data(b"40\r\n" + b"a" * 64 + b"\r\n")
    with pytest.raises(PayloadTooLarge):
        http.next_request()


def test_chunked_body_under_the_cap_is_joined() -> None:
    http = feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    request = http.next_request()
    assert isinstance(request, Request) and request.body == b"{}"


def test_head_over_16_kib_is_431() -> None:
    http = feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
    with pytest.raises(HeaderTooLarge) as info:
        http.next_request()
    assert info.value.status == 431


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n",
     b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n"],
)  # fmt: skip
def test_malformed_requests_are_400(garbage: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        feed(garbage).next_request()
    assert info.value.status == 400


def test_client_closing_between_requests_is_none() -> None:
    http = HttpConnection(max_body_bytes=10)
    http.receive_data(b"")
    assert http.next_request() is None


def test_pipelined_requests_come_out_one_per_cycle() -> None:
    http = feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    first = http.next_request()
    assert isinstance(first, Request) and first.path == "/a"
    http.response_head(200, [("content-length", "0")])
    http.end()
    assert http.start_next_cycle()
    second = http.next_request()
    assert isinstance(second, Request) and second.path == "/b"


def test_response_framing_has_reason_phrase_and_chunked_streams() -> None:
    http = feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(http.next_request(), Request)
    head = http.response_head(200, [("content-type", "text/event-stream")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert http.body(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    assert http.end() == b"0\r\n\r\n"


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SseDecoder()
    lines = [": keep-alive", "", 'data: {"a":', "data: 1}", "", "event: x", "data:[DONE]", ""]
    events = [event for line in lines if (event := decoder.feed_line(line)) is not None]
    assert events == ['{"a":\n1}', "[DONE]"]
    assert decoder.close() is None


@pytest.mark.parametrize("split_at", [1, 5, 17, 30, 1000])
def test_sse_decoder_reads_bytes_however_they_were_split(split_at: int) -> None:
    stream = b'data: {"a": 1}\r\n\r\n: ping\n\ndata: \xc3\xa9t\xc3\xa9\n\ndata: [DONE]\n\n'
    decoder = SseDecoder()
    events = decoder.feed(stream[:split_at]) + decoder.feed(stream[split_at:])
    assert events == ['{"a": 1}', "été", "[DONE]"]


def test_sse_decoder_returns_an_unterminated_last_event_on_close() -> None:
    decoder = SseDecoder()
    assert decoder.feed_line("data: last") is None
    assert decoder.close() == "last"
