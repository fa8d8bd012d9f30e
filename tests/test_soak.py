"""The soak script's 60-second round: mixed traffic, then everything back to baseline.

It checks for leaks (tasks, descriptors, memory, provider requests, audit rows),
never for speed; the longer round is run by hand (`python -m benchmarks.soak`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_a_minute_of_mixed_traffic_leaves_nothing_behind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soak: ok (back to baseline)" in result.stdout
