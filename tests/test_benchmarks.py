"""The benchmark harness still works: a smoke run of a few seconds, asserting no speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).parent.parent


def test_quick_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    # Without wrk on the PATH (as on a fresh CI machine) the harness's own client drives the load.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-peers", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": "/nonexistent"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "latest.md").read_text()
    assert "| metric | direct | trio_serve |" in report
    assert "wrk not installed" in report
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    results = orjson.loads((tmp_path / "latest.json").read_bytes())["results"]
    ours = results["trio_serve"]
    # What the harness measured is well-formed: every delta relayed, every stream done, nothing orphaned.
    assert ours["burst"]["frames"] == 1000
    assert all(run["completed"] == run["streams"] for run in ours["streams"].values())
    assert ours["cancel"]["orphans"] == 0 and ours["cancel"]["not_cancelled"] == 0
