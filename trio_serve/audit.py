"""The audit log: one SQLite row per chat request, hash-chained, written in batches.

The request path only drops a record into a bounded memory channel (never
waiting); one background task collects batches (every 50 ms or 500 rows) and
writes each in one transaction in a worker thread. A failing disk is logged
and retried while rows wait in memory (up to a cap); on shutdown the writer
drains everything queued before the process exits.

Tamper evidence: record_hash = HMAC-SHA256(key, prev_hash + canonical JSON of
the row, its id included), so a changed, inserted or removed row breaks the
chain for anyone holding the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from trio_serve.errors import StartupError
from trio_serve.redact import redact

log = logging.getLogger("trio_serve.audit")

DEFAULT_PATH = "~/.initrunner/audit.db"
KEY_ENV = "INITRUNNER_AUDIT_HMAC_KEY"
BATCH_WINDOW_S = 0.05  # a queued row waits at most this long before its batch is written
BATCH_ROWS = 500  # and a batch holds at most this many rows
CHANNEL_ROWS = 10_000  # queued rows beyond this are dropped (and counted), never waited for
MAX_PENDING_ROWS = 100_000  # rows kept in memory while the disk fails; the oldest go first
RETRY_MAX_S = 30.0  # back-off ceiling between write attempts on a failing disk
DRAIN_ATTEMPTS = 5  # on shutdown, a failing disk gets this many more tries, about 3 s
GENESIS_HASH = ""  # the prev_hash of the first row ever written
BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before failing

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    request_id TEXT NOT NULL,
    agent_name TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    conversation_id TEXT,
    client_addr TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    cancelled INTEGER NOT NULL,
    user_prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    total_tokens INTEGER,
    duration_ms REAL NOT NULL,
    ttft_ms REAL,
    error TEXT,
    prev_hash TEXT NOT NULL,
    record_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
CREATE INDEX IF NOT EXISTS audit_log_agent ON audit_log (agent_name);
CREATE INDEX IF NOT EXISTS audit_log_conversation ON audit_log (conversation_id);
CREATE INDEX IF NOT EXISTS audit_log_request ON audit_log (request_id);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@attrs.frozen(kw_only=True)
class AuditRecord:
    ts: str  # ISO 8601, UTC, when the request arrived
    request_id: str
    agent_name: str
    provider: str
    model: str
    conversation_id: str | None
    client_addr: str
    method: str
    path: str
    status: int
    stream: bool
    cancelled: bool
    user_prompt: str
    output: str
    tokens_in: int | None
    tokens_out: int | None
    total_tokens: int | None
    duration_ms: float
    ttft_ms: float | None
    error: str | None

    def scrubbed(self, known_secrets: Iterable[str]) -> AuditRecord:
        """The record with keys and Bearer tokens taken out of its free text."""
        keys = tuple(known_secrets)
        return attrs.evolve(
            self,
            user_prompt=redact(self.user_prompt, keys),
            output=redact(self.output, keys),
            error=redact(self.error, keys) if self.error else None,
        )


COLUMNS = tuple(field.name for field in attrs.fields(AuditRecord))
_INSERT = (
    f"INSERT INTO audit_log (id, {', '.join(COLUMNS)}, prev_hash, record_hash) "
    f"VALUES ({', '.join('?' * (len(COLUMNS) + 3))})"
)


def chain_hash(key: bytes, prev_hash: str, row_id: int, fields: Mapping[str, Any]) -> str:
    """HMAC-SHA256 over the previous hash and the row's canonical JSON."""
    canonical = orjson.dumps({"id": row_id, **fields}, option=orjson.OPT_SORT_KEYS)
    return hmac.new(key, prev_hash.encode() + canonical, hashlib.sha256).hexdigest()


def record_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row's fields as they were hashed (SQLite keeps booleans as 0/1)."""
    fields = {name: row[name] for name in COLUMNS}
    fields["stream"], fields["cancelled"] = bool(fields["stream"]), bool(fields["cancelled"])
    return fields


