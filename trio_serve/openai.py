"""The OpenAI chat completions format, without IO.

Parses and validates requests (errors name the offending `param`), maps them
to a `ModelCall` within the role's bounds, and builds responses, stream chunks
and error envelopes exactly as the official schemas describe them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from trio_serve.config import Role
from trio_serve.errors import ApiError, InvalidRequest
from trio_serve.http import Response
from trio_serve.providers.base import ModelCall, Usage

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal")
DELTA_KEYS = ("content", "tool_calls", "refusal")
MAX_STOP_SEQUENCES = 4  # the OpenAI API's own limit

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"  # a comment line: clients ignore it, proxies see traffic
SSE_HEADERS = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # tells nginx not to buffer the stream
)
JSON_HEADERS = (("content-type", "application/json"),)


# -- requests ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ChatRequest:
    messages: tuple[Mapping[str, Any], ...]
    model: str = ""
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    response_format: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, body: bytes) -> ChatRequest:
        """Parse a request body; InvalidRequest names the field that is wrong."""
        fields = _json_object(body)
        stream = _optional(fields, "stream", bool) or False
        return cls(
            messages=_messages(fields.get("messages")),
            model=_optional(fields, "model", str) or "",
            stream=stream,
            include_usage=_include_usage(fields, stream),
            temperature=_number(fields, "temperature", 0.0, 2.0),
            top_p=_number(fields, "top_p", 0.0, 1.0),
            max_tokens=_max_tokens(fields),
            stop=_stop(fields.get("stop")),
            seed=_optional(fields, "seed", int),
            tools=tuple(_optional(fields, "tools", list) or ()),
            tool_choice=_tool_choice(fields.get("tool_choice")),
            response_format=_optional(fields, "response_format", dict),
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return fields


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", list: "an array",
             dict: "an object", float: "a number"}  # fmt: skip
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _optional(fields: Mapping[str, Any], key: str, kind: type) -> Any:
    value = fields.get(key)
    if value is None:
        return None
    # bool is an int in Python, but never a number in JSON schemas.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"'{key}' must be {_type_name(kind)}.", param=key)
    return value


def _number(fields: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{key}' must be a number.", param=key)
    if not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be between {low:g} and {high:g}, got {value}.", param=key)
    return float(value)


def _max_tokens(fields: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = _optional(fields, key, int)
        if value is not None:
            if value < 1:
                raise InvalidRequest(f"'{key}' must be at least 1, got {value}.", param=key)
            return int(value)
    return None


def _include_usage(fields: Mapping[str, Any], stream: bool) -> bool:
    options = _optional(fields, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean.", param="stream_options.include_usage")
    return value


def _stop(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("'stop' must be a string or an array of strings.", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return tuple(stops)


def _tool_choice(value: object) -> str | Mapping[str, Any] | None:
    if value is None or isinstance(value, str | dict):
        return value
    raise InvalidRequest("'tool_choice' must be a string or an object.", param="tool_choice")


def _messages(value: object) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    messages = tuple(_message(item, f"messages[{index}]") for index, item in enumerate(value))
    if not any(message["role"] == "user" for message in messages):
        raise InvalidRequest("'messages' must contain at least one user message.", param="messages")
    return messages


def _message(item: object, param: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param)
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        allowed = ", ".join(sorted(MESSAGE_ROLES))
        raise InvalidRequest(f"'{param}.role' must be one of {allowed}; got {role!r}.", param=f"{param}.role")
    content = item.get("content")
    _check_content(content, role, item, f"{param}.content")
    if role == "tool" and not isinstance(item.get("tool_call_id"), str):
        raise InvalidRequest(f"'{param}.tool_call_id' must be a string.", param=f"{param}.tool_call_id")
    if item.get("tool_calls") is not None and not isinstance(item["tool_calls"], list):
        raise InvalidRequest(f"'{param}.tool_calls' must be an array.", param=f"{param}.tool_calls")
    return {key: item[key] for key in MESSAGE_KEYS if key in item}


def _check_content(content: object, role: str, item: Mapping[str, Any], param: str) -> None:
    if isinstance(content, str):
        return
    if content is None:
        # Only an assistant turn may be content-less, and only when it calls tools.
        if role == "assistant" and (item.get("tool_calls") or item.get("refusal")):
            return
        raise InvalidRequest(f"'{param}' must be a string or an array of parts.", param=param)
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of parts.", param=param)
    for index, part in enumerate(content):
        _check_part(part, f"{param}[{index}]")


def _check_part(part: object, param: str) -> None:
    if not isinstance(part, dict) or part.get("type") not in CONTENT_PART_TYPES:
        allowed = ", ".join(sorted(CONTENT_PART_TYPES))
        raise InvalidRequest(f"'{param}' must be an object whose 'type' is one of {allowed}.", param=param)
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise InvalidRequest(f"'{param}.text' must be a string.", param=f"{param}.text")


def text_of(message: Mapping[str, Any]) -> str:
    """The plain text of a message, whatever shape its content has."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if part.get("type") == "text")
    return ""


