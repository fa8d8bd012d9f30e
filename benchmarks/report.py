"""The benchmark's results as a Markdown table and a PNG plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SERVERS = ("direct", "trio_serve", "initrunner", "litellm")


def _get(result: dict[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "n/a" if math.isnan(value) else "never"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(ours: Any, theirs: Any, higher_is_better: bool = True) -> str:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or not ours or not theirs:
        return "-"
    if math.isinf(theirs) or math.isnan(theirs):
        return "never" if math.isinf(theirs) else "-"
    ratio = ours / theirs if higher_is_better else theirs / ours
    return f"{ratio:,.1f}x"


def rows(results: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    direct_p50 = _get(results.get("direct", {}), "latency_c1", "p50_ms")
    direct_ttft = _get(results.get("direct", {}), "ttft", "p50_ms")
    table: list[tuple[str, list[Any]]] = []

    def row(label: str, *path: str, added_to: float | None = None) -> None:
        values = []
        for name in SERVERS:
            value = _get(results.get(name, {}), *path)
            if added_to is not None and isinstance(value, int | float):
                value = value - added_to if name != "direct" else None  # nothing is added to itself
            values.append(value)
        table.append((label, values))

    row("time to ready (s)", "ready_s")
    row("RSS idle (MB)", "rss_idle_mb")
    row("non-streamed p50, concurrency 1 (ms)", "latency_c1", "p50_ms")
    row("non-streamed p99, concurrency 1 (ms)", "latency_c1", "p99_ms")
    row("latency added over direct, p50 (ms)", "latency_c1", "p50_ms", added_to=direct_p50)
    for level in ("32", "8"):
        row(f"req/s, concurrency {level}", "load", level, "rps")
        row(f"p99 at concurrency {level} (ms)", "load", level, "p99_ms")
    row("time to first token, p50 (ms)", "ttft", "p50_ms")
    row("time to first token added (ms)", "ttft", "p50_ms", added_to=direct_ttft)
    row("1000-delta burst: frames relayed", "burst", "frames")
    row("1000-delta burst: deltas/s", "burst", "deltas_per_s")
    streams = sorted({int(k) for name in SERVERS for k in (_get(results.get(name, {}), "streams") or {})})
    for count in streams:
        row(f"{count} streams x 64 deltas @20 ms: completed", "streams", str(count), "completed")
        row(f"{count} streams: stalls (gap > 40 ms)", "streams", str(count), "stalls")
        row(f"{count} streams: gap p99 (ms)", "streams", str(count), "gap_p99_ms")
        row(f"{count} streams: stream duration p99 (s; paced at 1.28)", "streams", str(count), "duration_p99_s")
    row("cancellation p50 (ms)", "cancel", "p50_ms")
    row("cancellation p99 (ms)", "cancel", "p99_ms")
    row("provider kept generating after disconnect", "cancel", "not_cancelled")
    row("orphaned provider requests", "cancel", "orphans")
    row("idle streams opened", "idle", "streams")
    row("idle streams live (first frame received)", "idle", "live")
    row("RSS per idle stream (KB)", "idle", "kb_per_stream")
    row("RSS after load (MB)", "rss_after_load_mb")
    return table


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    present = [name for name in SERVERS if name in results]
    lines = [
        "# Benchmark results",
        "",
        f"`{meta['command']}` on {meta['date']} ({meta['machine']}; wrk {'used' if meta['wrk'] else 'not installed'}).",
        "All servers ran one at a time against the same fake provider on 127.0.0.1, "
        "with the load generator on the same machine.",
        "",
        "| metric | " + " | ".join(present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for label, values in rows(results):
        shown = [_fmt(values[SERVERS.index(name)]) for name in present]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    lines += ["", "## Ratios (trio_serve against each)", "", "| | " + " | ".join(present) + " |",
              "|---|" + "---|" * len(present)]  # fmt: skip
    ours = results.get("trio_serve", {})
    for label, path, better in [
        ("req/s at concurrency 32 (trio_serve / them)", ("load", "32", "rps"), True),
        ("non-streamed p50 at concurrency 1 (them / trio_serve)", ("latency_c1", "p50_ms"), False),
        ("cancellation p99 (them / trio_serve)", ("cancel", "p99_ms"), False),
    ]:
        cells = [_ratio(_get(ours, *path), _get(results.get(name, {}), *path), better) for name in present]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    failures = {name: r["error"] for name, r in results.items() if isinstance(r, dict) and "error" in r}
    if failures:
        lines += ["", "## Servers that did not run", ""] + [f"- {name}: {error}" for name, error in failures.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, durations) = plt.subplots(1, 2, figsize=(12, 4.5))
    stalls = durations.twinx()
    for name in SERVERS:
        curve = _get(results.get(name, {}), "load") or {}
        points = sorted((int(c), v["p99_ms"]) for c, v in curve.items() if isinstance(v, dict) and "p99_ms" in v)
        if points:
            line = latency.plot(*zip(*points, strict=True), marker="o", label=name)[0]
        runs = _get(results.get(name, {}), "streams") or {}
        done = sorted((int(n), v.get("duration_p99_s", math.nan), v["stalls"]) for n, v in runs.items()
                      if isinstance(v, dict) and "stalls" in v)  # fmt: skip
        if done and points:
            counts, seconds, stalled = zip(*done, strict=True)
            durations.plot(counts, seconds, marker="o", color=line.get_color(), label=f"{name}: duration p99")
            stalls.plot(counts, stalled, marker="x", linestyle="--", color=line.get_color(), label=f"{name}: stalls")
    latency.set(xlabel="concurrent connections", ylabel="p99 latency (ms)", yscale="log",
                title="Non-streamed latency against concurrency")  # fmt: skip
    durations.axhline(1.28, color="grey", linewidth=0.8, linestyle=":")  # 64 deltas paced 20 ms apart
    durations.set(
        xlabel="concurrent streams (64 deltas, 20 ms apart: 1.28 s when on time)",
        ylabel="stream duration p99 (s), solid",
        yscale="log",
        title="Streams: duration and stalls",
    )
    stalls.set(ylabel="stalls: gaps over 40 ms, dashed", yscale="symlog")
    stalls.set_ylim(bottom=0)
    latency.grid(True, alpha=0.3)
    durations.grid(True, alpha=0.3)
    latency.legend(fontsize=8)
    durations.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    """Rewrite the table and the plot from a run's latest.json (after changing this module)."""
    import sys

    import orjson

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    run = orjson.loads((folder / "latest.json").read_bytes())
    (folder / "latest.md").write_text(markdown(run["results"], run["meta"]))
    plot(run["results"], folder / "latest.png")


if __name__ == "__main__":
    main()
