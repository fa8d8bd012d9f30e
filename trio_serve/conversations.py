"""Server-side conversation histories, without IO: the clock is passed in.

A history is keyed by (agent, conversation id), expires after a sliding idle
time, and at most `max_conversations` are kept, the least recently used going
first. The role's prompt is never stored: it is always sent fresh.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from trio_serve.errors import InvalidRequest

CONVERSATION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HEADER = "x-conversation-id"

Message = Mapping[str, Any]
History = tuple[Message, ...]


def conversation_id(headers: Mapping[str, str]) -> str | None:
    """The request's conversation id, None without the header; 400 if malformed."""
    value = headers.get(HEADER)
    if value is None:
        return None
    if not CONVERSATION_ID_RE.match(value):
        raise InvalidRequest(
            "X-Conversation-Id must be 1 to 128 characters of letters, digits and . _ : -",
            param=HEADER,
        )
    return value


def new_turn(messages: Sequence[Message]) -> History:
    """What a request adds to a stored conversation: its last user message and
    what follows it, or, when the model's tool calls are being answered, the
    tool results after the last assistant message."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    # Tool results answer the assistant's calls; otherwise the turn is the last user message on.
    start = last_assistant + 1 if last_assistant > last_user else max(last_user, 0)
    turn = messages[start:]
    if not turn:
        raise InvalidRequest("The request adds no user or tool message to the conversation.", param="messages")
    return tuple(turn)


def trim_history(history: History, max_messages: int) -> History:
    """The newest `max_messages` at most, starting at a user message, so an
    assistant's tool calls are never separated from their results."""
    if len(history) <= max_messages:
        return history
    kept = history[-max_messages:]
    for index, message in enumerate(kept):
        if message["role"] == "user":
            return kept[index:]
    return ()


@attrs.define
class _Entry:
    history: History
    last_used: float


class ConversationStore:
    def __init__(self, *, ttl_s: float, max_conversations: int, max_messages: int) -> None:
        self._ttl_s = ttl_s
        self._max_conversations = max_conversations
        self._max_messages = max_messages
        # Ordered by last use, oldest first: eviction and sweeping start at the front.
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, agent: str, conversation: str, now: float) -> History | None:
        """The stored history, refreshing its idle time; None if unknown or expired."""
        key = (agent, conversation)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._expired(entry, now):
            del self._entries[key]
            return None
        entry.last_used = now
        self._entries.move_to_end(key)
        return entry.history

    def put(self, agent: str, conversation: str, history: History, now: float) -> None:
        key = (agent, conversation)
        self._entries[key] = _Entry(trim_history(history, self._max_messages), now)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_conversations:
            self._entries.popitem(last=False)

    def sweep(self, now: float) -> int:
        """Forget every expired conversation; returns how many went."""
        removed = 0
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not self._expired(entry, now):
                break  # the rest were used more recently
            del self._entries[key]
            removed += 1
        return removed

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.last_used >= self._ttl_s
