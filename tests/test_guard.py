"""The request checks on their own: rate buckets, CORS, Host names, trusted proxies."""

from __future__ import annotations

import pytest

from trio_serve.guard import (
    LOOPBACK_PROXIES,
    ClientView,
    Cors,
    RateLimiter,
    TrustedProxies,
    duration_text,
    is_loopback_host,
)

# -- rate limiting ------------------------------------------------------------------


def test_a_burst_is_allowed_then_refused_until_a_token_refills() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)  # one token a second
    quotas = [limiter.take("a", now=100.0) for _ in range(4)]
    assert [q.allowed for q in quotas] == [True, True, True, False]
    assert [q.remaining for q in quotas] == [2, 1, 0, 0]
    assert quotas[3].retry_after_s == pytest.approx(1.0)
    assert not limiter.take("a", now=100.9).allowed
    assert limiter.take("a", now=101.0).allowed


def test_clients_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(per_minute=60, burst=1)
    assert limiter.take("a", now=0.0).allowed
    assert not limiter.take("a", now=0.0).allowed
    assert limiter.take("b", now=0.0).allowed


def test_refusals_do_not_spend_tokens() -> None:
    limiter = RateLimiter(per_minute=60, burst=1)
    limiter.take("a", now=0.0)
    for _ in range(100):  # hammering while empty must not push the next token further away
        limiter.take("a", now=0.5)
    assert limiter.take("a", now=1.0).allowed


def test_quota_headers_follow_openai_and_add_retry_after_when_refused() -> None:
    limiter = RateLimiter(per_minute=30, burst=2)  # a token every 2 s
    allowed = dict(limiter.take("a", now=0.0).headers())
    assert allowed == {
        "x-ratelimit-limit-requests": "30",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "2s",
    }
    limiter.take("a", now=0.0)
    refused = dict(limiter.take("a", now=0.5).headers())
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused["retry-after"] == "2"  # 1.5 s, rounded up: never earlier than a token exists
    assert refused["retry-after-ms"] == "1500"


def test_idle_clients_are_forgotten() -> None:
    limiter = RateLimiter(per_minute=60, burst=10)
    for client in range(5000):
        limiter.take(f"c{client}", now=0.0)
    assert len(limiter) == 5000  # all still owe a token
    for client in range(4000):  # ten seconds later, everyone above has refilled
        limiter.take(f"d{client}", now=10.0)
    assert len(limiter) == 4000  # a sweep (amortised: once the count has doubled) dropped them


def test_the_number_of_tracked_clients_is_capped() -> None:
    limiter = RateLimiter(per_minute=1, burst=1, max_clients=100)  # nobody refills within the test
    for client in range(1000):
        limiter.take(f"c{client}", now=0.0)
    assert len(limiter) == 100
    assert limiter.take("c999", now=0.0).allowed is False  # the most recent are the ones kept


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.02, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (60.0, "1m0s"), (360.0, "6m0s"), (90.25, "1m30.25s")],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


# -- CORS -----------------------------------------------------------------------------

ORIGIN = "https://app.example"
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST"}


def test_no_configured_origin_means_no_cors_at_all() -> None:
    cors = Cors(())
    assert cors.headers(ORIGIN) == ()
    assert cors.preflight("OPTIONS", PREFLIGHT) is None


def test_an_allowed_origin_is_echoed_and_our_headers_exposed() -> None:
    headers = dict(Cors([ORIGIN + "/"]).headers(ORIGIN))
    assert headers["access-control-allow-origin"] == ORIGIN
    exposed = headers["access-control-expose-headers"].split(", ")
    assert {"x-conversation-id", "x-request-id", "retry-after"} <= set(exposed)
    assert headers["vary"] == "Origin"


def test_another_origin_gets_no_allow_origin() -> None:
    cors = Cors([ORIGIN])
    assert dict(cors.headers("https://evil.example")) == {"vary": "Origin"}
    assert cors.preflight("OPTIONS", {**PREFLIGHT, "origin": "https://evil.example"}) is None


def test_a_preflight_allows_the_headers_the_page_asks_for() -> None:
    asked = {**PREFLIGHT, "access-control-request-headers": "authorization, content-type, x-stainless-os"}
    response = Cors([ORIGIN]).preflight("OPTIONS", asked)
    assert response is not None and response.status == 204
    headers = dict(response.headers)
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert "POST" in headers["access-control-allow-methods"]


def test_a_plain_options_request_is_not_a_preflight() -> None:
    assert Cors([ORIGIN]).preflight("OPTIONS", {"origin": ORIGIN}) is None
    assert Cors([ORIGIN]).preflight("POST", PREFLIGHT) is None


def test_the_wildcard_allows_any_origin() -> None:
    assert dict(Cors(["*"]).headers("https://anything.example"))["access-control-allow-origin"] == "*"


# -- Host names and proxies ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "LOCALHOST.", "api.localhost:80", "127.0.0.1", "127.1.2.3:9", "[::1]:8000"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", "10.0.0.1", ""]
)
def test_other_hosts(host: str) -> None:
    assert not is_loopback_host(host)


def test_forwarded_headers_from_an_untrusted_peer_are_ignored() -> None:
    proxies = TrustedProxies.parse("10.0.0.1")
    forged = {"x-forwarded-proto": "https", "x-forwarded-for": "1.2.3.4"}
    assert proxies.view("192.0.2.7:5000", forged) == ClientView(address="192.0.2.7", https=False)


def test_a_trusted_proxy_vouches_for_https_and_the_client_address() -> None:
    proxies = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1")
    # The client forged the first hop; the proxy appended what it saw.
    headers = {"x-forwarded-proto": "https", "x-forwarded-for": "6.6.6.6, 203.0.113.9, 10.0.0.2"}
    assert proxies.view("10.0.0.1:443", headers) == ClientView(address="203.0.113.9", https=True)
    assert proxies.view("10.0.0.1:443", {}) == ClientView(address="10.0.0.1", https=False)


def test_loopback_proxies_are_trusted_by_default() -> None:
    assert LOOPBACK_PROXIES.view("::1:5000", {"x-forwarded-proto": "https"}).https
    assert not LOOPBACK_PROXIES.view("192.0.2.1:5000", {"x-forwarded-proto": "https"}).https


def test_everyone_can_be_trusted_and_bad_entries_are_named() -> None:
    assert TrustedProxies.parse("*").trusts("198.51.100.1")
    with pytest.raises(ValueError, match="'nonsense'"):
        TrustedProxies.parse("127.0.0.1,nonsense")
