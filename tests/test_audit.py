"""The audit log: a real SQLite file, the batching writer, and `initrunner audit`."""

from __future__ import annotations

import argparse
import io
import logging
import sqlite3
import stat
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.conftest import IO_TIMEOUT_S, make_role
from trio_serve import audit_cli
from trio_serve.audit import BATCH_ROWS, AuditDatabase, AuditLog, AuditRecord, key_path
from trio_serve.cli import build_parser
from trio_serve.errors import StartupError
from trio_serve.server import Running, ServeOptions, serve

SERVER_KEY = "server-key-0123456789"
PROVIDER_KEY = "sk-provider-0123456789abcdef"


def record(number: int = 0, **changes: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "ts": f"2026-12-04T10:{number // 60 % 60:02d}:{number % 60:02d}.000+00:00",
        "request_id": f"req_{number}",
        "agent_name": "agent",
        "provider": "echo",
        "model": "echo",
        "conversation_id": None,
        "client_addr": "127.0.0.1:5000",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "stream": False,
        "cancelled": False,
        "user_prompt": f"prompt {number}",
        "output": f"answer {number}",
        "tokens_in": 3,
        "tokens_out": 2,
        "total_tokens": 5,
        "duration_ms": 1.5 + number,
        "ttft_ms": 0.5,
        "error": None,
    }
    return AuditRecord(**{**fields, **changes})


def open_db(tmp_path: Path, **kwargs: Any) -> AuditDatabase:
    return AuditDatabase.open(tmp_path / "private" / "audit.db", {}, **kwargs)


def rows(database: AuditDatabase, query: str = "SELECT * FROM audit_log ORDER BY id") -> list[sqlite3.Row]:
    with sqlite3.connect(database.path) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute(query).fetchall()


def test_the_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    assert stat.S_IMODE(database.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(database.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path(database.path).stat().st_mode) == 0o600
    with sqlite3.connect(database.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in connection.execute("PRAGMA table_info(audit_log)")]
        indexes = {row[1] for row in connection.execute("PRAGMA index_list(audit_log)")}
    assert columns[:3] == ["id", "ts", "request_id"] and columns[-2:] == ["prev_hash", "record_hash"]
    assert {"audit_log_ts", "audit_log_agent", "audit_log_conversation", "audit_log_request"} <= indexes


def test_an_unusable_path_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError, match=r"cannot use the audit database .*file/audit.db"):
        AuditDatabase.open(blocker / "audit.db", {})
    with pytest.raises(StartupError, match="is a directory"):
        AuditDatabase.open(tmp_path, {})


def test_the_key_can_come_from_the_environment(tmp_path: Path) -> None:
    database = AuditDatabase.open(tmp_path / "audit.db", {"INITRUNNER_AUDIT_HMAC_KEY": "from-env"})
    assert database.key == b"from-env"
    assert not key_path(database.path).exists()


