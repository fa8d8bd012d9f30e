"""The HTTP exchange with a provider: retries before anything was relayed, and
honest mapping of its failures to our errors (spec section 3), keys redacted.

Retries happen only here, while the provider's response head is awaited, so
nothing has reached our client yet: a retried request can never duplicate or
reorder tokens the client already saw.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson
import trio

from trio_serve import __version__
from trio_serve.errors import ApiError, InvalidRequest, RateLimited, UpstreamError
from trio_serve.providers.base import Batch, Event
from trio_serve.redact import redact
from trio_serve.sse import EventTooLarge, SseDecoder

StreamReader = Callable[[httpx.Response, tuple[str, ...]], AsyncGenerator[Batch, None]]
WholeReader = Callable[[bytes], Batch]

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
CLIENT_ERROR_STATUSES = frozenset({400, 413, 422})  # the request itself was refused
DRAIN_AFTER_END_S = 0.1
MAX_DETAIL_CHARS = 500  # a provider's message is quoted, never its whole body
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a whole (non-streamed) answer; a chat answer is far smaller
MAX_ERROR_BODY_BYTES = 64 * 1024  # enough for any provider's error message
_CONTEXT_RE = re.compile(r"context.length|maximum context|context window|prompt is too long|too many tokens", re.I)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    retries: int = 2  # at most this many more attempts after the first
    backoff_base_s: float = 0.5  # full jitter: a delay in [0, base * 2**attempt)
    backoff_cap_s: float = 4.0
    retry_after_cap_s: float = 10.0  # a provider's Retry-After is honoured up to this

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.retry_after_cap_s)
        return rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))


DEFAULT_RETRY = RetryPolicy()


@attrs.frozen(kw_only=True)
class Upstream:
    """How to reach one provider: the httpx client, its name (for messages) and secrets."""

    client: httpx.AsyncClient
    provider: str
    secrets: tuple[str, ...] = ()
    retry: RetryPolicy = DEFAULT_RETRY
    rng: random.Random = attrs.field(factory=random.Random)

    @asynccontextmanager
    async def answer(
        self, url: str, body: bytes, headers: Mapping[str, str], *, streamed: StreamReader, whole: WholeReader
    ) -> AsyncIterator[AsyncIterator[Batch]]:
        """POST `body` and read the answer in batches of events: with `streamed`
        when it is an event stream, else as one body with `whole`."""
        # Built directly rather than by client.build_request, which merges the
        # client's defaults (base URL, headers, cookies) into every request,
        # work we do not use (a visible share of a request in cProfile).
        request = httpx.Request("POST", _parsed_url(url), content=body, headers=headers)
        async with self.open(request) as response:
            is_stream = is_event_stream(response)
            batches = streamed(response, self.secrets) if is_stream else _whole_answer(response, whole)
            try:
                yield batches
            finally:
                await batches.aclose()

    @asynccontextmanager
    async def open(self, request: httpx.Request) -> AsyncIterator[httpx.Response]:
        """A 2xx response whose body is still to be read; closed on leaving."""
        response = await self._send_with_retries(request)
        try:
            yield response
        finally:
            await response.aclose()

    async def _send_with_retries(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.retry.retries + 1):
            last = attempt == self.retry.retries
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    reason = redact(str(exc), self.secrets) or type(exc).__name__
                    raise UpstreamError(f"The model provider could not be reached: {reason}") from exc
                await trio.sleep(self.retry.delay(attempt, None, self.rng))
                continue
            except httpx.HTTPError as exc:
                raise UpstreamError(f"The model provider failed ({type(exc).__name__}).") from exc
            if response.is_success:
                return response
            if response.status_code in RETRYABLE_STATUSES and not last:
                await response.aclose()
                wait = self.retry.delay(attempt, retry_after_seconds(response.headers.get("retry-after")), self.rng)
                await trio.sleep(wait)
                continue
            raise await self._status_error(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _status_error(self, response: httpx.Response) -> ApiError:
        try:
            body = await read_bounded(response, MAX_ERROR_BODY_BYTES)
        except (httpx.HTTPError, UpstreamError):
            body = b""  # the status says enough
        finally:
            await response.aclose()
        retry_after = response.headers.get("retry-after")
        return status_error(self.provider, response.status_code, body, retry_after, self.secrets)


@functools.lru_cache(maxsize=64)
def _parsed_url(url: str) -> httpx.URL:
    return httpx.URL(url)  # immutable: one parse per provider URL, not per request


def retry_after_seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from APIs; fall back to our own backoff


def status_error(
    provider: str, status: int, body: bytes, retry_after: str | None, secrets: Iterable[str] = ()
) -> ApiError:
    """Our error for a provider's non-2xx answer, its message quoted and redacted."""
    detail = redact(provider_message(body), secrets)
    if status == 429:
        seconds = retry_after_seconds(retry_after)
        wait = str(max(1, round(seconds))) if seconds is not None else "1"
        return RateLimited(
            f"The model provider is rate limiting this server: {detail}", headers=[("retry-after", wait)]
        )
    if status in (401, 403):
        # The provider's own text may quote part of the key: it is not passed on.
        return UpstreamError(
            f"The model provider refused this server's credentials (HTTP {status}); "
            f"check the {provider} API key the server runs with."
        )
    if status in CLIENT_ERROR_STATUSES:
        code = "context_length_exceeded" if _CONTEXT_RE.search(detail) else None
        return InvalidRequest(f"The model provider rejected the request: {detail}", code=code)
    return UpstreamError(f"The model provider failed (HTTP {status}): {detail}")


