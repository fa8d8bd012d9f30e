"""Anthropic's Messages API, spoken natively and translated both ways.

OpenAI-shaped calls become `POST {base_url}/v1/messages` requests (system text
lifted to the top-level `system`, tool calls to `tool_use` blocks, tool
results to `tool_result` blocks, images to image sources), and Anthropic's
stream events become OpenAI-shaped `Delta`, `Finish` and `Usage` events.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import httpx
import orjson

from trio_serve.config import ModelConfig
from trio_serve.errors import InvalidRequest, UpstreamError
from trio_serve.openai import text_of
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

ANTHROPIC_VERSION = "2023-06-01"
MAX_TEMPERATURE = 1.0  # Anthropic's range is 0-1, OpenAI's 0-2: higher is clamped
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class Anthropic:
    def __init__(self, *, upstream: Upstream, base_url: str, api_key: str | None, model: ModelConfig) -> None:
        self._upstream = upstream
        self._url = f"{base_url}/v1/messages"
        self._model = model
        fixed = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        key = {"x-api-key": api_key} if api_key else {}
        self._headers = request_headers(fixed, model.extra_headers, key)

    def stream(self, call: ModelCall) -> AbstractAsyncContextManager[AsyncIterator[Batch]]:
        body = orjson.dumps(anthropic_request(call, self._model))
        headers = accepting(self._headers, streamed=call.stream)
        return self._upstream.answer(self._url, body, headers, streamed=_stream_events, whole=message_events)


# -- requests: OpenAI shape to Anthropic -----------------------------------------


def anthropic_request(call: ModelCall, model: ModelConfig) -> dict[str, Any]:
    system = "\n\n".join(text_of(m) for m in call.messages if m["role"] == "system")
    body: dict[str, Any] = {
        "model": model.name,
        "max_tokens": call.max_tokens,  # required by Anthropic, always sent
        "messages": _messages([m for m in call.messages if m["role"] != "system"]),
        "stream": call.stream,
        "temperature": min(call.temperature, MAX_TEMPERATURE),
    }
    if system:
        body["system"] = system
    if call.top_p is not None:
        body["top_p"] = call.top_p
    if call.stop:
        body["stop_sequences"] = list(call.stop)
    if call.tools:
        body["tools"] = [_tool(tool) for tool in call.tools]
        if call.tool_choice is not None:
            body["tool_choice"] = _tool_choice(call.tool_choice)
    body.update(model.extra_body)
    return body


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic turns, consecutive same-role messages merged (tool results in one turn)."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, blocks = _turn(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return turns


def _turn(message: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    if message["role"] == "tool":
        result = {"type": "tool_result", "tool_use_id": message["tool_call_id"], "content": text_of(message)}
        return "user", [result]
    blocks = _content_blocks(message.get("content"))
    if message["role"] == "assistant":
        blocks += [_tool_use(call) for call in message.get("tool_calls") or ()]
        return "assistant", blocks
    return "user", blocks


def _content_blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content if isinstance(content, list) else ():
        if part["type"] == "text" and part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
        elif part["type"] == "image_url":
            blocks.append(_image(part))
        elif part["type"] not in ("text", "refusal"):
            raise InvalidRequest(
                f"Content parts of type '{part['type']}' are not supported by the anthropic provider.",
                param="messages",
            )
    return blocks


def _image(part: Mapping[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest("An image_url part needs a 'url' string.", param="messages")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header.removeprefix("data:").split(";")[0]
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = orjson.loads(function.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("A tool call's 'arguments' must be a JSON object.", param="messages") from None
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments}


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    converted = {"name": function.get("name"), "input_schema": function.get("parameters") or {"type": "object"}}
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _tool_choice(choice: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(choice, str):
        return {"type": {"auto": "auto", "required": "any", "none": "none"}.get(choice, "auto")}
    name = (choice.get("function") or {}).get("name")
    return {"type": "tool", "name": name} if name else {"type": "auto"}


# -- responses: Anthropic events to OpenAI shape -----------------------------------


class StreamTranslator:
    """Turns Anthropic stream events, one `data:` payload at a time, into our events."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets = secrets
        self._input_tokens = 0
        self._output_tokens = 0
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self.stopped = False  # message_stop seen: the answer is complete

    def feed(self, data: str) -> list[Event]:
        event = json_object(data)
        handler = getattr(self, "_on_" + str(event.get("type")), None)
        return handler(event) if handler is not None else []  # ping, content_block_stop, ...

    def _on_message_start(self, event: Mapping[str, Any]) -> list[Event]:
        usage = (event.get("message") or {}).get("usage") or {}
        self._input_tokens = _input_tokens(usage)
        self._output_tokens = int(usage.get("output_tokens") or 0)
        return []

    def _on_content_block_start(self, event: Mapping[str, Any]) -> list[Event]:
        block = event.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = self._tool_index.setdefault(event["index"], len(self._tool_index))
            call = {"index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}  # fmt: skip
            return [Delta({"tool_calls": [call]})]
        if block.get("type") == "text" and block.get("text"):
            return [Delta({"content": block["text"]})]
        return []

    def _on_content_block_delta(self, event: Mapping[str, Any]) -> list[Event]:
        delta = event.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [Delta({"content": delta["text"]})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            fragment = {
                "index": self._tool_index.get(event["index"], 0),
                "function": {"arguments": delta["partial_json"]},
            }
            return [Delta({"tool_calls": [fragment]})]
        return []  # thinking and signature deltas are not part of the OpenAI answer

    def _on_message_delta(self, event: Mapping[str, Any]) -> list[Event]:
        usage = event.get("usage") or {}
        if usage.get("output_tokens") is not None:
            self._output_tokens = int(usage["output_tokens"])
        reason = (event.get("delta") or {}).get("stop_reason")
        return [Finish(FINISH_REASONS.get(reason, "stop"))] if reason else []

    def _on_message_stop(self, event: Mapping[str, Any]) -> list[Event]:
        self.stopped = True
        return [Usage(self._input_tokens, self._output_tokens)]

    def _on_error(self, event: Mapping[str, Any]) -> list[Event]:
        error = event.get("error") or {}
        detail = redact(str(error.get("message") or error.get("type") or "unknown error"), self._secrets)
        raise UpstreamError(f"The model provider reported an error: {detail}")


def message_events(data: bytes) -> list[Event]:
    """The events of a whole (non-streamed) Anthropic message."""
    message = json_object(data)
    text = "".join(b.get("text", "") for b in message.get("content") or () if b.get("type") == "text")
    calls = [
        {"index": i, "id": b.get("id"), "type": "function",
         "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
        for i, b in enumerate(b for b in message.get("content") or () if b.get("type") == "tool_use")
    ]  # fmt: skip
    fields: dict[str, Any] = {}
    if text:
        fields["content"] = text
    if calls:
        fields["tool_calls"] = calls
    events: list[Event] = [Delta(fields)] if fields else []
    if message.get("stop_reason"):
        events.append(Finish(FINISH_REASONS.get(message["stop_reason"], "stop")))
    usage = message.get("usage") or {}
    return [*events, Usage(_input_tokens(usage), int(usage.get("output_tokens") or 0))]


def _input_tokens(usage: Mapping[str, Any]) -> int:
    # Cached prompt tokens are still prompt tokens to an OpenAI client.
    keys = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(int(usage.get(key) or 0) for key in keys)


async def _stream_events(response: httpx.Response, secrets: tuple[str, ...]) -> AsyncGenerator[Batch, None]:
    translator = StreamTranslator(secrets)
    async with aclosing(sse_payloads(response)) as payloads:
        async for payload_batch in payloads:
            batch, failure = parse_until_failure(payload_batch, translator.feed)
            if batch:
                yield batch
            if failure is not None:
                raise failure
            if translator.stopped:
                await drain(payloads)
                return
    raise UpstreamError("The model provider's stream ended before the answer was complete.")
