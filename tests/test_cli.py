"""The command line as a user runs it: a real subprocess, real signals, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import IO_TIMEOUT_S, sse_events
from tests.openai_schema import check_chunk
from trio_serve.audit import BATCH_WINDOW_S
from trio_serve.cli import _client_key, build_parser
from trio_serve.server import ABORT_WRITE_S

ROOT = Path(__file__).parent.parent
INITRUNNER = Path(sys.executable).with_name("initrunner")  # the installed console script
HELLO_CHAT = {"messages": [{"role": "user", "content": "Hello!"}]}


@pytest.fixture(autouse=True)
def audit_db_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every server started here writes its audit log under the test's tmp_path, never $HOME."""
    path = tmp_path / "audit" / "audit.db"
    monkeypatch.setenv("INITRUNNER_AUDIT_DB", str(path))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return {**env, **extra}


async def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(IO_TIMEOUT_S):
        return await trio.run_process(
            [str(INITRUNNER), *args], capture_stdout=True, capture_stderr=True, check=False, env=env or clean_env()
        )


def write_role(tmp_path: Path, text: str) -> str:
    path = tmp_path / "role.yaml"
    path.write_text(text)
    return str(path)


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("initrunner: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


async def test_missing_role_file(tmp_path: Path) -> None:
    assert_one_line_error(await run_cli("serve", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")


async def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    role = write_role(tmp_path, "name: a\nprompt: [unclosed\n")
    assert_one_line_error(await run_cli("serve", role), "role.yaml:3:1", "invalid YAML")


async def test_invalid_field_names_its_path(tmp_path: Path) -> None:
    role = write_role(tmp_path, "name: a\nprompt: p\nmodel: {provider: echo, name: e, temperature: 7}\n")
    assert_one_line_error(await run_cli("serve", role), "model.temperature: must be between 0 and 2, got 7")


async def test_missing_provider_key_names_the_variable(tmp_path: Path) -> None:
    role = write_role(tmp_path, "name: a\nprompt: p\nmodel: openai:gpt-4o-mini\n")
    assert_one_line_error(await run_cli("serve", role), "OPENAI_API_KEY")
    assert_one_line_error(await run_cli("validate", role), "OPENAI_API_KEY")


async def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("serve", str(ROOT / "examples/hello.yaml"), "--port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "already in use")


async def test_validate_accepts_the_bundled_example() -> None:
    result = await run_cli("validate", str(ROOT / "examples/hello.yaml"))
    assert result.returncode == 0
    assert b"ok (agent hello, model echo:echo)" in result.stdout


async def test_unserved_features_give_one_warning_and_still_serve(tmp_path: Path) -> None:
    role = write_role(tmp_path, "name: a\nprompt: p\nmodel: echo:echo\ntools: [{type: shell}]\n")
    result = await run_cli("validate", role)
    assert result.returncode == 0
    assert result.stderr.decode().strip() == f"initrunner: warning: {role}: not served here, ignored: tools"


@pytest.mark.parametrize(
    ("host", "given", "generated"),
    [("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
     ("0.0.0.0", None, True), ("192.0.2.7", None, True), ("0.0.0.0", "mine", False)],
)  # fmt: skip
def test_off_loopback_without_a_key_generates_one(
    host: str, given: str | None, generated: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["serve", "r.yaml", "--host", host] + (["--api-key", given] if given else []))
    key = _client_key(args, {})
    if generated:
        assert key is not None and len(key) >= 40
        assert key in capsys.readouterr().err
    else:
        assert key == given
        assert capsys.readouterr().err == ""


def test_api_key_falls_back_to_the_environment() -> None:
    args = build_parser().parse_args(["serve", "r.yaml"])
    assert _client_key(args, {"INITRUNNER_API_KEY": "from-env"}) == "from-env"


@asynccontextmanager
async def running_server(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start `initrunner serve ARGS --port 0` and yield it with its base URL."""
    process = await trio.lowlevel.open_process(
        [str(INITRUNNER), "serve", *args, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = b""
        while b"health:" not in banner:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"server exited before its banner: {banner!r}"
            banner += chunk
        match = re.search(rb"OpenAI base URL: (http://\S+)/v1", banner)
        assert match, banner
        yield process, match.group(1).decode()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_quick_start_serves_streams_and_exits_0_on_sigterm() -> None:
    with trio.fail_after(IO_TIMEOUT_S * 2):
        async with running_server(str(ROOT / "examples/hello.yaml")) as (process, url):
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/health")).json() == {"status": "ok"}
                response = await client.post("/v1/chat/completions", json={**HELLO_CHAT, "stream": True})
                events = sse_events(response.content)
                assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "You said: Hello!"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


async def test_readme_quick_start_and_ci_use_the_same_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_command in readme, "the README's test command and .ci/run have drifted apart"
    assert "initrunner serve examples/hello.yaml" in readme


@pytest.mark.parametrize(
    ("words", "grace_s", "cut_short"),
    [(5, 10.0, False), (200, 1.0, True)],
    ids=["streams-finish-within-the-grace", "streams-outlast-the-grace"],
)
async def test_sigterm_with_100_live_streams_ends_each_properly_and_loses_no_audit_row(
    tmp_path: Path, audit_db_in_tmp: Path, words: int, grace_s: float, cut_short: bool
) -> None:
    paced = write_role(
        tmp_path,
        "name: paced\nprompt: p\nmodel: {provider: echo, name: e, delay_ms: 20}\n"
        "security: {rate_limit: {requests_per_minute: 6000, burst_size: 100}}\n",
    )
    chat = {"messages": [{"role": "user", "content": "word " * words}], "stream": True}
    bodies: list[bytes] = []
    with trio.fail_after(IO_TIMEOUT_S * 2):
        async with running_server(paced, "--grace-period", str(grace_s)) as (process, url):
            async with httpx.AsyncClient(base_url=url, timeout=IO_TIMEOUT_S) as client:

                async def one(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    async with client.stream("POST", "/v1/chat/completions", json=chat) as response:
                        body = b""
                        async for chunk in response.aiter_bytes():
                            if not body:
                                task_status.started()  # this stream is live
                            body += chunk
                    bodies.append(body)

                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        await nursery.start(one)
                    process.send_signal(signal.SIGTERM)  # 100 streams in flight
                    signalled = trio.current_time()
            assert await process.wait() == 0
            # Within the grace, plus the second given to write the closing frames.
            assert trio.current_time() - signalled < grace_s + ABORT_WRITE_S + 1.0
    assert len(bodies) == 100
    for body in bodies:
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        if cut_short:  # told why, in-band, then [DONE]: never a torn connection
            assert events[-2]["error"]["type"] == "overloaded"
            for chunk in events[:-2]:
                check_chunk(chunk)
        else:
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
    with closing(sqlite3.connect(audit_db_in_tmp)) as database:
        stored = database.execute("SELECT status, cancelled FROM audit_log").fetchall()
    assert len(stored) == 100  # the audit log was flushed before exit
    assert {status for status, _ in stored} == {200}
    assert all(cancelled == cut_short for _, cancelled in stored)


async def test_an_unusable_audit_database_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = await run_cli("serve", str(ROOT / "examples/hello.yaml"), "--audit-db", str(blocker / "audit.db"))
    assert_one_line_error(result, "cannot use the audit database", "not-a-directory/audit.db")


async def test_no_audit_writes_no_database(audit_db_in_tmp: Path) -> None:
    with trio.fail_after(IO_TIMEOUT_S * 2):
        async with running_server(str(ROOT / "examples/hello.yaml"), "--no-audit") as (process, url):
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.post("/v1/chat/completions", json=HELLO_CHAT)).status_code == 200
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    assert not audit_db_in_tmp.parent.exists()


async def test_sigkill_then_restart_loses_at_most_the_last_batch_window(tmp_path: Path, audit_db_in_tmp: Path) -> None:
    role = write_role(
        tmp_path,
        "name: crash\nprompt: p\nmodel: {provider: echo, name: e}\nsecurity: {rate_limit: {burst_size: 100}}\n",
    )
    sent: list[str] = []

    async def chat(client: httpx.AsyncClient) -> None:
        request_id = f"req-{len(sent)}"
        sent.append(request_id)
        answer = await client.post("/v1/chat/completions", json=HELLO_CHAT, headers={"X-Request-Id": request_id})
        assert answer.status_code == 200

    with trio.fail_after(IO_TIMEOUT_S * 2):
        async with running_server(role) as (process, url):
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(30):
                    await chat(client)
                # Not a wait for readiness: the property is about time. Rows
                # answered more than a batch window before the crash are on disk.
                await trio.sleep(BATCH_WINDOW_S * 10)
                for _ in range(10):
                    await chat(client)
            process.kill()  # no drain, no flush: whatever the last window held is gone
            await process.wait()
        with closing(sqlite3.connect(audit_db_in_tmp)) as database:
            survived = [row[0] for row in database.execute("SELECT request_id FROM audit_log ORDER BY id")]
        assert 30 <= len(survived) <= 40
        assert survived == sent[: len(survived)]  # only the newest can be missing, never a hole
        async with running_server(role) as (process, url):  # the database opens cleanly
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(5):
                    await chat(client)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        verify = await run_cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"{len(survived) + 5} rows checked, chain intact" in verify.stdout.decode()
