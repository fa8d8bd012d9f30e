"""Server-side conversations: the pure store, the sweeper, and turns end to end."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing

from tests.conftest import IO_TIMEOUT_S, StartServer, base_url, make_role, sse_events, upstream_role
from tests.fake_upstream import FakeUpstream, Script
from trio_serve.app import App
from trio_serve.chat import KeyedLocks
from trio_serve.conversations import ConversationStore, conversation_id, new_turn, trim_history
from trio_serve.errors import InvalidRequest
from trio_serve.http import Request
from trio_serve.providers.base import Batch, Delta, Finish, ModelCall, Usage
from trio_serve.server import sweep_conversations

UPSTREAM_KEY = "sk-test-upstream"
MINUTE = 60.0


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str | None, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def tool(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("messages", "turn"),
    [
        ([user("hi")], [user("hi")]),
        ([{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")], [user("c")]),
        ([user("a"), user("b")], [user("b")]),
        ([user("weather?"), assistant(None, tool_calls=[CALL]), tool("c1", "sunny")], [tool("c1", "sunny")]),
        ([tool("c1", "sunny"), tool("c2", "warm")], [tool("c1", "sunny"), tool("c2", "warm")]),
    ],
)
def test_new_turn_is_what_the_request_adds(messages: list[dict[str, Any]], turn: list[dict[str, Any]]) -> None:
    assert list(new_turn(messages)) == turn


def test_a_request_that_adds_nothing_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="adds no user or tool message"):
        new_turn([user("a"), assistant("b")])


def test_trimming_never_splits_tool_calls_from_their_results() -> None:
    history = (
        user("1"),
        assistant("2"),
        user("3"),
        assistant(None, tool_calls=[CALL]),
        tool("c1", "r"),
        assistant("4"),
    )
    assert trim_history(history, 10) == history
    assert trim_history(history, 4) == (user("3"), assistant(None, tool_calls=[CALL]), tool("c1", "r"), assistant("4"))
    assert trim_history(history, 3) == ()  # no user message to start from within the last 3


@pytest.mark.parametrize("value", ["conv-001", "a", "A.b_c:d-9", "x" * 128])
def test_good_conversation_ids(value: str) -> None:
    assert conversation_id({"x-conversation-id": value}) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "has space", "semi;colon", "ünicode", "../etc"])
def test_bad_conversation_ids_are_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        conversation_id({"x-conversation-id": value})
    assert info.value.param == "x-conversation-id"


def test_no_header_means_no_conversation() -> None:
    assert conversation_id({}) is None


def store(ttl_s: float = 60 * MINUTE, max_conversations: int = 1000) -> ConversationStore:
    return ConversationStore(ttl_s=ttl_s, max_conversations=max_conversations, max_messages=40)


def test_kept_at_59_minutes_idle_gone_at_61() -> None:
    conversations = store()
    conversations.put("agent", "c", (user("hi"),), now=0)
    assert conversations.get("agent", "c", now=59 * MINUTE) == (user("hi"),)
    assert conversations.get("agent", "c", now=(59 + 61) * MINUTE) is None  # 61 min after the last use
    assert len(conversations) == 0


def test_access_refreshes_the_idle_time() -> None:
    conversations = store()
    conversations.put("agent", "c", (user("hi"),), now=0)
    for minute in (50, 100, 150):
        assert conversations.get("agent", "c", now=minute * MINUTE) is not None


def test_sweep_removes_expired_without_access() -> None:
    conversations = store()
    conversations.put("agent", "old", (user("a"),), now=0)
    conversations.put("agent", "new", (user("b"),), now=30 * MINUTE)
    assert conversations.sweep(now=61 * MINUTE) == 1
    assert len(conversations) == 1
    assert conversations.get("agent", "new", now=61 * MINUTE) is not None


def test_least_recently_used_goes_first() -> None:
    conversations = store(max_conversations=2)
    conversations.put("agent", "a", (user("a"),), now=0)
    conversations.put("agent", "b", (user("b"),), now=1)
    conversations.get("agent", "a", now=2)  # a is now more recent than b
    conversations.put("agent", "c", (user("c"),), now=3)
    assert conversations.get("agent", "b", now=4) is None
    assert conversations.get("agent", "a", now=4) is not None
    assert conversations.get("agent", "c", now=4) is not None


def test_histories_are_kept_per_agent() -> None:
    conversations = store()
    conversations.put("one", "c", (user("1"),), now=0)
    conversations.put("two", "c", (user("2"),), now=0)
    assert conversations.get("one", "c", now=1) == (user("1"),)
    assert conversations.get("two", "c", now=1) == (user("2"),)


async def test_the_sweeper_forgets_conversations_nobody_asks_for(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    conversations = store()
    conversations.put("agent", "c", (user("hi"),), now=trio.current_time())
    nursery.start_soon(sweep_conversations, conversations)
    with trio.fail_after(2 * 60 * MINUTE):
        await trio.sleep(59 * MINUTE)
        assert len(conversations) == 1
        await trio.sleep(2 * MINUTE + 60)  # past the TTL, plus one sweep interval
        assert len(conversations) == 0


async def test_keyed_locks_serialise_one_key_and_forget_it() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def turn(name: str, key: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with locks.hold(key):
            task_status.started()
            order.append(f"{name} in")
            await trio.sleep(0.01)
            order.append(f"{name} out")

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(turn, "first", "k")
            nursery.start_soon(turn, "second", "k")
            nursery.start_soon(turn, "other", "j")
    assert order.index("first out") < order.index("second in")
    assert len(locks) == 0


# -- end to end ----------------------------------------------------------------------


def conversation_post(running: Any, conversation: str, text: str, **extra: Any) -> Any:
    client = httpx.Client(base_url=base_url(running), timeout=IO_TIMEOUT_S)
    with client:
        return client.post(
            "/v1/chat/completions",
            json={"messages": [user(text)], **extra},
            headers={"X-Conversation-Id": conversation},
        )


async def test_the_seed_alice_example(start_server: StartServer, upstream: FakeUpstream) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        first = await trio.to_thread.run_sync(conversation_post, running, "conv-001", "My name is Alice.")
        assert first.status_code == 200
        assert first.headers["x-conversation-id"] == "conv-001"
        second = await trio.to_thread.run_sync(conversation_post, running, "conv-001", "What is my name?")
        assert second.status_code == 200
        sent = upstream.exchanges[-1].body["messages"]
        assert sent == [
            {"role": "system", "content": "You are a test agent."},
            user("My name is Alice."),
            {"role": "assistant", "content": "Hello, world"},
            user("What is my name?"),
        ]
        # A request without the header is not part of the conversation and stores nothing.
        lone = await trio.to_thread.run_sync(
            lambda: httpx.post(base_url(running) + "/v1/chat/completions", json={"messages": [user("Hi")]})
        )
        assert "x-conversation-id" not in lone.headers
        assert len(running.conversations) == 1


async def test_streamed_turns_are_stored_whole_and_the_sdk_can_use_the_header(
    start_server: StartServer, upstream: FakeUpstream
) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        client = openai.OpenAI(base_url=base_url(running) + "/v1", api_key="unused", max_retries=0)
        headers = {"X-Conversation-Id": "sdk-conv"}

        def chat(text: str) -> Any:
            stream = client.chat.completions.create(
                model="m", messages=[user(text)], stream=True, extra_headers=headers
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        assert await trio.to_thread.run_sync(chat, "one") == "Hello, world"
        await trio.to_thread.run_sync(chat, "two")
        assert upstream.exchanges[-1].body["messages"][1:] == [
            user("one"), {"role": "assistant", "content": "Hello, world"}, user("two")]  # fmt: skip


async def test_a_failed_turn_leaves_the_history_as_it_was(start_server: StartServer, upstream: FakeUpstream) -> None:
    upstream.script(Script(), Script(finish_reason=None), Script())  # the second turn breaks off
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(upstream_role(upstream), provider_key=UPSTREAM_KEY)
        await trio.to_thread.run_sync(conversation_post, running, "c", "one")
        broken = await trio.to_thread.run_sync(functools.partial(conversation_post, running, "c", "two", stream=True))
        assert sse_events(broken.content)[-2]["error"]["type"] == "upstream_error"
        await trio.to_thread.run_sync(conversation_post, running, "c", "three")
        assert upstream.exchanges[-1].body["messages"][1:] == [
            user("one"), {"role": "assistant", "content": "Hello, world"}, user("three")]  # fmt: skip


async def test_a_bad_conversation_id_is_a_400(start_server: StartServer) -> None:
    with trio.fail_after(IO_TIMEOUT_S):
        running = await start_server(make_role())
        response = await trio.to_thread.run_sync(conversation_post, running, "bad id!", "hi")
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "x-conversation-id"


class TrackingProvider:
    """Answers after a pause, recording how many calls overlap and what each was sent."""

    def __init__(self) -> None:
        self.active = 0
        self.most_active = 0
        self.calls: list[ModelCall] = []
        self.closed = 0

    @asynccontextmanager
    async def stream(self, call: ModelCall) -> AsyncIterator[AsyncIterator[Batch]]:
        self.calls.append(call)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            yield self._events(len(self.calls))
        finally:
            self.active -= 1
            self.closed += 1

    async def _events(self, number: int) -> AsyncIterator[Batch]:
        await trio.sleep(0.05)
        yield [Delta({"content": f"answer {number}"})]
        yield [Finish("stop"), Usage(1, 2)]


def chat_request(text: str, conversation: str, *, stream: bool) -> Request:
    body = httpx.Request("POST", "/", json={"messages": [user(text)], "stream": stream}).read()
    headers = {"content-type": "application/json", "x-conversation-id": conversation}
    return Request(method="POST", path="/v1/chat/completions", query="", headers=headers, body=body, request_id="r")


async def drain(response: Any) -> bytes:
    if response.produce is None:
        return bytes(response.body)
    received: list[bytes] = []

    async def send(chunk: bytes) -> None:
        received.append(chunk)

    await response.produce(send)
    return b"".join(received)


async def test_concurrent_turns_on_one_conversation_are_serialised(autojump_clock: trio.testing.MockClock) -> None:
    provider = TrackingProvider()
    app = App(role=make_role(), provider=provider, api_key=None, created=1, conversations=store())

    async def turn(text: str, stream: bool) -> None:
        await drain(await app(chat_request(text, "shared", stream=stream)))

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turn, "first", True)
            nursery.start_soon(turn, "second", False)
            nursery.start_soon(turn, "third", True)
    assert provider.most_active == 1
    # Each turn saw every turn before it, whole: user, answer, user, answer, user.
    for number, call in enumerate(provider.calls):
        contents = [m["content"] for m in call.messages[1:]]
        assert len(contents) == 2 * number + 1
        assert contents[1::2] == [f"answer {n}" for n in range(1, number + 1)]
    assert sorted(contents[0::2]) == ["first", "second", "third"]