def model_call(role: Role, chat: ChatRequest) -> ModelCall:
    """The call to make upstream: the role's prompt first, the client's sampling
    honoured within the role's bounds, the role's settings as defaults."""
    model = role.model
    system = {"role": "system", "content": role.system_prompt}
    max_tokens = model.max_tokens if chat.max_tokens is None else min(chat.max_tokens, model.max_tokens)
    return ModelCall(
        messages=(system, *(_upstream_message(m) for m in chat.messages)),
        temperature=model.temperature if chat.temperature is None else chat.temperature,
        max_tokens=max_tokens,
        top_p=chat.top_p if chat.top_p is not None else model.top_p,
        stop=chat.stop if chat.stop is not None else model.stop,
        seed=chat.seed,
        tools=chat.tools,
        tool_choice=chat.tool_choice,
        response_format=chat.response_format,
        stream=chat.stream,
    )


def _upstream_message(message: Mapping[str, Any]) -> Mapping[str, Any]:
    # Many OpenAI-compatible providers do not know "developer"; it means system.
    if message["role"] == "developer":
        return {**message, "role": "system"}
    return message


# -- responses ---------------------------------------------------------------


def error_body(error: ApiError) -> bytes:
    """The OpenAI error envelope, all four keys always present."""
    return orjson.dumps(
        {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    )


def error_response(error: ApiError) -> Response:
    return Response(status=error.status, headers=JSON_HEADERS + error.headers, body=error_body(error))


def usage_object(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    message: Mapping[str, Any],
    finish_reason: str,
    usage: Usage | None,
) -> bytes:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage_object(usage)
    return orjson.dumps(body)


class ChunkEncoder:
    """SSE frames of one streamed completion.

    Every chunk of a response shares its id, created time and model, so the
    bytes around each delta are built once per stream and only the delta is
    serialised per token: the hot path is one small orjson call.
    """

    def __init__(self, *, completion_id: str, created: int, model: str) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )
        self._prefix = b"data: " + head[:-1] + b',"choices":'
        self._delta_prefix = self._prefix + b'[{"index":0,"delta":'

    def delta(self, fields: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
        finish = orjson.dumps(finish_reason)
        return self._delta_prefix + orjson.dumps(fields) + b',"logprobs":null,"finish_reason":' + finish + b"}]}\n\n"

    def role(self) -> bytes:
        return self.delta({"role": "assistant", "content": ""})

    def finish(self, reason: str) -> bytes:
        return self.delta({}, reason)

    def usage(self, usage: Usage) -> bytes:
        return self._prefix + b'[],"usage":' + orjson.dumps(usage_object(usage)) + b"}\n\n"


def sse_error(error: ApiError) -> bytes:
    """A failure after the stream started: an in-band error event, then [DONE]."""
    return b"data: " + error_body(error) + b"\n\n" + SSE_DONE


def relayed_delta(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an upstream delta the schema allows; empty when nothing new."""
    delta = {key: fields[key] for key in DELTA_KEYS if fields.get(key) is not None}
    if delta.get("content") == "" and len(delta) == 1:
        return {}
    return delta


class MessageAssembler:
    """Joins streamed deltas into one assistant message, tool calls included."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}

    def add(self, fields: Mapping[str, Any]) -> None:
        if fields.get("content"):
            self._content.append(fields["content"])
        if fields.get("refusal"):
            self._refusal.append(fields["refusal"])
        for fragment in fields.get("tool_calls") or ():
            self._add_tool_call(fragment)

    def _add_tool_call(self, fragment: Mapping[str, Any]) -> None:
        call = self._tool_calls.setdefault(
            fragment.get("index", 0),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if fragment.get("id"):
            call["id"] = fragment["id"]
        function = fragment.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content) if self._content or not self._tool_calls else None,
            "refusal": "".join(self._refusal) or None,
        }
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return message
