"""The built-in offline model: answers from the last user message, no network.

Deterministic, so tests can predict every token; `delay_ms` paces the words
like a real model, for demos and load tests.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import trio

from trio_serve.openai import text_of
from trio_serve.providers.base import Batch, Delta, Finish, ModelCall, Usage

_TOKEN_RE = re.compile(r"\s*\S+")


def echo_reply(user_text: str) -> list[str]:
    """The reply's tokens: one word each, with the space before it."""
    text = f"You said: {user_text.strip()}" if user_text.strip() else "You said nothing."
    return _TOKEN_RE.findall(text)


class EchoProvider:
    def __init__(self, *, delay_s: float = 0.0) -> None:
        self._delay_s = delay_s

    @asynccontextmanager
    async def stream(self, call: ModelCall) -> AsyncIterator[AsyncIterator[Batch]]:
        events = self._events(call)
        try:
            yield events
        finally:
            await events.aclose()

    async def _events(self, call: ModelCall) -> AsyncGenerator[Batch, None]:
        user_messages = [m for m in call.messages if m["role"] == "user"]
        tokens = echo_reply(text_of(user_messages[-1]) if user_messages else "")
        sent = tokens[: call.max_tokens]
        for token in sent:
            if self._delay_s:
                await trio.sleep(self._delay_s)
            yield [Delta({"content": token})]
        prompt_words = sum(len(text_of(m).split()) for m in call.messages)
        yield [
            Finish("length" if len(sent) < len(tokens) else "stop"),
            Usage(prompt_tokens=prompt_words, completion_tokens=len(sent)),
        ]
