"""`initrunner audit export|stats|verify|prune`: reading the audit log back.

Plain synchronous sqlite3: these run on their own, never inside the server.
"""

from __future__ import annotations

import argparse
import csv
import re
import sqlite3
import statistics
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson

from trio_serve.audit import COLUMNS, GENESIS_HASH, KEY_ENV, chain_hash, key_path, record_fields

EXIT_FAILURE = 1
_RELATIVE_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
EXPORT_COLUMNS = ("id", *COLUMNS, "prev_hash", "record_hash")


class AuditCliError(Exception):
    """A problem reported as one line, with exit status 1."""


def add_commands(commands: Any, default_db: str) -> None:
    """The `audit` command and its subcommands, on the main parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--audit-db",
        type=Path,
        default=None,
        help=f"audit database (default: env INITRUNNER_AUDIT_DB, else {default_db})",
    )
    audit = commands.add_parser("audit", help="read the audit log back")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    export = actions.add_parser("export", parents=[common], help="rows as JSON lines or CSV")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    _add_filters(export)
    export.add_argument("--conversation", help="only this conversation id")
    export.add_argument("--status", type=int, help="only this HTTP status")
    export.add_argument("--limit", type=int, help="at most this many rows (the newest)")

    stats = actions.add_parser("stats", parents=[common], help="requests, latency percentiles, tokens, cancellations")
    _add_filters(stats)

    actions.add_parser("verify", parents=[common], help="walk the hash chain; exit 1 if it is broken")
    prune = actions.add_parser("prune", parents=[common], help="delete rows older than some days")
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="from this time: ISO 8601 (UTC if no zone) or relative, e.g. 2h, 7d")
    parser.add_argument("--until", help="up to this time, same forms as --since")
    parser.add_argument("--agent", help="only this agent")


def run(args: argparse.Namespace, database: Path, env: Mapping[str, str], out: TextIO = sys.stdout) -> int:
    """Run one audit subcommand; AuditCliError for a one-line failure."""
    if not database.exists():
        raise AuditCliError(f"no audit database at {database}")
    connection = sqlite3.connect(f"file:{database}?mode=rw", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        commands = {"export": _export, "stats": _stats, "verify": _verify, "prune": _prune}
        return commands[args.audit_command](connection, args, database, env, out)
    except sqlite3.Error as exc:
        raise AuditCliError(f"cannot read the audit database {database}: {exc}") from None
    finally:
        connection.close()


def parse_time(text: str, now: datetime) -> str:
    """An ISO 8601 instant (as stored in `ts`) from an ISO or relative time."""
    relative = _RELATIVE_RE.match(text.strip())
    if relative:
        moment = now - timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text.strip())
        except ValueError:
            raise AuditCliError(f"not a time: {text!r} (use ISO 8601 or a relative time like 2h or 7d)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _where(args: argparse.Namespace, now: datetime) -> tuple[str, list[Any]]:
    clauses, params = [], []
    filters = [
        ("ts >= ?", parse_time(args.since, now) if args.since else None),
        ("ts <= ?", parse_time(args.until, now) if args.until else None),
        ("agent_name = ?", args.agent),
        ("conversation_id = ?", getattr(args, "conversation", None)),
        ("status = ?", getattr(args, "status", None)),
    ]
    for clause, value in filters:
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _export(
    connection: sqlite3.Connection, args: argparse.Namespace, database: Path, env: Mapping[str, str], out: TextIO
) -> int:
    where, params = _where(args, datetime.now(UTC))
    query = f"SELECT {', '.join(EXPORT_COLUMNS)} FROM audit_log{where} ORDER BY id"
    if args.limit is not None:
        query = f"SELECT * FROM ({query.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT ?) ORDER BY id"
        params.append(args.limit)
    rows = connection.execute(query, params)
    if args.format == "csv":
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        writer.writerows(tuple(row) for row in rows)
    else:
        for row in rows:
            fields = {"id": row["id"], **record_fields(row), "prev_hash": row["prev_hash"]}
            out.write(orjson.dumps({**fields, "record_hash": row["record_hash"]}).decode() + "\n")
    return 0


def _percentiles(values: Sequence[float]) -> tuple[str, str, str]:
    if not values:
        return ("-", "-", "-")
    if len(values) == 1:
        return (f"{values[0]:.1f}",) * 3
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return (f"{cuts[49]:.1f}", f"{cuts[94]:.1f}", f"{cuts[98]:.1f}")


def _stats(
    connection: sqlite3.Connection, args: argparse.Namespace, database: Path, env: Mapping[str, str], out: TextIO
) -> int:
    where, params = _where(args, datetime.now(UTC))
    rows = connection.execute(
        f"SELECT ts, status, stream, cancelled, tokens_in, tokens_out, duration_ms, ttft_ms FROM audit_log{where}",
        params,
    ).fetchall()
    if not rows:
        out.write(f"{database}: no requests in this window\n")
        return 0
    by_status: dict[int, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    durations = [row["duration_ms"] for row in rows]
    ttfts = [row["ttft_ms"] for row in rows if row["ttft_ms"] is not None]
    lines = [
        f"{database}: {len(rows)} requests from {min(r['ts'] for r in rows)} to {max(r['ts'] for r in rows)}",
        "",
        f"{'status':<8}{'requests':>10}",
        *(f"{status:<8}{count:>10}" for status, count in sorted(by_status.items())),
        "",
        f"{'':<16}{'p50':>10}{'p95':>10}{'p99':>10}",
        f"{'duration ms':<16}" + "".join(f"{v:>10}" for v in _percentiles(durations)),
        f"{'ttft ms':<16}" + "".join(f"{v:>10}" for v in _percentiles(ttfts)),
        "",
        f"tokens in {sum(r['tokens_in'] or 0 for r in rows)}, out {sum(r['tokens_out'] or 0 for r in rows)}",
        f"streamed {sum(r['stream'] for r in rows)}, cancelled by the client {sum(r['cancelled'] for r in rows)}",
    ]
    out.write("\n".join(lines) + "\n")
    return 0


def _verify(
    connection: sqlite3.Connection, args: argparse.Namespace, database: Path, env: Mapping[str, str], out: TextIO
) -> int:
    key = _key(database, env)
    meta = dict(connection.execute("SELECT key, value FROM audit_meta").fetchall())
    expected_id = int(meta.get("pruned_through_id", 0)) + 1
    prev_hash = str(meta.get("pruned_through_hash", GENESIS_HASH))
    problems, checked = [], 0
    for row in connection.execute("SELECT * FROM audit_log ORDER BY id"):
        row_id = row["id"]
        if row_id != expected_id:
            problems.append(f"rows {expected_id}-{row_id - 1} are missing")
        if row["prev_hash"] != prev_hash:
            problems.append(f"row {row_id}: does not chain to the row before it")
        if chain_hash(key, row["prev_hash"], row_id, record_fields(row)) != row["record_hash"]:
            problems.append(f"row {row_id}: modified since it was written")
        prev_hash, expected_id, checked = row["record_hash"], row_id + 1, checked + 1
    for problem in problems:
        out.write(problem + "\n")
    verdict = "BROKEN" if problems else "intact"
    out.write(f"{database}: {checked} rows checked, chain {verdict}\n")
    return EXIT_FAILURE if problems else 0


def _prune(
    connection: sqlite3.Connection, args: argparse.Namespace, database: Path, env: Mapping[str, str], out: TextIO
) -> int:
    cutoff = parse_time(f"{args.older_than}d", datetime.now(UTC))
    # Only a prefix of the chain goes, so what remains still verifies from where it starts.
    first_kept = connection.execute("SELECT MIN(id) FROM audit_log WHERE ts >= ?", (cutoff,)).fetchone()[0]
    bound = "id < ?" if first_kept is not None else "1"
    params = (first_kept,) if first_kept is not None else ()
    with connection:
        last = connection.execute(
            f"SELECT id, record_hash FROM audit_log WHERE {bound} ORDER BY id DESC LIMIT 1", params
        ).fetchone()
        if last is None:
            out.write(f"{database}: nothing older than {args.older_than:g} days\n")
            return 0
        deleted = connection.execute(f"DELETE FROM audit_log WHERE {bound}", params).rowcount
        connection.executemany(
            "INSERT OR REPLACE INTO audit_meta (key, value) VALUES (?, ?)",
            [("pruned_through_id", str(last["id"])), ("pruned_through_hash", last["record_hash"])],
        )
    out.write(f"{database}: {deleted} rows older than {args.older_than:g} days deleted\n")
    return 0


def _key(database: Path, env: Mapping[str, str]) -> bytes:
    if env.get(KEY_ENV):
        return env[KEY_ENV].encode()
    path = key_path(database)
    try:
        return path.read_text().strip().encode()
    except OSError:
        raise AuditCliError(f"no audit key: set {KEY_ENV} or restore {path}") from None