class AuditDatabase:
    """The SQLite file: created with tight permissions, appended to in batches."""

    def __init__(self, path: Path, key: bytes, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.key = key
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    def open(cls, path: Path, env: Mapping[str, str], *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> AuditDatabase:
        """Create or check the database and its key; StartupError if unusable."""
        path = path.expanduser()
        try:
            _prepare_file(path)
            database = cls(path, _load_key(path, env), busy_timeout_s=busy_timeout_s)
            with database.connect() as connection:
                connection.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"cannot use the audit database {path}: {exc}") from None
        return database

    def connect(self) -> sqlite3.Connection:
        # One writer task uses this connection, one batch at a time, from worker
        # threads: never concurrently, so sharing it across threads is safe.
        connection = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=self.busy_timeout_s
        )
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def append(self, connection: sqlite3.Connection, records: Sequence[AuditRecord]) -> None:
        """Write `records` in one transaction, each chained to the one before."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            last_id, prev_hash = chain_tail(connection)
            rows = []
            for offset, record in enumerate(records, start=1):
                fields = attrs.asdict(record)
                record_hash = chain_hash(self.key, prev_hash, last_id + offset, fields)
                rows.append((last_id + offset, *fields.values(), prev_hash, record_hash))
                prev_hash = record_hash
            connection.executemany(_INSERT, rows)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def chain_tail(connection: sqlite3.Connection) -> tuple[int, str]:
    """The id and hash the next row chains to: the last row, or where pruning stopped."""
    row = connection.execute("SELECT id, record_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0]), str(row[1])
    pruned = dict(connection.execute("SELECT key, value FROM audit_meta").fetchall())
    return int(pruned.get("pruned_through_id", 0)), str(pruned.get("pruned_through_hash", GENESIS_HASH))


def _prepare_file(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    path.chmod(0o600)


def key_path(database: Path) -> Path:
    return database.with_name(database.name + ".key")


def _load_key(database: Path, env: Mapping[str, str]) -> bytes:
    if env.get(KEY_ENV):
        return env[KEY_ENV].encode()
    path = key_path(database)
    if not path.exists():
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(descriptor, "w") as key_file:
            key_file.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


class AuditLog:
    """The request side's handle: `record()` never blocks; `run()` writes."""

    def __init__(self, database: AuditDatabase, *, secrets: Iterable[str] = (), capacity: int = CHANNEL_ROWS) -> None:
        self._database = database
        self._secrets = tuple(s for s in secrets if s)
        self._send, self._receive = trio.open_memory_channel[AuditRecord](capacity)
        self.written = 0
        self.dropped = 0  # rows lost: channel full, closed, or the disk never came back
        self._failures = 0  # consecutive failed writes
        self._retry_at = -math.inf  # no write is attempted before this time

    def record(self, record: AuditRecord) -> None:
        """Queue a record for writing (scrubbed later, off the event loop); drops
        it (counted, logged) rather than wait."""
        try:
            self._send.send_nowait(record)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit: %d record(s) dropped: the writer is not keeping up", self.dropped)

    def close(self) -> None:
        """No more records: the writer drains what is queued, then returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        connection = await trio.to_thread.run_sync(self._database.connect)
        task_status.started()
        pending: list[AuditRecord] = []
        closed = False
        try:
            while not closed or pending:
                if closed or len(pending) >= MAX_PENDING_ROWS:
                    await trio.sleep_until(self._retry_at)  # only a failing disk makes this wait
                else:
                    closed = await self._collect(pending)
                if pending and trio.current_time() >= self._retry_at:
                    await self._flush(connection, pending, draining=closed)
        finally:
            await trio.to_thread.run_sync(connection.close)

    async def _collect(self, pending: list[AuditRecord]) -> bool:
        """Move queued records to `pending` for one batch window (longer while the
        disk is failing, so rows wait in memory rather than fill the channel);
        True once the channel is closed and empty."""
        try:
            if not pending:
                pending.append(await self._receive.receive())
            failing = self._retry_at > trio.current_time()
            limit = MAX_PENDING_ROWS if failing else BATCH_ROWS
            with trio.move_on_at(max(trio.current_time() + BATCH_WINDOW_S, self._retry_at)):
                while self._take_queued(pending, limit):
                    pending.append(await self._receive.receive())
        except trio.EndOfChannel:
            return True
        return False

    def _take_queued(self, pending: list[AuditRecord], limit: int) -> bool:
        """Move what is already queued to `pending` without a checkpoint: under
        load each `await receive()` waits a full round of the scheduler, and
        one per row let the queue outgrow the writer. True if there is room left."""
        while len(pending) < limit:
            try:
                pending.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return True
        return False

    async def _flush(self, connection: sqlite3.Connection, pending: list[AuditRecord], *, draining: bool) -> None:
        while pending:
            batch = pending[:BATCH_ROWS]
            try:
                await trio.to_thread.run_sync(self._write, connection, batch)
            except (sqlite3.Error, OSError) as exc:
                self._failed(exc, pending, draining=draining)
                return
            del pending[: len(batch)]
            self.written += len(batch)
            if self._failures:
                log.warning("audit: writing to %s again", self._database.path)
                self._failures, self._retry_at = 0, -math.inf

    def _write(self, connection: sqlite3.Connection, batch: list[AuditRecord]) -> None:
        # In the worker thread: scrubbing is regex work the event loop need not do.
        self._database.append(connection, [record.scrubbed(self._secrets) for record in batch])

    def _failed(self, exc: Exception, pending: list[AuditRecord], *, draining: bool) -> None:
        if self._failures == 0:
            log.error("audit: cannot write to %s (%s); keeping rows in memory and retrying", self._database.path, exc)
        self._failures += 1
        if draining and self._failures > DRAIN_ATTEMPTS:
            self.dropped += len(pending)
            log.error("audit: %d row(s) could not be written before exit: %s", len(pending), exc)
            pending.clear()
            return
        if len(pending) > MAX_PENDING_ROWS:
            self.dropped += len(pending) - MAX_PENDING_ROWS
            del pending[: len(pending) - MAX_PENDING_ROWS]
        ceiling = 1.0 if draining else RETRY_MAX_S
        self._retry_at = trio.current_time() + min(ceiling, 0.1 * 2**self._failures)
