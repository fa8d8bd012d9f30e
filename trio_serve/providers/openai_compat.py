"""Providers that speak the OpenAI chat completions wire format, over httpx.

Always streams upstream, whatever the client asked: usage is requested with
`stream_options.include_usage`, each upstream delta becomes one `Delta`, and
leaving the context closes the HTTP request so the provider stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

from trio_serve.config import ModelConfig
from trio_serve.errors import UpstreamError
from trio_serve.openai import relayed_delta
from trio_serve.providers.base import Delta, Event, Finish, ModelCall, Usage
from trio_serve.sse import SseDecoder


class OpenAICompatible:
    def __init__(self, *, client: httpx.AsyncClient, base_url: str, api_key: str | None, model: ModelConfig) -> None:
        self._client = client
        self._url = f"{base_url}/chat/completions"
        self._model = model
        self._headers = {"content-type": "application/json", "accept": "text/event-stream"}
        self._headers.update(model.extra_headers)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    @asynccontextmanager
    async def stream(self, call: ModelCall) -> AsyncIterator[AsyncIterator[Event]]:
        request = self._client.build_request(
            "POST", self._url, content=orjson.dumps(self.payload(call)), headers=self._headers
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The model provider could not be reached ({type(exc).__name__}).") from exc
        try:
            if response.status_code != 200:
                raise UpstreamError(f"The model provider answered HTTP {response.status_code}.")
            events = _events(response)
            try:
                yield events
            finally:
                await events.aclose()
        finally:
            await response.aclose()

    def payload(self, call: ModelCall) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model.name,
            "messages": list(call.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
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
        body.update(self._model.extra_body)
        return body


async def _events(response: httpx.Response) -> AsyncGenerator[Event, None]:
    decoder = SseDecoder()
    finished = False
    try:
        async for line in response.aiter_lines():
            data = decoder.feed_line(line)
            if data is None:
                continue
            if data == "[DONE]":
                break
            for event in _chunk_events(data):
                finished = finished or isinstance(event, Finish)
                yield event
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The model provider's stream broke off ({type(exc).__name__}).") from exc
    if not finished:
        raise UpstreamError("The model provider's stream ended before the answer was complete.")


def _chunk_events(data: str) -> list[Event]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("The model provider sent a malformed stream frame.") from None
    if not isinstance(chunk, dict):
        raise UpstreamError("The model provider sent a malformed stream frame.")
    if chunk.get("error"):
        raise UpstreamError(f"The model provider reported an error: {_error_message(chunk['error'])}")
    events: list[Event] = []
    for choice in chunk.get("choices") or ():
        delta = relayed_delta(choice.get("delta") or {})
        if delta:
            events.append(Delta(delta))
        if choice.get("finish_reason"):
            events.append(Finish(choice["finish_reason"]))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        events.append(Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
    return events


def _error_message(error: object) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or "unknown error")
    return str(error)
