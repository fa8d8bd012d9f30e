"""Fault injection end to end: a provider that misbehaves, an audit database
that fails under the server; the server keeps serving and loses nothing.

(Client-side faults, SIGTERM with live streams and SIGKILL are in test_cli.py
and test_server_bytes.py; resets mid-stream in test_e2e.py.)
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from tests.conftest import IO_TIMEOUT_S, StartServer, base_url, make_role, sse_events, upstream_role
from tests.fake_upstream import FakeUpstream, Script
from tests.openai_schema import check_chunk, check_error
from tests.test_audit import EventOnMessage, rows, run_audit
from trio_serve.audit import AuditDatabase
from trio_serve.config import Guardrails
from trio_serve.server import Running, ServeOptions, serve
from trio_serve.sse import MAX_EVENT_BYTES

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def content_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices")
    )


async def post(running: Running, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url(running), timeout=IO_TIMEOUT_S) as client:
        return await client.post("/v1/chat/completions", json=body)


def assert_cut_short_in_band(response: httpx.Response, message: str) -> list[Any]:
    """A stream that had started ends with an error event and [DONE], never a torn connection."""
    assert response.status_code == 200
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    check_error(events[-2])
    assert events[-2]["error"]["type"] == "upstream_error"
    assert message in events[-2]["error"]["message"]
    for chunk in events[:-2]:
        check_chunk(chunk)
    return events


# -- the provider misbehaves --------------------------------------------------------------


async def test_a_provider_trickling_bytes_one_at_a_time_is_relayed_whole(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=upstream.api_key)
        upstream.script(Script(trickle_s=0.0002), Script(trickle_s=0.0))
        streamed = await post(running, STREAM)
        assert content_of(sse_events(streamed.content)) == "Hello, world"
        plain = await post(running, CHAT)
        assert plain.json()["choices"][0]["message"]["content"] == "Hello, world"


async def test_invalid_sse_mid_stream_ends_the_stream_in_band(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=upstream.api_key)
        upstream.script(Script(garbage=b"data: {this is not json\n\n"), Script(garbage=b"data: [1, 2]\n\n"))
        events = assert_cut_short_in_band(await post(running, STREAM), "malformed")
        assert content_of(events) == "Hello, world"  # what came before the garbage was relayed
        plain = await post(running, CHAT)
        assert plain.status_code == 502
        check_error(plain.json())


async def test_a_5_mb_event_is_refused_not_buffered(start_server: StartServer, upstream: FakeUpstream) -> None:
    huge = {"choices": [{"index": 0, "delta": {"content": "x" * 5_000_000}, "finish_reason": None}]}
    frame = b"data: " + orjson.dumps(huge) + b"\n\n"
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=upstream.api_key)
        upstream.script(Script(garbage=frame))
        response = await post(running, STREAM)
        events = assert_cut_short_in_band(response, f"larger than {MAX_EVENT_BYTES} bytes")
        assert len(response.content) < MAX_EVENT_BYTES  # nothing of the 5 MB reached the client
        assert content_of(events) == "Hello, world"
        assert (await post(running, CHAT)).status_code == 200  # and the server goes on


async def test_a_provider_that_hangs_is_a_504_after_the_time_limit(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    role = attrs.evolve(upstream_role(upstream), guardrails=Guardrails(timeout_seconds=1.0))
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(role, provider_key=upstream.api_key)
        upstream.script(Script(hang=True))
        response = await post(running, CHAT)
        assert response.status_code == 504
        check_error(response.json())
        exchange = upstream.exchanges[-1]
        with trio.fail_after(1):
            await exchange.closed.wait()  # the hanging request was given up, not left open


async def test_a_5xx_storm_is_retried_a_bounded_number_of_times(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    clients = 20
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=upstream.api_key)
        upstream.default = Script(status=500, error={"message": "overloaded"})
        answers: list[int] = []

        async def one() -> None:
            answers.append((await post(running, CHAT)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one)
        assert answers == [502] * clients
        assert len(upstream.exchanges) == clients * 3  # the first try and two retries each, no more
        upstream.default = Script()
        assert (await post(running, CHAT)).status_code == 200  # the storm passed: serving as before


# -- the audit database fails under the server -----------------------------------------------


class FaultyDatabase(AuditDatabase):
    """The real database, with a handle on the writer's connection to inject faults.

    `PRAGMA query_only` makes every write fail as on a read-only file
    (SQLITE_READONLY); `PRAGMA max_page_count` as on a full disk (SQLITE_FULL).
    """

    connection: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        self.connection = super().connect()
        return self.connection

    async def pragma(self, statement: str) -> None:
        connection = self.connection
        assert connection is not None, "the writer has not connected yet"
        await trio.to_thread.run_sync(connection.execute, statement)


@asynccontextmanager
async def audited_server(database: AuditDatabase) -> AsyncIterator[httpx.AsyncClient]:
    """Serve with `database`; on leaving, shut down and wait until the writer has drained."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, ServeOptions(role=make_role(), audit_db=database), listeners)
        async with httpx.AsyncClient(base_url=base_url(running), timeout=IO_TIMEOUT_S) as client:
            yield client
        running.shutdown()


