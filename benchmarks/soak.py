"""Soak: mixed traffic for a while, then check that everything came back down.

    python -m benchmarks.soak [--seconds 600] [--workers 16]

The server runs in this process (so its tasks can be counted), the fake
provider in its own. Workers send plain and streamed chats, conversation
turns, streams they abandon half-way, and bad requests of every kind (broken
JSON, oversized, wrong media type, unknown paths, garbage bytes, heads cut
off). A warm-up round sets the baseline; after the main round, with every
client gone, the server must be back at it:

- live trio tasks and open file descriptors (other than the provider
  connections kept for reuse, which are bounded) equal to the baseline;
- resident memory within a small allowance of it (allocators keep some);
- no provider request still running; every chat request in the audit log.

Exits 1 and says which check failed otherwise. CI runs a 60-second round.
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import httpx
import trio

from benchmarks.servers import fake_provider
from trio_serve.audit import AuditDatabase
from trio_serve.config import ModelConfig, RateLimit, Role, ServerLimits
from trio_serve.providers.transport import MAX_IDLE_PER_ORIGIN
from trio_serve.server import Running, ServeOptions, serve

RSS_ALLOWANCE_MB = 16.0  # growth that allocator caching can explain; a leak under load grows past it
SETTLE_TIMEOUT_S = 10.0  # time for the server to notice every client has gone
MAX_BODY = 64 * 1024
PROVIDER_KEY = "sk-soak"
CHAT = "/v1/chat/completions"


@attrs.define
class Snapshot:
    tasks: int
    fds: int  # open descriptors other than pooled provider connections
    pooled: int  # idle provider connections kept for reuse (bounded by the transport)
    rss_mb: float

    def __str__(self) -> str:
        return f"{self.tasks} tasks, {self.fds} fds (+{self.pooled} pooled upstream), {self.rss_mb:.1f} MB RSS"


@attrs.define
class Traffic:
    sent: Counter[str] = attrs.Factory(Counter)  # action -> count
    statuses: Counter[int] = attrs.Factory(Counter)
    chat_requests: int = 0  # requests to the chat endpoint the server read whole: each is audited
    unexpected: list[str] = attrs.Factory(list)


@attrs.frozen
class Session:
    """What one worker's requests go through: its pooled client, or raw sockets."""

    client: httpx.AsyncClient
    address: tuple[str, int]
    traffic: Traffic


def live_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


def _sockets_to(port: int) -> set[str]:
    """Inodes of this machine's TCP sockets whose remote end is 127.0.0.1:`port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def snapshot(provider_port: int) -> Snapshot:
    gc.collect()
    upstream = _sockets_to(provider_port)
    fds = pooled = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # the descriptor of the listing itself, already closed
        inode = target.removeprefix("socket:[").removesuffix("]")
        if target.startswith("socket:") and inode in upstream:
            pooled += 1
        else:
            fds += 1
    status = Path("/proc/self/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return Snapshot(tasks=live_tasks(), fds=fds, pooled=pooled, rss_mb=rss_kb / 1024)


# -- the traffic ---------------------------------------------------------------------------


async def plain(session: Session) -> int:
    client, traffic = session.client, session.traffic
    traffic.chat_requests += 1
    return (await client.post(CHAT, json=_chat("bench chunks=8"))).status_code


async def streamed(session: Session) -> int:
    client, traffic = session.client, session.traffic
    traffic.chat_requests += 1
    async with client.stream("POST", CHAT, json=_chat("bench chunks=16 delay_ms=1", stream=True)) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    if not body.endswith(b"data: [DONE]\n\n"):
        traffic.unexpected.append(f"a stream ended without [DONE]: {body[-80:]!r}")
    return response.status_code


async def abandoned(session: Session) -> int:
    client, traffic = session.client, session.traffic
    traffic.chat_requests += 1
    async with client.stream("POST", CHAT, json=_chat("bench chunks=500 delay_ms=5", stream=True)) as response:
        async for _ in response.aiter_raw():
            break  # the client leaves mid-stream: httpx closes the connection
    return response.status_code


async def conversation(session: Session) -> int:
    client, traffic = session.client, session.traffic
    traffic.chat_requests += 1
    headers = {"X-Conversation-Id": f"soak-{random.randrange(50)}"}
    return (await client.post(CHAT, json=_chat("bench chunks=4"), headers=headers)).status_code


async def _bad_chat(session: Session, body: bytes, content_type: str = "application/json") -> int:
    session.traffic.chat_requests += 1  # refused, but read whole: audited all the same
    return (await session.client.post(CHAT, content=body, headers={"content-type": content_type})).status_code


async def broken_json(session: Session) -> int:
    return await _bad_chat(session, b'{"messages": [')


async def oversized(session: Session) -> int:
    return await _bad_chat(session, b"x" * (MAX_BODY + 1))


async def form_post(session: Session) -> int:
    return await _bad_chat(session, b"a=b", "application/x-www-form-urlencoded")


async def unknown_path(session: Session) -> int:
    return (await session.client.get("/v1/nothing-here")).status_code


async def garbage(session: Session) -> int:
    async with await trio.open_tcp_stream(*session.address) as stream:
        await stream.send_all(random.randbytes(random.randrange(1, 400)) + b"\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def cut_head(session: Session) -> int:
    async with await trio.open_tcp_stream(*session.address) as stream:
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Le")
    return 0  # closed half-way: nothing to answer


def _chat(prompt: str, *, stream: bool = False) -> dict[str, object]:
    return {"model": "soak", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


Action = Callable[[Session], Awaitable[int]]  # returns the HTTP status, 0 for none
ACTIONS: list[tuple[Action, int]] = [  # and how often each is picked
    (plain, 30), (streamed, 25), (abandoned, 10), (conversation, 10), (broken_json, 5),
    (oversized, 3), (form_post, 3), (unknown_path, 4), (garbage, 5), (cut_head, 5),
]  # fmt: skip
EXPECTED_STATUSES = {0, 200, 400, 404, 408, 413, 415}


async def worker(address: tuple[str, int], until: float, traffic: Traffic) -> None:
    actions = [action for action, _ in ACTIONS]
    weights = [weight for _, weight in ACTIONS]
    host, port = address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
        session = Session(client, address, traffic)
        while trio.current_time() < until:
            action = random.choices(actions, weights)[0]
            traffic.sent[action.__name__] += 1
            status = await action(session)
            traffic.statuses[status] += 1
            if status not in EXPECTED_STATUSES:
                traffic.unexpected.append(f"{action.__name__}: HTTP {status}")


async def round_of(address: tuple[str, int], seconds: float, workers: int, traffic: Traffic) -> None:
    until = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker, address, until, traffic)


async def settled(baseline: Snapshot, provider_port: int) -> Snapshot:
    """A snapshot once the server is back at the baseline's task count, or the last one tried."""
    deadline = trio.current_time() + SETTLE_TIMEOUT_S
    while True:
        now = snapshot(provider_port)
        if (now.tasks <= baseline.tasks and now.fds <= baseline.fds) or trio.current_time() > deadline:
            return now
        await trio.sleep(0.05)  # connections close as the server reads each client's EOF


