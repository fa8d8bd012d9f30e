"""Cancellation latency: from a client's disconnect to the provider's connection closing.

    python -m benchmarks.cancel_latency [--runs 200]

Starts the real server and the tests' fake provider on 127.0.0.1 in this
process (one clock for both), then, for each phase (before the first token,
mid-stream, during a non-streamed answer), opens a request, lets the model
get going, drops the client (FIN and RST alternately) and times how long the
provider's side takes to see its connection close.
"""

from __future__ import annotations

import argparse
import statistics

import trio

from tests.conftest import upstream_role
from tests.fake_upstream import FakeUpstream
from tests.test_cancellation import PHASES, cancel_once
from trio_serve.server import ServeOptions, serve

UPSTREAM_KEY = "sk-test-upstream"


async def measure(runs: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {phase: [] for phase in PHASES}
    async with trio.open_nursery() as nursery:
        upstream = FakeUpstream(api_key=UPSTREAM_KEY)
        await nursery.start(upstream.run)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        options = ServeOptions(role=upstream_role(upstream), provider_key=UPSTREAM_KEY)
        running = await nursery.start(serve, options, listeners)
        for phase in PHASES:
            for run in range(runs):
                exchange, left_at = await cancel_once(running, upstream, phase, "rst" if run % 2 else "fin")
                latencies[phase].append(exchange.closed_at - left_at)
        orphans = upstream.open_exchanges
        nursery.cancel_scope.cancel()
    print(f"orphaned provider requests after {runs * len(PHASES)} disconnects: {orphans}")
    return latencies


def report(latencies: dict[str, list[float]]) -> None:
    print(f"{'phase':<20} {'runs':>5} {'p50 ms':>8} {'p99 ms':>8} {'worst ms':>9}")
    for phase, values in latencies.items():
        ms = sorted(v * 1000 for v in values)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(f"{phase:<20} {len(ms):>5} {statistics.median(ms):>8.2f} {p99:>8.2f} {ms[-1]:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="disconnects per phase")
    report(trio.run(measure, parser.parse_args().runs))


if __name__ == "__main__":
    main()