@asynccontextmanager
async def writer_fails() -> AsyncIterator[trio.Event]:
    """An event set when the audit writer reports it cannot write."""
    failing = trio.Event()
    handler = EventOnMessage("cannot write", failing)
    logger = logging.getLogger("trio_serve.audit")
    logger.addHandler(handler)
    try:
        yield failing
    finally:
        logger.removeHandler(handler)


async def chats(client: httpx.AsyncClient, count: int) -> None:
    for _ in range(count):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def assert_serving_survives(tmp_path: Path, fault: str, repair: str) -> None:
    database = FaultyDatabase.open(tmp_path / "audit.db", {}, busy_timeout_s=0.01)
    assert isinstance(database, FaultyDatabase)
    with trio.fail_after(IO_TIMEOUT_S):
        async with writer_fails() as failing, audited_server(database) as client:
            await chats(client, 5)
            await database.pragma(fault)
            await chats(client, 20)  # served all the same
            await failing.wait()
            await database.pragma(repair)
            await chats(client, 5)
    stored = rows(database)
    assert len(stored) == 30  # every row kept in memory and written after the repair
    assert [row["status"] for row in stored] == [200] * 30
    assert run_audit(database, "verify")[0] == 0


async def test_a_read_only_audit_database_loses_no_row(tmp_path: Path) -> None:
    await assert_serving_survives(tmp_path, "PRAGMA query_only = 1", "PRAGMA query_only = 0")


async def test_a_full_disk_under_the_audit_database_loses_no_row(tmp_path: Path) -> None:
    database_pages = "PRAGMA max_page_count = 1"  # lower than the file: no page can be added
    await assert_serving_survives(tmp_path, database_pages, "PRAGMA max_page_count = 1073741823")


LOCK_HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
connection.execute("ROLLBACK")
"""


async def test_an_audit_database_locked_by_another_process_loses_no_row(tmp_path: Path) -> None:
    database = AuditDatabase.open(tmp_path / "audit.db", {}, busy_timeout_s=0.01)
    with trio.fail_after(IO_TIMEOUT_S):
        async with writer_fails() as failing, audited_server(database) as client:
            holder = await trio.lowlevel.open_process(
                [sys.executable, "-c", LOCK_HOLDER, str(database.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert holder.stdout is not None and holder.stdin is not None
            assert await holder.stdout.receive_some(100) == b"locked\n"
            await chats(client, 20)
            await failing.wait()
            await holder.stdin.aclose()  # the other process lets go
            assert await holder.wait() == 0
            await chats(client, 5)
    assert len(rows(database)) == 25
    assert run_audit(database, "verify")[0] == 0
