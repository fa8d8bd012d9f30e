"""Our own checks of the official OpenAI response schemas.

Written from the OpenAPI definitions of CreateChatCompletionResponse,
CreateChatCompletionStreamResponse, CompletionUsage, ErrorResponse,
ListModelsResponse and Model: every required key present with its type, and
no key the schema does not define, so "matches the schema" means exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


def _keys(obj: Any, required: set[str], optional: set[str] = frozenset(), where: str = "") -> None:
    assert isinstance(obj, Mapping), f"{where}: expected an object, got {obj!r}"
    missing = required - obj.keys()
    assert not missing, f"{where}: missing required {sorted(missing)} in {obj!r}"
    extra = obj.keys() - required - optional
    assert not extra, f"{where}: keys the schema does not define {sorted(extra)} in {obj!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_or_null(value: Any, where: str) -> None:
    assert value is None or isinstance(value, str), f"{where}: expected string or null, got {value!r}"


def check_usage(usage: Any, where: str = "usage") -> None:
    _keys(usage, {"prompt_tokens", "completion_tokens", "total_tokens"},
          {"completion_tokens_details", "prompt_tokens_details"}, where)  # fmt: skip
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert _is_int(usage[key]) and usage[key] >= 0, f"{where}.{key}: {usage[key]!r}"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_tool_call(call: Any, where: str) -> None:
    _keys(call, {"id", "type", "function"}, set(), where)
    assert call["type"] == "function" and isinstance(call["id"], str)
    _keys(call["function"], {"name", "arguments"}, set(), f"{where}.function")
    assert isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)


def check_tool_call_chunk(call: Any, where: str) -> None:
    _keys(call, {"index"}, {"id", "type", "function"}, where)
    assert _is_int(call["index"])
    if "function" in call:
        _keys(call["function"], set(), {"name", "arguments"}, f"{where}.function")


def _check_header(obj: Any, kind: str, where: str) -> None:
    assert obj["object"] == kind, f"{where}.object: {obj['object']!r}"
    assert isinstance(obj["id"], str) and obj["id"], f"{where}.id"
    assert _is_int(obj["created"]), f"{where}.created"
    assert isinstance(obj["model"], str), f"{where}.model"
    assert isinstance(obj["choices"], list), f"{where}.choices"


def check_chat_completion(obj: Any) -> None:
    where = "chat.completion"
    _keys(obj, {"id", "object", "created", "model", "choices"},
          {"usage", "system_fingerprint", "service_tier", "metadata", "moderation"}, where)  # fmt: skip
    _check_header(obj, "chat.completion", where)
    for index, choice in enumerate(obj["choices"]):
        at = f"{where}.choices[{index}]"
        _keys(choice, {"finish_reason", "index", "message", "logprobs"}, set(), at)
        assert choice["finish_reason"] in FINISH_REASONS, f"{at}.finish_reason"
        assert _is_int(choice["index"]) and choice["logprobs"] is None
        message = choice["message"]
        _keys(message, {"role", "content", "refusal"},
              {"tool_calls", "annotations", "function_call", "audio"}, f"{at}.message")  # fmt: skip
        assert message["role"] == "assistant"
        _string_or_null(message["content"], f"{at}.message.content")
        _string_or_null(message["refusal"], f"{at}.message.refusal")
        for n, call in enumerate(message.get("tool_calls", [])):
            check_tool_call(call, f"{at}.message.tool_calls[{n}]")
    if "usage" in obj:
        check_usage(obj["usage"])


def check_chunk(obj: Any) -> None:
    where = "chat.completion.chunk"
    _keys(obj, {"id", "object", "created", "model", "choices"},
          {"usage", "system_fingerprint", "service_tier", "obfuscation", "moderation"}, where)  # fmt: skip
    _check_header(obj, "chat.completion.chunk", where)
    for index, choice in enumerate(obj["choices"]):
        at = f"{where}.choices[{index}]"
        _keys(choice, {"delta", "finish_reason", "index"}, {"logprobs"}, at)
        assert choice["finish_reason"] is None or choice["finish_reason"] in FINISH_REASONS
        assert _is_int(choice["index"])
        delta = choice["delta"]
        _keys(delta, set(), {"content", "function_call", "tool_calls", "role", "refusal"}, f"{at}.delta")
        if "role" in delta:
            assert delta["role"] in {"developer", "system", "user", "assistant", "tool"}
        _string_or_null(delta.get("content"), f"{at}.delta.content")
        for n, call in enumerate(delta.get("tool_calls", [])):
            check_tool_call_chunk(call, f"{at}.delta.tool_calls[{n}]")
    if obj.get("usage") is not None:
        check_usage(obj["usage"])


def check_error(obj: Any) -> None:
    _keys(obj, {"error"}, set(), "error response")
    error = obj["error"]
    _keys(error, {"message", "type", "param", "code"}, set(), "error")
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    _string_or_null(error["param"], "error.param")
    _string_or_null(error["code"], "error.code")


def check_model(obj: Any) -> None:
    _keys(obj, {"id", "object", "created", "owned_by"}, {"shutdown_date"}, "model")
    assert obj["object"] == "model" and isinstance(obj["id"], str)
    assert _is_int(obj["created"]) and isinstance(obj["owned_by"], str)


def check_model_list(obj: Any) -> None:
    _keys(obj, {"object", "data"}, set(), "model list")
    assert obj["object"] == "list" and isinstance(obj["data"], list)
    for model in obj["data"]:
        check_model(model)
