"""What the app asks of a model provider, and what a provider streams back.

Every provider, whatever its wire format, turns a `ModelCall` into a stream of
`Delta`, `Finish` and `Usage` events, in batches of what arrived together. Deltas are OpenAI-shaped (`content`,
`tool_calls`, `refusal`) so the OpenAI-compatible family relays them untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs


@attrs.frozen
class Delta:
    """One increment of the assistant message, exactly as the model produced it."""

    fields: Mapping[str, Any]


@attrs.frozen
class Finish:
    reason: str  # as the model said it: stop, length, tool_calls, content_filter


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Delta | Finish | Usage
Batch = list[Event]
"""Events that arrived together (one network read): relayed together, in one write."""


@attrs.frozen(kw_only=True)
class ModelCall:
    """One request to the model: messages (system prompt first) and sampling."""

    messages: tuple[Mapping[str, Any], ...]
    temperature: float
    max_tokens: int
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    response_format: Mapping[str, Any] | None = None
    # Whether the answer is relayed as it comes. A whole answer is asked for
    # whole: one JSON body costs the provider and us far less than an event
    # per token, and closing the connection still stops the model.
    stream: bool = True


class Provider(Protocol):
    def stream(self, call: ModelCall) -> AbstractAsyncContextManager[AsyncIterator[Batch]]:
        """Start the call; entering raises ApiError if the provider refuses it.

        The iterator yields batches of events, each what one read delivered.

        Leaving the context, normally or by cancellation, closes the upstream
        request at once so the provider stops generating.
        """
        ...