async def provider_requests_running(provider: tuple[str, int]) -> int:
    async with httpx.AsyncClient() as client:
        stats = await client.get(f"http://{provider[0]}:{provider[1]}/stats")
    return int(stats.json()["answering"])


# -- the run ----------------------------------------------------------------------------------


def soak_role(provider: tuple[str, int]) -> Role:
    model = ModelConfig(provider="openai", name="fake", base_url=f"http://{provider[0]}:{provider[1]}/v1")
    return Role(
        name="soak",
        description="",
        system_prompt="You are a soak test.",
        model=model,
        server=ServerLimits(max_request_body_bytes=MAX_BODY),
        rate_limit=RateLimit(requests_per_minute=10**9, burst_size=10**6),
    )


async def soak(seconds: float, workers: int, folder: Path) -> list[str]:
    """Run the rounds; the failed checks, if any."""
    with fake_provider() as provider:
        database = AuditDatabase.open(folder / "audit.db", {})
        options = ServeOptions(role=soak_role(provider), provider_key=PROVIDER_KEY, audit_db=database)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        warmup, main = Traffic(), Traffic()
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, options, listeners)
            address = running.addresses[0]
            await round_of(address, min(10.0, seconds / 6), workers, warmup)
            baseline = await settled(snapshot(provider[1]), provider[1])
            print(f"baseline after warm-up: {baseline}", flush=True)
            started = time.perf_counter()
            await round_of(address, seconds, workers, main)
            elapsed = time.perf_counter() - started
            after = await settled(baseline, provider[1])
            print(f"after {elapsed:.0f} s of traffic: {after}", flush=True)
            answering = await provider_requests_running(provider)
            running.shutdown()  # returns once the audit writer has written everything
        assert running.audit is not None
        audited = running.audit.written
    report(main, elapsed)
    return checks(baseline, after, answering, audited, warmup.chat_requests + main.chat_requests, main)


def report(traffic: Traffic, elapsed: float) -> None:
    total = sum(traffic.sent.values())
    print(f"{total} requests in {elapsed:.0f} s ({total / elapsed:.0f}/s):", flush=True)
    print("  " + ", ".join(f"{name} {count}" for name, count in traffic.sent.most_common()))
    print("  statuses: " + ", ".join(f"{status or 'closed'}: {n}" for status, n in sorted(traffic.statuses.items())))


def checks(
    baseline: Snapshot, after: Snapshot, answering: int, audited: int, chat_requests: int, traffic: Traffic
) -> list[str]:
    failures = []
    if after.tasks > baseline.tasks:
        failures.append(f"live tasks grew: {baseline.tasks} -> {after.tasks}")
    if after.fds > baseline.fds:
        failures.append(f"open file descriptors grew: {baseline.fds} -> {after.fds}")
    if after.pooled > MAX_IDLE_PER_ORIGIN:
        failures.append(f"{after.pooled} pooled provider connections, more than the pool keeps")
    if after.rss_mb > baseline.rss_mb + RSS_ALLOWANCE_MB:
        failures.append(f"RSS grew {after.rss_mb - baseline.rss_mb:.1f} MB (allowance {RSS_ALLOWANCE_MB:g} MB)")
    if answering:
        failures.append(f"{answering} provider request(s) still running after every client left")
    if audited != chat_requests:
        failures.append(f"audit rows: {audited} written for {chat_requests} chat requests")
    failures += traffic.unexpected[:10]
    print(f"audit: {audited} rows for {chat_requests} chat requests; provider requests still running: {answering}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the main round (default 600)")
    parser.add_argument("--workers", type=int, default=16, help="concurrent clients (default 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trio_serve-soak-") as folder:
        failures = trio.run(soak, args.seconds, args.workers, Path(folder))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak: FAILED" if failures else "soak: ok (back to baseline)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
