"""Providers that speak the OpenAI chat completions wire format, over httpx.

Always asks for a stream, with usage (`stream_options.include_usage`), and turns
each upstream delta into one `Delta`. A server that ignores `stream` and answers
one JSON completion is read as a whole. Leaving the context closes the HTTP
request, so the provider stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, aclosing
from functools import partial
from typing import Any

import httpx
import orjson

from trio_serve.config import ModelConfig
from trio_serve.errors import UpstreamError
from trio_serve.openai import relayed_delta
from trio_serve.providers.base import Batch, Delta, Event, Finish, ModelCall, Usage
from trio_serve.providers.upstream import (
    Upstream,
    accepting,
    drain,
    json_object,
    parse_until_failure,
    request_headers,
    sse_payloads,
)
from trio_serve.redact import redact


class OpenAICompatible:
    def __init__(self, *, upstream: Upstream, base_url: str, api_key: str | None, model: ModelConfig) -> None:
        self._upstream = upstream
        self._url = f"{base_url}/chat/completions"
        self._model = model
        key = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = request_headers({"content-type": "application/json"}, model.extra_headers, key)

    def stream(self, call: ModelCall) -> AbstractAsyncContextManager[AsyncIterator[Batch]]:
        body = orjson.dumps(self.payload(call))
        headers = accepting(self._headers, streamed=call.stream)
        return self._upstream.answer(self._url, body, headers, streamed=_stream_events, whole=completion_events)

    def payload(self, call: ModelCall) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model.name,
            "messages": list(call.messages),
            "stream": call.stream,
            "temperature": call.temperature,
            "max_tokens": call.max_tokens,
        }
        optional = {
            "top_p": call.top_p,
            "stop": list(call.stop) or None,
            "seed": call.seed,
            "tools": list(call.tools) or None,
            "tool_choice": call.tool_choice,
            "response_format": call.response_format,
        }
        body.update((key, value) for key, value in optional.items() if value is not None)
        if call.stream:
            body["stream_options"] = {"include_usage": True}  # a whole answer carries its usage anyway
        body.update(self._model.extra_body)
        return body


async def _stream_events(response: httpx.Response, secrets: tuple[str, ...]) -> AsyncGenerator[Batch, None]:
    finished = done = False
    async with aclosing(sse_payloads(response)) as payloads:
        async for payload_batch in payloads:
            if "[DONE]" in payload_batch:
                payload_batch, done = payload_batch[: payload_batch.index("[DONE]")], True
            batch, failure = parse_until_failure(payload_batch, partial(chunk_events, secrets=secrets))
            finished = finished or any(isinstance(event, Finish) for event in batch)
            if batch:
                yield batch
            if failure is not None:
                raise failure
            if done:
                await drain(payloads)
                break
    # Some servers omit [DONE]; an answer is complete when the model said why it stopped.
    if not finished:
        raise UpstreamError("The model provider's stream ended before the answer was complete.")


def chunk_events(data: str | bytes, secrets: tuple[str, ...] = ()) -> list[Event]:
    """The events in one streamed chunk (a `chat.completion.chunk`)."""
    chunk = json_object(data)
    if chunk.get("error"):
        detail = redact(_error_message(chunk["error"]), secrets)
        raise UpstreamError(f"The model provider reported an error: {detail}")
    events: list[Event] = []
    for choice in chunk.get("choices") or ():
        delta = relayed_delta(choice.get("delta") or {})
        if delta:
            events.append(Delta(delta))
        if choice.get("finish_reason"):
            events.append(Finish(choice["finish_reason"]))
    events.extend(_usage(chunk))
    return events


def completion_events(data: bytes) -> list[Event]:
    """The events of a whole `chat.completion`, as if it had been streamed."""
    completion = json_object(data)
    choices = completion.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise UpstreamError("The model provider answered without a choice.")
    message = choices[0].get("message") or {}
    fields = dict(relayed_delta(message))
    if fields.get("tool_calls"):
        fields["tool_calls"] = [{"index": i, **call} for i, call in enumerate(fields["tool_calls"])]
    events: list[Event] = [Delta(fields)] if fields else []
    if choices[0].get("finish_reason"):
        events.append(Finish(choices[0]["finish_reason"]))
    return events + _usage(completion)


def _usage(body: Mapping[str, Any]) -> list[Event]:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return []
    return [Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))]


def _error_message(error: object) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or "unknown error")
    return str(error)
