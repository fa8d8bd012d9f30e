"""Benchmark trio_serve side by side with what users would otherwise run.

    python -m benchmarks                  # everything, peers included (installs them once)
    python -m benchmarks --no-peers       # only the direct provider and trio_serve
    python -m benchmarks --quick --no-peers   # a few seconds: proves the harness works

One run measures, against one fast fake provider on 127.0.0.1: the provider
directly (the physical limit), trio_serve, InitRunner's own server and the
LiteLLM proxy, so ratios hold while the machine's speed drifts. Writes
`benchmarks/results/latest.md` and `latest.png` (or under --out).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks import clients, report, servers
from benchmarks.clients import Target

Results = dict[str, dict[str, Any]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run of a few seconds")
    parser.add_argument("--no-peers", action="store_true", help="skip InitRunner and LiteLLM")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", help="run only these servers (direct, trio_serve, initrunner, litellm)")
    return parser.parse_args()


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"requests": 20, "seconds": 1, "concurrency": [1, 8], "ttft": 5, "streams": [20, 50],
                "cancels": 10, "idle": 200, "burst": 1000}  # fmt: skip
    return {"requests": 500, "seconds": 5, "concurrency": [1, 8, 32, 64, 128], "ttft": 100,
            "streams": [100, 300, 500, 1000], "cancels": 200, "idle": 10_000, "burst": 1000}  # fmt: skip


# The peers are slow to cancel (or never do) and heavy per stream: fewer runs
# keep the whole benchmark within minutes; per-stream figures stay comparable.
PEER_STEPS = {"cancels": 50, "idle": 1000}


def capped(steps: dict[str, Any]) -> dict[str, Any]:
    return {key: min(steps[key], limit) for key, limit in PEER_STEPS.items()}


async def timed(results: dict[str, Any], name: str, work: Awaitable[Any], timeout_s: float = 300) -> None:
    """Run one measurement; a failure or timeout is recorded, never fatal to the run."""
    started = time.perf_counter()
    try:
        results[name] = await asyncio.wait_for(work, timeout_s)
    except Exception as exc:  # a peer falling over is a result too
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    print(f"  {name}: {results[name]}  ({time.perf_counter() - started:.1f} s)", flush=True)


def wrk(target: Target, concurrency: int, seconds: int, workdir: Path) -> dict[str, float]:
    script = workdir / "post.lua"
    body = target.request("bench chunks=8", stream=False).split(b"\r\n\r\n", 1)[1].decode()
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in target.headers)
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = {orjson.dumps(body).decode()}\n'
        f'wrk.headers["Content-Type"] = "application/json"\n{headers}'
    )
    threads = min(concurrency, 2)
    command = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script),
               f"http://{target.host}:{target.port}{target.path}"]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = clients.parse_wrk(output)
    if "Non-2xx" in output:
        result["non_2xx"] = float(output.split("Non-2xx or 3xx responses:")[1].split()[0])
    return result


async def load_curve(target: Target, levels: list[int], seconds: int, workdir: Path) -> dict[str, Any]:
    curve = {}
    for concurrency in levels:
        if shutil.which("wrk"):
            curve[str(concurrency)] = await asyncio.to_thread(wrk, target, concurrency, seconds, workdir)
        else:
            curve[str(concurrency)] = await clients.throughput_python(target, concurrency, seconds)
    return curve


async def idle(server: servers.Server, count: int) -> dict[str, float]:
    before = server.rss_mb()
    connections, live = await clients.idle_streams(server.target, count)
    held = server.rss_mb()
    for connection in connections:
        connection.close()
    return {"streams": count, "live": live, "rss_mb": held, "kb_per_stream": (held - before) * 1024 / count}


async def measure(
    server: servers.Server, fake: tuple[str, int], steps: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    target, results = server.target, {"ready_s": server.ready_s, "rss_idle_mb": server.rss_mb()}
    print(f"{server.name} (ready in {server.ready_s:.2f} s)", flush=True)
    await timed(results, "latency_c1", clients.latency(target, steps["requests"]))
    await timed(results, "load", load_curve(target, steps["concurrency"], steps["seconds"], workdir))
    await timed(results, "ttft", clients.ttft(target, steps["ttft"]))
    await timed(results, "burst", clients.burst(target, steps["burst"]))
    results["streams"] = {}
    for count in steps["streams"]:
        await timed(results["streams"], str(count), clients.many_streams(target, count))
    await timed(results, "cancel", clients.cancellations(target, fake, steps["cancels"]))
    results["rss_after_load_mb"] = server.rss_mb()
    if server.process is not None:
        await timed(results, "idle", idle(server, steps["idle"]), timeout_s=600)
    return results


STARTERS: dict[str, Callable[[tuple[str, int], Path], servers.Server]] = {
    "trio_serve": servers.trio_serve,
    "initrunner": servers.initrunner,
    "litellm": servers.litellm,
}


async def run(args: argparse.Namespace) -> Results:
    steps = plan(args.quick)
    names = ["direct", "trio_serve"] + ([] if args.no_peers else ["initrunner", "litellm"])
    names = [name for name in names if not args.only or name in args.only]
    results: Results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            workdir = Path(folder) / name
            workdir.mkdir()
            # A fresh provider for each server: one that never cancels must not
            # leave orphaned streams loading the provider for the next.
            with servers.fake_provider() as fake:
                results[name] = await run_one(name, fake, steps, workdir)
    return results


async def run_one(name: str, fake: tuple[str, int], steps: dict[str, Any], workdir: Path) -> dict[str, Any]:
    try:
        server = servers.direct(fake) if name == "direct" else STARTERS[name](fake, workdir)
    except Exception as exc:
        return {"error": f"did not start: {exc}"}
    try:
        own = steps if name in ("direct", "trio_serve") else {**steps, **capped(steps)}  # peers: fewer slow runs
        return await measure(server, fake, own, workdir)
    finally:
        server.stop()


def main() -> None:
    args = parse_args()
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (" --no-peers" if args.no_peers else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "wrk": bool(shutil.which("wrk")),
    }
    (args.out / "latest.json").write_bytes(orjson.dumps({"meta": meta, "results": results}, option=orjson.OPT_INDENT_2))
    (args.out / "latest.md").write_text(report.markdown(results, meta))
    report.plot(results, args.out / "latest.png")
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.png'}")
    # Our own side must measure cleanly; a peer that falls over is just a result.
    failures = [f"{name}: {error}" for name in ("direct", "trio_serve") for error in errors(results.get(name, {}))]
    for failure in failures:
        print(f"FAILED {failure}")
    raise SystemExit(1 if failures else 0)


def errors(result: Any) -> list[str]:
    if not isinstance(result, dict):
        return []
    found = [str(result["error"])] if "error" in result else []
    return found + [error for value in result.values() for error in errors(value)]


if __name__ == "__main__":
    main()
