"""The checks a request passes before the app answers it: where it came from,
which browser origin may read the answer, and how often a client may ask.

Pure: values in, decisions out; the clock is passed in. The app applies them.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence

import attrs

from trio_serve.http import Response

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# -- rate limiting ---------------------------------------------------------------

MAX_TRACKED_CLIENTS = 100_000  # buckets kept at most; the least recently seen go first
_SWEEP_FLOOR = 1024  # full (idle) buckets are dropped once this many are tracked


@attrs.frozen
class Quota:
    """One client's standing after a request was counted (or refused)."""

    limit: int  # requests per minute
    remaining: int  # requests that may be sent at once from now
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # 0 when the request was allowed

    @property
    def allowed(self) -> bool:
        return self.retry_after_s == 0

    def headers(self) -> tuple[tuple[str, str], ...]:
        """OpenAI's rate-limit headers (the SDKs read them), plus Retry-After when refused."""
        headers = (
            ("x-ratelimit-limit-requests", str(self.limit)),
            ("x-ratelimit-remaining-requests", str(self.remaining)),
            ("x-ratelimit-reset-requests", duration_text(self.reset_s)),
        )
        if self.allowed:
            return headers
        return (
            *headers,
            ("retry-after", str(max(1, math.ceil(self.retry_after_s)))),
            ("retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000)))),
        )


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `per_minute`.

    A bucket that has refilled completely says nothing a new bucket would not,
    so idle clients are forgotten; at most MAX_TRACKED_CLIENTS are kept at all.
    """

    def __init__(self, *, per_minute: int, burst: int, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self._per_minute = per_minute
        self._rate = per_minute / 60.0  # tokens per second
        self._burst = burst
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at); oldest first
        self._sweep_at = _SWEEP_FLOOR

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> Quota:
        """Count one request from `client`, or refuse it if its bucket is empty."""
        tokens = self._tokens(client, now)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)  # re-inserted: the dict stays in order of last use
        self._forget_some(now)
        return Quota(
            limit=self._per_minute,
            remaining=int(tokens),
            reset_s=(self._burst - tokens) / self._rate,
            retry_after_s=0.0 if allowed else (1.0 - tokens) / self._rate,
        )

    def _tokens(self, client: str, now: float) -> float:
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            return float(self._burst)
        tokens, at = bucket
        return min(float(self._burst), tokens + (now - at) * self._rate)

    def _forget_some(self, now: float) -> None:
        while len(self._buckets) > self._max_clients:
            del self._buckets[next(iter(self._buckets))]
        if len(self._buckets) >= self._sweep_at:
            # Amortised: a sweep costs O(n) and runs again only after n more clients.
            full = float(self._burst)
            self._buckets = {c: (t, at) for c, (t, at) in self._buckets.items() if t + (now - at) * self._rate < full}
            self._sweep_at = max(_SWEEP_FLOOR, 2 * len(self._buckets))


def duration_text(seconds: float) -> str:
    """A duration the way OpenAI writes it in x-ratelimit-reset-*: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


# -- CORS --------------------------------------------------------------------------

_EXPOSED = (
    "x-conversation-id, x-request-id, retry-after, retry-after-ms, "
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests"
)
_PREFLIGHT_MAX_AGE_S = 600


class Cors:
    """Which browser origins may call the API; none unless configured ("*" for any)."""

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.rstrip("/") for origin in origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self._any or origin in self._origins)

    def headers(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """Headers for an actual response (errors included)."""
        if not self._origins:
            return ()
        if not self.allows(origin):
            return (("vary", "Origin"),)  # caches must not serve one origin's answer to another
        return (
            ("access-control-allow-origin", "*" if self._any else str(origin)),
            ("access-control-expose-headers", _EXPOSED),
            ("vary", "Origin"),
        )

    def preflight(self, method: str, headers: Mapping[str, str]) -> Response | None:
        """The answer to a CORS preflight from an allowed origin; None if this is not one."""
        origin = headers.get("origin")
        requested = headers.get("access-control-request-method")
        if method != "OPTIONS" or requested is None or not self.allows(origin):
            return None
        allowed = [
            ("access-control-allow-origin", "*" if self._any else str(origin)),
            ("access-control-allow-methods", "GET, POST, HEAD, OPTIONS"),
            ("access-control-max-age", str(_PREFLIGHT_MAX_AGE_S)),
            ("vary", "Origin"),
        ]
        # The SDKs send headers of their own (x-stainless-*): whatever the page
        # asks to send is allowed, the key check still decides who gets in.
        asked = headers.get("access-control-request-headers", "").strip()
        if asked:
            allowed.append(("access-control-allow-headers", asked))
        return Response(status=204, headers=tuple(allowed))


# -- where a request came from -------------------------------------------------------


def is_loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine (localhost, 127.0.0.0/8, [::1]), port or not.

    A page on evil.example that re-points its DNS name at 127.0.0.1 still sends
    `Host: evil.example`: refusing other names stops DNS rebinding.
    """
    name = _host_name(host_header.strip().lower())
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name.rstrip(".")
    return host.rstrip(".")


@attrs.frozen
class ClientView:
    """Who the client is and how it connected, after believing trusted proxies."""

    address: str  # the client's IP address, without the port
    https: bool


@attrs.frozen
class TrustedProxies:
    """Peers whose X-Forwarded-For and X-Forwarded-Proto headers are believed.

    A header from anyone else is the client's own claim and is ignored: a plain
    HTTP client cannot pass for HTTPS, nor for another address, by saying so.
    """

    networks: tuple[Network, ...] = ()
    everyone: bool = False

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """From `--forwarded-allow-ips`: comma-separated addresses or networks, or "*"."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if "*" in items:
            return cls(everyone=True)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an IP address or network: {item!r}") from None
        return cls(networks=tuple(networks))

    def trusts(self, address: str) -> bool:
        if self.everyone:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def view(self, peer: str, headers: Mapping[str, str]) -> ClientView:
        """`peer` is the socket's "host:port"; headers are the request's."""
        address = peer.rpartition(":")[0] or peer
        if not self.trusts(address):
            return ClientView(address=address, https=False)
        proto = headers.get("x-forwarded-proto", "").partition(",")[0].strip().lower()
        return ClientView(address=self._forwarded_client(address, headers), https=proto == "https")

    def _forwarded_client(self, peer: str, headers: Mapping[str, str]) -> str:
        # Each proxy appends the address it saw; the rightmost one we do not
        # trust is the client (anything left of it could be forged by it).
        hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        client = peer
        for hop in reversed(hops):
            client = hop
            if not self.trusts(hop):
                break
        return client


LOOPBACK_PROXIES = TrustedProxies.parse("127.0.0.1,::1")
