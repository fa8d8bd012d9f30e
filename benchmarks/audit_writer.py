"""Audit log: the writer's throughput, and what one request pays on the event loop.

    python -m benchmarks.audit_writer [--rows 50000]

Throughput: rows queued as fast as possible, timed until the writer (batches
of up to 500 rows, one transaction each, in a worker thread) has drained them
into a real SQLite file in WAL mode. Event-loop cost: building the audit
record of a finished request and queueing it, the only audit work a request
does, timed per call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from tests.test_audit import record
from trio_serve.audit import AuditDatabase, AuditLog
from trio_serve.chat import Turn
from trio_serve.config import ModelConfig, Role
from trio_serve.http import Request
from trio_serve.providers.base import Usage


async def throughput(folder: Path, rows: int) -> float:
    database = AuditDatabase.open(folder / "throughput.db", {})
    audit = AuditLog(database, capacity=rows)  # room for all: this measures the writer, not the queue
    records = [record(n) for n in range(rows)]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for item in records:
            audit.record(item)
        audit.close()
    elapsed = time.perf_counter() - start
    assert audit.written == rows, (audit.written, rows)
    return rows / elapsed


async def per_request_cost(folder: Path, calls: int) -> float:
    role = Role(name="agent", description="", system_prompt="p", model=ModelConfig(provider="echo", name="echo"))
    request = Request(method="POST", path="/v1/chat/completions", query="", headers={}, body=b"", request_id="req_1")
    audit = AuditLog(AuditDatabase.open(folder / "cost.db", {}), capacity=calls)
    turns = []
    for _ in range(calls):
        turn = Turn.begin(request)
        turn.user_prompt, turn.output, turn.usage = "What is the weather in Oslo?", "Sunny, 12 degrees.", Usage(12, 5)
        turns.append(turn)
    start = time.perf_counter()
    for turn in turns:
        audit.record(turn.record(role))
    return (time.perf_counter() - start) / calls


async def main_async(rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        rate = await throughput(Path(folder), rows)
        cost = await per_request_cost(Path(folder), 20_000)
    print(f"audit writer throughput: {rate:,.0f} rows/s ({rows:,} rows, batches of up to 500, WAL)")
    print(f"event-loop cost per request (build the record, queue it): {cost * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    trio.run(main_async, parser.parse_args().rows)


if __name__ == "__main__":
    main()
