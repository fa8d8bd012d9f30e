"""The official OpenAI Node SDK, unchanged, against the real server (the seed names it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import trio

from tests.conftest import IO_TIMEOUT_S, StartServer, base_url, make_role

NODE_DIR = Path(__file__).parent / "node"
API_KEY = "node-test-key"


def install_sdk() -> None:
    """npm install the pinned SDK once into tests/node/node_modules (a failure fails the test)."""
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=300)


async def test_the_node_sdk_works_unchanged(start_server: StartServer) -> None:
    await trio.to_thread.run_sync(install_sdk)
    with trio.fail_after(IO_TIMEOUT_S * 3):
        running = await start_server(make_role(agent="node-agent"), api_key=API_KEY)
        env = {**os.environ, "BASE_URL": base_url(running) + "/v1", "API_KEY": API_KEY}
        result = await trio.run_process(["node", "sdk_check.mjs"], cwd=NODE_DIR, env=env, capture_stdout=True)
    seen = orjson.loads(result.stdout)
    assert seen["plain"] == "You said: Hello from Node!"
    assert seen["finish"] == "stop"
    assert seen["deltas"] == ["You", " said:", " Hello", " from", " Node!"]
    assert seen["usage"]["completion_tokens"] == 5
    assert seen["models"] == ["node-agent"]
    assert seen["wrongKey"] == {"name": "AuthenticationError", "status": 401}