def provider_message(body: bytes) -> str:
    """The human part of a provider's error body, whatever its shape."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _clip(body.decode("utf-8", "replace").strip() or "no details given")
    for candidate in _message_candidates(parsed):
        if isinstance(candidate, str) and candidate.strip():
            return _clip(candidate.strip())
    return _clip(body.decode("utf-8", "replace"))


def _message_candidates(parsed: object) -> list[object]:
    if not isinstance(parsed, dict):
        return []
    error = parsed.get("error")
    nested = [error.get("message")] if isinstance(error, dict) else [error]
    return [*nested, parsed.get("message"), parsed.get("detail")]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


# -- reading a provider's answer -------------------------------------------------


USER_AGENT = f"trio_serve/{__version__}"
_ACCEPT = {True: {"accept": "text/event-stream"}, False: {"accept": "application/json"}}


def request_headers(*parts: Mapping[str, str]) -> dict[str, str]:
    """A provider's fixed request headers: `parts` merged, later ones winning, with
    our User-Agent unless they name one (in any case of letters)."""
    merged = {name: value for part in parts for name, value in part.items()}
    if not any(name.lower() == "user-agent" for name in merged):
        merged["user-agent"] = USER_AGENT
    return merged


def accepting(headers: Mapping[str, str], *, streamed: bool) -> dict[str, str]:
    """`headers` with the Accept of an event stream or of a whole JSON answer."""
    return {**headers, **_ACCEPT[streamed]}


def is_event_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("text/event-stream")


async def sse_payloads(response: httpx.Response) -> AsyncGenerator[list[str], None]:
    """The `data:` payloads of a streamed answer, a batch for each network read:
    what arrived together is relayed together, in one write to the client."""
    decoder = SseDecoder()
    try:
        async for chunk in response.aiter_bytes():
            batch = decoder.feed(chunk)
            if batch:
                yield batch
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The model provider's stream broke off ({type(exc).__name__}).") from exc
    except EventTooLarge as exc:
        raise UpstreamError(f"The model provider's stream is broken: {exc}.") from None
    tail = decoder.close()
    if tail is not None:
        yield [tail]


def parse_until_failure(payloads: Iterable[str], parse: Callable[[str], list[Event]]) -> tuple[Batch, ApiError | None]:
    """The events of `payloads` in order, up to the first that fails to parse, and
    that failure: events that arrived before garbage in the same read are still relayed."""
    batch: Batch = []
    for data in payloads:
        try:
            batch += parse(data)
        except ApiError as exc:
            return batch, exc
    return batch, None


async def drain(payloads: AsyncGenerator[list[str], None]) -> None:
    """Read what follows the end of an answer (the chunked terminator), so the
    connection goes back to the pool instead of being closed and reopened."""
    with trio.move_on_after(DRAIN_AFTER_END_S):  # a provider that keeps talking is not waited for
        async for _ in payloads:
            pass


async def _whole_answer(response: httpx.Response, parse: WholeReader) -> AsyncGenerator[Batch, None]:
    try:
        body = await read_bounded(response, MAX_ANSWER_BYTES)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The model provider's answer broke off ({type(exc).__name__}).") from exc
    yield parse(body)


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body, or UpstreamError past `limit` bytes: a provider cannot make us buffer without end."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise UpstreamError(f"The model provider's answer is larger than {limit} bytes.")
    return bytes(body)


def json_object(data: str | bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("The model provider sent malformed JSON.") from None
    if not isinstance(value, dict):
        raise UpstreamError("The model provider sent malformed JSON.")
    return value