async def write_all(database: AuditDatabase, records: list[AuditRecord], **kwargs: Any) -> AuditLog:
    audit = AuditLog(database, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for item in records:
            audit.record(item)
        audit.close()
    return audit


async def test_every_queued_row_is_written_in_order_and_the_chain_verifies(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    with trio.fail_after(IO_TIMEOUT_S):
        audit = await write_all(database, [record(n) for n in range(1234)])
    assert (audit.written, audit.dropped) == (1234, 0)
    stored = rows(database)
    assert [row["request_id"] for row in stored] == [f"req_{n}" for n in range(1234)]
    assert [row["id"] for row in stored] == list(range(1, 1235))
    assert run_audit(database, "verify") == (0, f"{database.path}: 1234 rows checked, chain intact\n")


async def test_secrets_are_scrubbed_before_storing(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    leaky = record(
        user_prompt=f"my key is {SERVER_KEY} and Bearer abc.def, also sk-abcdefghijklmnop",
        output=f"the provider key is {PROVIDER_KEY}",
        error="Authorization: Bearer zzz",
    )
    with trio.fail_after(IO_TIMEOUT_S):
        await write_all(database, [leaky], secrets=(SERVER_KEY, PROVIDER_KEY))
    stored = dict(rows(database)[0])
    text = " ".join(str(value) for value in stored.values())
    for secret in (SERVER_KEY, PROVIDER_KEY, "abc.def", "abcdefghijklmnop", "zzz"):
        assert secret not in text
    assert stored["user_prompt"] == "my key is [redacted] and Bearer [redacted], also sk-[redacted]"


class EventOnMessage(logging.Handler):
    """Sets a trio event when a log message contains some text (the writer logs from its task)."""

    def __init__(self, text: str, event: trio.Event) -> None:
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_locked_database_is_retried_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = open_db(tmp_path, busy_timeout_s=0.01)
    blocker = sqlite3.connect(database.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    audit = AuditLog(database)
    failing = trio.Event()
    logger = logging.getLogger("trio_serve.audit")
    handler = EventOnMessage("cannot write", failing)
    logger.addHandler(handler)
    try:
        with trio.fail_after(IO_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(audit.run)
                for n in range(100):
                    audit.record(record(n))
                await failing.wait()  # the writer met the lock and said so
                blocker.execute("ROLLBACK")
                blocker.close()
                for n in range(100, 150):
                    audit.record(record(n))
                audit.close()
    finally:
        logger.removeHandler(handler)
    assert (audit.written, audit.dropped) == (150, 0)
    assert len(rows(database)) == 150
    assert caplog.text.count("cannot write") == 1  # logged once per outage
    assert "writing to" in caplog.text and "again" in caplog.text


def test_a_full_channel_drops_and_counts_rather_than_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(open_db(tmp_path), capacity=10)
    for n in range(25):
        audit.record(record(n))  # no writer is running: the channel fills
    assert audit.dropped == 15
    assert "15 record(s) dropped" not in caplog.text and "1 record(s) dropped" in caplog.text


def run_audit(database: AuditDatabase, *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(["audit", *argv])
    out = io.StringIO()
    status = audit_cli.run(args, database.path, {}, out)
    return status, out.getvalue()


async def written(tmp_path: Path, count: int = 10) -> AuditDatabase:
    database = open_db(tmp_path)
    await write_all(database, [record(n) for n in range(count)])
    return database


async def test_verify_finds_a_modified_row(tmp_path: Path) -> None:
    database = await written(tmp_path)
    with sqlite3.connect(database.path) as connection:
        connection.execute("UPDATE audit_log SET output = 'forged' WHERE id = 4")
    status, out = run_audit(database, "verify")
    assert status == 1
    assert "row 4: modified since it was written" in out and "chain BROKEN" in out


async def test_verify_finds_a_deleted_row(tmp_path: Path) -> None:
    database = await written(tmp_path)
    with sqlite3.connect(database.path) as connection:
        connection.execute("DELETE FROM audit_log WHERE id = 5")
    status, out = run_audit(database, "verify")
    assert status == 1
    assert "rows 5-5 are missing" in out and "row 6: does not chain to the row before it" in out


async def test_verify_without_the_key_is_a_one_line_error(tmp_path: Path) -> None:
    database = await written(tmp_path)
    key_path(database.path).unlink()
    with pytest.raises(audit_cli.AuditCliError, match="no audit key"):
        run_audit(database, "verify")


async def test_prune_keeps_a_chain_that_still_verifies(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    old = [record(n, ts=f"2020-01-01T00:00:0{n}.000+00:00") for n in range(5)]
    new = [record(n, ts=f"2099-01-01T00:00:0{n}.000+00:00") for n in range(5, 8)]
    await write_all(database, old + new)
    assert run_audit(database, "prune", "--older-than", "30")[1].endswith("5 rows older than 30 days deleted\n")
    assert [row["id"] for row in rows(database)] == [6, 7, 8]
    assert run_audit(database, "verify")[0] == 0
    await write_all(database, [record(9)])  # new rows chain on from the pruned tail
    assert run_audit(database, "verify") == (0, f"{database.path}: 4 rows checked, chain intact\n")


async def test_export_filters_and_formats(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    await write_all(
        database,
        [record(0, status=400), record(1, conversation_id="c1"), record(2, conversation_id="c1", agent_name="x")],
    )
    status, out = run_audit(database, "export", "--conversation", "c1")
    lines = [line for line in out.splitlines() if line]
    assert status == 0 and len(lines) == 2
    assert '"request_id":"req_1"' in lines[0] and '"stream":false' in lines[0]
    assert run_audit(database, "export", "--status", "400")[1].count("\n") == 1
    assert run_audit(database, "export", "--agent", "x", "--format", "csv")[1].splitlines()[1].startswith("3,")
    assert run_audit(database, "export", "--limit", "1")[1].count('"id":3') == 1
    assert run_audit(database, "export", "--since", "2030-01-01")[1] == ""
    assert run_audit(database, "export", "--until", "2026-12-04T10:00:01")[1].count("\n") == 2


def test_relative_and_iso_times() -> None:
    now = audit_cli.datetime(2026, 12, 4, 12, 0, tzinfo=audit_cli.UTC)
    assert audit_cli.parse_time("2h", now) == "2026-12-04T10:00:00.000+00:00"
    assert audit_cli.parse_time("7d", now) == "2026-11-27T12:00:00.000+00:00"
    assert audit_cli.parse_time("2026-12-01", now) == "2026-12-01T00:00:00.000+00:00"
    with pytest.raises(audit_cli.AuditCliError, match="not a time"):
        audit_cli.parse_time("yesterday", now)


async def test_stats_is_a_table_a_person_can_read(tmp_path: Path) -> None:
    database = open_db(tmp_path)
    await write_all(database, [record(n, status=200 if n % 5 else 400, cancelled=n == 3) for n in range(20)])
    status, out = run_audit(database, "stats")
    assert status == 0
    assert "20 requests from 2026-12-04T10:00:00.000+00:00" in out
    assert "200" in out and "16" in out and "400" in out
    assert "duration ms" in out and "p99" in out
    assert "tokens in 60, out 40" in out
    assert "cancelled by the client 1" in out


def test_a_missing_database_is_one_line(tmp_path: Path) -> None:
    args = argparse.Namespace(audit_command="stats")
    with pytest.raises(audit_cli.AuditCliError, match="no audit database at"):
        audit_cli.run(args, tmp_path / "none.db", {})


# -- end to end: what the server records ---------------------------------------------


async def serve_then_stop(tmp_path: Path, requests: Any, role: Any = None, **options: Any) -> AuditDatabase:
    """Serve with an audit log, run `requests`, shut down; the writer has drained by then."""
    database = open_db(tmp_path)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    role = role or attrs.evolve(make_role(max_body=2000), name="audited")
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, ServeOptions(role=role, audit_db=database, **options), listeners)
        host, port = running.addresses[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=IO_TIMEOUT_S) as client:
            await requests(client)
        running.shutdown()  # serve returns once the audit writer has drained
    return database


async def test_every_chat_request_is_recorded_refusals_included(tmp_path: Path) -> None:
    key = {"authorization": f"Bearer {SERVER_KEY}"}
    chat = {"messages": [{"role": "user", "content": "Hello sk-abcdefghijklmnopqrst"}]}

    async def requests(client: httpx.AsyncClient) -> None:
        assert (await client.post("/v1/chat/completions", json=chat, headers=key)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=key)
        assert streamed.status_code == 200
        refusals = [
            client.post(
                "/v1/chat/completions", content=b"{bad json", headers={**key, "content-type": "application/json"}
            ),
            client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer wrong"}),
            client.post(
                "/v1/chat/completions", content=b"x" * 5000, headers={**key, "content-type": "application/json"}
            ),
            client.post("/v1/chat/completions", content=b"a=b", headers={**key, "content-type": "text/plain"}),
            client.get("/v1/chat/completions", headers=key),
        ]
        for expected, refusal in zip([400, 401, 413, 415, 405], refusals, strict=True):
            assert (await refusal).status_code == expected
        assert (await client.get("/v1/models", headers=key)).status_code == 200  # not a chat: not recorded

    with trio.fail_after(IO_TIMEOUT_S):
        database = await serve_then_stop(tmp_path, requests, api_key=SERVER_KEY)
    stored = rows(database)
    assert [row["status"] for row in stored] == [200, 200, 400, 401, 413, 415, 405]
    plain, streamed = stored[0], stored[1]
    assert (plain["stream"], streamed["stream"]) == (0, 1)
    assert plain["agent_name"] == "audited" and plain["provider"] == "echo"
    assert plain["user_prompt"] == "Hello sk-[redacted]"
    assert plain["output"] == "You said: Hello sk-[redacted]"
    assert (plain["tokens_in"], plain["tokens_out"], plain["total_tokens"]) == (7, 4, 11)
    assert plain["duration_ms"] > 0 and plain["ttft_ms"] is not None
    assert plain["client_addr"].startswith("127.0.0.1:")
    assert "Incorrect API key" in stored[3]["error"]
    assert all(SERVER_KEY not in str(dict(row)) for row in stored)
    assert run_audit(database, "verify")[0] == 0


async def test_a_client_that_leaves_is_recorded_as_cancelled(tmp_path: Path) -> None:
    slow = {"messages": [{"role": "user", "content": "word " * 50}], "stream": True}

    async def requests(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=slow) as response:
            received = b""
            async for chunk in response.aiter_bytes():
                received += chunk
                if b'"You"' in received:
                    break  # the first word, then gone

    with trio.fail_after(IO_TIMEOUT_S):
        database = await serve_then_stop(tmp_path, requests, role=make_role(delay_ms=50))
    (row,) = rows(database)
    assert (row["status"], row["stream"], row["cancelled"]) == (200, 1, 1)
    assert row["output"] == "You"  # what had been relayed when the client left


async def test_queued_rows_are_taken_without_a_scheduler_round_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load every checkpoint waits for all runnable tasks: a writer that
    # took one queued row per checkpoint fell behind a busy server (the soak
    # found it) and the queue overflowed.
    database = open_db(tmp_path)
    rounds = 0
    rounds_at_handoff: list[int] = []  # when each batch (or the connect) went to a worker thread
    run_sync = trio.to_thread.run_sync

    async def counting_run_sync(fn: Any, *args: Any) -> Any:
        rounds_at_handoff.append(rounds)
        return await run_sync(fn, *args)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    audit = AuditLog(database)
    for n in range(BATCH_ROWS):
        audit.record(record(n))

    async def busy() -> None:  # a runnable task: each of its loops is one scheduler round
        nonlocal rounds
        while True:
            rounds += 1
            await trio.sleep(0)

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as load:
            load.start_soon(busy)
            async with trio.open_nursery() as writer:
                await writer.start(audit.run)
                connected = rounds
                audit.close()  # the writer drains the queue, then returns
            load.cancel_scope.cancel()
    first_batch = rounds_at_handoff[1]
    assert first_batch - connected < 20  # a handful of rounds, not one per row (500)
    assert len(rows(database)) == BATCH_ROWS
