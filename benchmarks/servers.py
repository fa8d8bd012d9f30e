"""The servers a benchmark run measures, each in its own process on 127.0.0.1.

`direct` is the fake provider itself (the physical limit); `trio_serve` is this
project; the peers, InitRunner's own server and the LiteLLM proxy, are
installed by this module into throwaway virtual environments on first use.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs

from benchmarks.clients import Target

ROOT = Path(__file__).parent.parent
PEER_VENVS = Path(os.environ.get("BENCH_PEERS_DIR", Path(tempfile.gettempdir()) / "trio_serve-bench-peers"))
INITRUNNER_PINS = ("initrunner==2026.10.4", "pydantic-ai-slim[openai,retries]==2.60.0")  # newer pydantic-ai breaks it
LITELLM_PINS = ("litellm[proxy]",)
MASTER_KEY = "sk-bench-master"
PROVIDER_KEY = "sk-bench-provider"
OPEN_FILES = 65_536  # 10,000 streams need a socket each way, beyond the usual 20,000 limit
READY_TIMEOUT_S = 120.0


@attrs.define
class Server:
    name: str
    process: subprocess.Popen[bytes] | None
    target: Target
    ready_s: float

    def rss_mb(self) -> float:
        if self.process is None:
            return float("nan")
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _more_open_files() -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(process: subprocess.Popen[bytes], url: str, started: float, log: Path) -> float:
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return time.perf_counter() - started
        time.sleep(0.005)  # a readiness probe of another process: polling is all there is
    raise RuntimeError(f"{url}: not ready within {READY_TIMEOUT_S:g} s; see {log}")


def _spawn(
    name: str, command: list[str], workdir: Path, health: str, port: int, **env: str
) -> tuple[subprocess.Popen[bytes], float]:
    log = workdir / f"{name}.log"
    environment = {**os.environ, "HOME": str(workdir), PROVIDER_KEY_ENV: PROVIDER_KEY, **env}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=workdir, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        preexec_fn=_more_open_files,
    )  # fmt: skip
    return process, _wait_ready(process, f"http://127.0.0.1:{port}{health}", started, log)


PROVIDER_KEY_ENV = "BENCH_PROVIDER_KEY"


@contextlib.contextmanager
def fake_provider() -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fake_provider"], cwd=ROOT, stdout=subprocess.PIPE,
        preexec_fn=_more_open_files,
    )  # fmt: skip
    assert process.stdout is not None
    port = int(process.stdout.readline().split()[1])
    try:
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait()


def direct(fake: tuple[str, int]) -> Server:
    return Server("direct", None, Target("direct", *fake), 0.0)


def trio_serve(fake: tuple[str, int], workdir: Path) -> Server:
    role = workdir / "trio_serve.yaml"
    role.write_text(
        f"""name: bench
prompt: You are a benchmark.
model: {{provider: openai, name: fake, base_url: "http://{fake[0]}:{fake[1]}/v1", api_key_env: {PROVIDER_KEY_ENV}}}
security:
  rate_limit: {{requests_per_minute: 100000000, burst_size: 1000000}}
  server: {{max_connections: 20000, max_upstream_calls: 20000}}  # the 10,000 idle streams
"""
    )
    port = free_port()
    command = [sys.executable, "-m", "trio_serve", "serve", str(role), "--port", str(port),
               "--audit-db", str(workdir / "audit.db")]  # fmt: skip
    process, ready = _spawn("trio_serve", command, workdir, "/health", port)
    return Server("trio_serve", process, Target("trio_serve", "127.0.0.1", port), ready)


def _peer_venv(name: str, pins: tuple[str, ...]) -> Path:
    venv = PEER_VENVS / name
    marker = venv / "installed.txt"
    if not marker.exists() or marker.read_text() != "\n".join(pins):
        print(f"installing {name} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", *pins], check=True)
        marker.write_text("\n".join(pins))
    return venv / "bin"


def initrunner(fake: tuple[str, int], workdir: Path) -> Server:
    bin_dir = _peer_venv("initrunner", INITRUNNER_PINS)
    role = workdir / "initrunner.yaml"
    role.write_text(
        f"""apiVersion: initrunner/v1
kind: Agent
metadata: {{name: bench}}
spec:
  role: You are a benchmark.
  model: {{provider: openai, name: fake, base_url: "http://{fake[0]}:{fake[1]}/v1", api_key_env: {PROVIDER_KEY_ENV}}}
  security:
    rate_limit: {{requests_per_minute: 100000000, burst_size: 1000000}}
"""
    )
    port = free_port()
    command = [str(bin_dir / "initrunner"), "run", str(role), "--serve", "--port", str(port)]
    process, ready = _spawn("initrunner", command, workdir, "/health", port)
    return Server("initrunner", process, Target("initrunner", "127.0.0.1", port), ready)


def litellm(fake: tuple[str, int], workdir: Path) -> Server:
    bin_dir = _peer_venv("litellm", LITELLM_PINS)
    config = workdir / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: bench
    litellm_params: {{model: openai/fake, api_base: "http://{fake[0]}:{fake[1]}/v1", api_key: {PROVIDER_KEY}}}
"""
    )
    port = free_port()
    command = [str(bin_dir / "litellm"), "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    process, ready = _spawn("litellm", command, workdir, "/health/liveliness", port, LITELLM_MASTER_KEY=MASTER_KEY)
    target = Target("litellm", "127.0.0.1", port, headers=(("Authorization", f"Bearer {MASTER_KEY}"),))
    return Server("litellm", process, target, ready)
