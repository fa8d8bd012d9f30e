"""Shared fixtures: a fake provider and the real server, both on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import pytest
import trio

from tests.fake_upstream import FakeUpstream
from trio_serve.config import ModelConfig, RateLimit, Role, ServerLimits
from trio_serve.providers.upstream import RetryPolicy
from trio_serve.server import Running, ServeOptions, serve

IO_TIMEOUT_S = 10  # every IO test runs under trio.fail_after(IO_TIMEOUT_S)
CLIENT_KEY = "client-secret-key"
FAST_RETRY = RetryPolicy(backoff_base_s=0.001, retry_after_cap_s=0.01)  # real sockets: no mock clock


UNLIMITED = RateLimit(requests_per_minute=10**9, burst_size=10**6)


def make_role(
    *, agent: str = "test-agent", max_body: int = 1_048_576, rate_limit: RateLimit = UNLIMITED, **model: Any
) -> Role:
    """A role whose model fields default to the built-in echo provider.

    Unlimited unless a test asks for a rate limit: most tests send requests
    faster than the default 60 a minute allows."""
    fields = {"provider": "echo", "name": "echo", **model}
    return Role(
        name=agent,
        description="",
        system_prompt="You are a test agent.",
        model=ModelConfig(**fields),
        server=ServerLimits(max_request_body_bytes=max_body),
        rate_limit=rate_limit,
    )


def upstream_role(upstream: FakeUpstream, wire: str = "openai", **model: Any) -> Role:
    """A role served by the fake provider, in either wire format."""
    if wire == "anthropic":
        return make_role(provider="anthropic", name="claude-test", base_url=upstream.root_url, **model)
    return make_role(provider="openai", name="gpt-test", base_url=upstream.base_url, **model)


StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream()
    await nursery.start(fake.run)
    return fake


@pytest.fixture
def start_server(nursery: trio.Nursery) -> StartServer:
    """Start the real server (the same `serve` the CLI runs) on a free port."""

    async def start(role: Role, **options: Any) -> Running:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        options.setdefault("retry", FAST_RETRY)
        return await nursery.start(serve, ServeOptions(role=role, **options), listeners)

    return start


def base_url(running: Running) -> str:
    host, port = running.addresses[0]
    return f"http://{host}:{port}"


def sse_events(body: bytes) -> list[Any]:
    """Parse an SSE body into the JSON of each `data:` frame ("[DONE]" kept as is)."""
    events: list[Any] = []
    for frame in body.decode().split("\n\n"):
        if not frame.strip() or frame.startswith(":"):
            continue
        assert frame.startswith("data: "), f"not an SSE data frame: {frame!r}"
        data = frame.removeprefix("data: ")
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def evolve_model(role: Role, **changes: Any) -> Role:
    return attrs.evolve(role, model=attrs.evolve(role.model, **changes))
