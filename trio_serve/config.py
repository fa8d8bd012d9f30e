"""The role file: frozen values and a loader whose errors name file, line or field.

Two layouts load (spec section 2): the envelope (`apiVersion/kind/metadata/spec`)
and the flat one (`name/prompt/model`). Keys of InitRunner features we do not
serve are ignored with a warning; a misspelt key of a section we serve is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from trio_serve.errors import ConfigError
from trio_serve.providers.catalog import PROVIDERS

NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
NAME_MAX_CHARS = 64

# InitRunner features this server does not run; a role using them still serves chat.
UNSERVED_AGENT_KEYS = frozenset(
    {
        "tools", "memory", "triggers", "ingest", "skills", "sinks", "autonomy",
        "reasoning", "capabilities", "daemon", "observability", "output", "hooks",
        "mcp", "knowledge", "delegation", "team", "schedule", "resources", "cli",
    }
)  # fmt: skip
UNSERVED_SECURITY_KEYS = frozenset({"tools", "sandbox", "docker", "audit", "policy", "network", "pii", "secrets"})
UNSERVED_GUARDRAIL_KEYS = frozenset(
    {
        "max_tool_calls", "max_request_limit", "input_tokens_limit",
        "total_tokens_limit", "session_token_budget", "daemon_token_budget",
        "daemon_daily_token_budget", "autonomous_token_budget", "max_iterations",
    }
)  # fmt: skip


class _FieldError(Exception):
    """A role field is wrong; `path` is its dotted location in the file."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class _Section:
    """One mapping of the role file, read field by field with path-aware errors."""

    def __init__(
        self,
        raw: object,
        path: str,
        *,
        allowed: frozenset[str],
        unserved: frozenset[str] = frozenset(),
    ) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _FieldError(path or "role", f"must be a mapping, got {_kind(raw)}")
        self.raw: dict[str, Any] = raw
        self.path = path
        for key in raw:
            if key not in allowed and key not in unserved:
                raise _FieldError(self.where(str(key)), _unknown_key_problem(key, allowed))
        self.ignored = tuple(self.where(k) for k in raw if k in unserved)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def string(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key)
        if value is None:
            if default is None:
                raise _FieldError(self.where(key), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise _FieldError(self.where(key), f"must be a non-empty string, got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _FieldError(self.where(key), f"must be a number, got {value!r}")
        if not low <= value <= high:
            raise _FieldError(self.where(key), f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    def integer(self, key: str, default: int, low: int = 1) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(self.where(key), f"must be a whole number, got {value!r}")
        if value < low:
            raise _FieldError(self.where(key), f"must be at least {low}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise _FieldError(self.where(key), f"must be true or false, got {value!r}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.raw.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _FieldError(self.where(key), f"must be a list of strings, got {value!r}")
        return tuple(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise _FieldError(self.where(key), f"must be a mapping, got {_kind(value)}")
        return value

    def section(self, key: str, allowed: frozenset[str], unserved: frozenset[str] = frozenset()) -> _Section:
        return _Section(self.raw.get(key), self.where(key), allowed=allowed, unserved=unserved)


def _unknown_key_problem(key: object, allowed: frozenset[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}"


@attrs.frozen(kw_only=True)
class ModelConfig:
    provider: str
    name: str
    base_url: str | None = None  # None: the provider's default
    api_key_env: str | None = None  # None: the provider's default variable
    temperature: float = 0.1
    max_tokens: int = 4096
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    extra_headers: Mapping[str, str] = attrs.field(factory=dict)
    extra_body: Mapping[str, Any] = attrs.field(factory=dict)
    delay_ms: float = 0.0  # echo only: pause before each streamed word

    KEYS = frozenset(
        {
            "provider", "name", "base_url", "api_key_env", "temperature", "max_tokens",
            "top_p", "stop", "extra_headers", "extra_body", "delay_ms",
        }
    )  # fmt: skip

    @classmethod
    def from_yaml(cls, raw: object, path: str) -> ModelConfig:
        if isinstance(raw, str):
            return cls._from_shorthand(raw, path)
        fields = _Section(raw, path, allowed=cls.KEYS)
        provider = fields.string("provider")
        if provider not in PROVIDERS:
            raise _FieldError(fields.where("provider"), _unknown_provider(provider))
        return cls(
            provider=provider,
            name=fields.string("name"),
            base_url=_base_url(fields),
            api_key_env=fields.optional_string("api_key_env"),
            temperature=fields.number("temperature", 0.1, 0.0, 2.0),
            max_tokens=fields.integer("max_tokens", 4096),
            top_p=fields.number("top_p", 1.0, 0.0, 1.0) if fields.has("top_p") else None,
            stop=fields.strings("stop"),
            extra_headers=_string_mapping(fields, "extra_headers"),
            extra_body=fields.mapping("extra_body"),
            delay_ms=fields.number("delay_ms", 0.0, 0.0, 60_000.0),
        )

    @classmethod
    def _from_shorthand(cls, text: str, path: str) -> ModelConfig:
        provider, sep, name = text.partition(":")
        if not sep or not provider or not name:
            raise _FieldError(path, f"must be 'provider:model' or a mapping, got {text!r}")
        if provider not in PROVIDERS:
            raise _FieldError(path, _unknown_provider(provider))
        return cls(provider=provider, name=name)


def _unknown_provider(provider: str) -> str:
    return f"unknown provider {provider!r}; known: {', '.join(sorted(PROVIDERS))}"


def _base_url(fields: _Section) -> str | None:
    url = fields.optional_string("base_url")
    if url is None:
        return None
    # Checked here so a typo is one startup error, not a failure on every request.
    problem = _url_problem(url)
    if problem:
        raise _FieldError(fields.where("base_url"), f"{problem}, got {url!r}")
    return url.rstrip("/")


def _url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "needs a host name"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "has an invalid port"
    return None


def _string_mapping(fields: _Section, key: str) -> dict[str, str]:
    value = fields.mapping(key)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _FieldError(fields.where(key), "must map strings to strings")
    return value


@attrs.frozen(kw_only=True)
class Guardrails:
    timeout_seconds: float = 300.0
    max_tokens_per_run: int = 50_000

    KEYS = frozenset({"timeout_seconds", "max_tokens_per_run"})

    @classmethod
    def from_yaml(cls, fields: _Section) -> Guardrails:
        return cls(
            timeout_seconds=fields.number("timeout_seconds", 300.0, 1.0, 86_400.0),
            max_tokens_per_run=fields.integer("max_tokens_per_run", 50_000),
        )


@attrs.frozen(kw_only=True)
class ServerLimits:
    cors_origins: tuple[str, ...] = ()
    max_request_body_bytes: int = 1_048_576
    max_conversations: int = 1000
    conversation_ttl_seconds: float = 3600.0
    require_https: bool = False
    sse_keepalive_seconds: float = 15.0  # a comment line after this much model silence
    max_history_messages: int = 40  # per stored conversation, oldest turns dropped first
    # Overload caps (503 past them): each open stream holds two file descriptors
    # (client and provider) and ~50 KB, so the defaults need ~3,100 descriptors
    # (the CLI raises its soft limit to match) and ~100 MB at most.
    max_connections: int = 2048
    max_upstream_calls: int = 1024

    KEYS = frozenset(
        {
            "cors_origins", "max_request_body_bytes", "max_conversations",
            "conversation_ttl_seconds", "require_https", "sse_keepalive_seconds", "max_history_messages",
            "max_connections", "max_upstream_calls",
        }
    )  # fmt: skip

    @classmethod
    def from_yaml(cls, fields: _Section) -> ServerLimits:
        return cls(
            cors_origins=fields.strings("cors_origins"),
            max_request_body_bytes=fields.integer("max_request_body_bytes", 1_048_576),
            max_conversations=fields.integer("max_conversations", 1000),
            conversation_ttl_seconds=fields.number("conversation_ttl_seconds", 3600.0, 1.0, 1e9),
            require_https=fields.boolean("require_https", False),
            sse_keepalive_seconds=fields.number("sse_keepalive_seconds", 15.0, 1.0, 3600.0),
            max_history_messages=fields.integer("max_history_messages", 40, low=2),
            max_connections=fields.integer("max_connections", 2048),
            max_upstream_calls=fields.integer("max_upstream_calls", 1024),
        )


@attrs.frozen(kw_only=True)
class RateLimit:
    requests_per_minute: int = 60
    burst_size: int = 10

    KEYS = frozenset({"requests_per_minute", "burst_size"})

    @classmethod
    def from_yaml(cls, fields: _Section) -> RateLimit:
        return cls(
            requests_per_minute=fields.integer("requests_per_minute", 60),
            burst_size=fields.integer("burst_size", 10),
        )


@attrs.frozen(kw_only=True)
class ContentPolicy:
    blocked_input_patterns: tuple[str, ...] = ()
    max_prompt_length: int = 50_000

    KEYS = frozenset({"blocked_input_patterns", "max_prompt_length"})

    @classmethod
    def from_yaml(cls, fields: _Section) -> ContentPolicy:
        patterns = fields.strings("blocked_input_patterns")
        for index, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                path = f"{fields.where('blocked_input_patterns')}[{index}]"
                raise _FieldError(path, f"invalid regular expression: {exc}") from exc
        return cls(
            blocked_input_patterns=patterns,
            max_prompt_length=fields.integer("max_prompt_length", 50_000),
        )


@attrs.frozen(kw_only=True)
class Role:
    """An agent to serve: its model id, system prompt, model and limits."""

    name: str
    description: str
    system_prompt: str
    model: ModelConfig
    guardrails: Guardrails = Guardrails()
    server: ServerLimits = ServerLimits()
    rate_limit: RateLimit = RateLimit()
    content: ContentPolicy = ContentPolicy()
    ignored_keys: tuple[str, ...] = ()  # unserved InitRunner features, for one warning

    @classmethod
    def from_yaml(cls, raw: object) -> Role:
        """Build from a parsed role file of either layout."""
        if isinstance(raw, dict) and {"apiVersion", "kind", "metadata", "spec"} & raw.keys():
            return cls._from_envelope(raw)
        return cls._from_flat(raw)

    @classmethod
    def _from_envelope(cls, raw: dict[str, Any]) -> Role:
        top = _Section(raw, "", allowed=frozenset({"apiVersion", "kind", "metadata", "spec"}))
        api_version = top.string("apiVersion", "initrunner/v1")
        if not api_version.startswith("initrunner/"):
            raise _FieldError("apiVersion", f"must be initrunner/v1, got {api_version!r}")
        if top.string("kind", "Agent") != "Agent":
            raise _FieldError("kind", f"must be Agent, got {raw.get('kind')!r}")
        meta = top.section(
            "metadata",
            frozenset({"name", "description", "tags", "version", "author", "labels"}),
        )
        spec = top.section("spec", frozenset({"role", "model", "guardrails", "security"}), UNSERVED_AGENT_KEYS)
        return cls._build(meta, "name", spec, "role")

    @classmethod
    def _from_flat(cls, raw: object) -> Role:
        allowed = frozenset({"name", "description", "prompt", "model", "guardrails", "security"})
        top = _Section(raw, "", allowed=allowed, unserved=UNSERVED_AGENT_KEYS)
        return cls._build(top, "name", top, "prompt")

    @classmethod
    def _build(cls, meta: _Section, name_key: str, body: _Section, prompt_key: str) -> Role:
        name = _agent_name(meta, name_key)
        if body.raw.get("model") is None:
            raise _FieldError(body.where("model"), "is required")
        guardrails = body.section("guardrails", Guardrails.KEYS, UNSERVED_GUARDRAIL_KEYS)
        security = body.section("security", frozenset({"server", "rate_limit", "content"}), UNSERVED_SECURITY_KEYS)
        return cls(
            name=name,
            description=str(meta.raw.get("description") or ""),
            system_prompt=body.string(prompt_key),
            model=ModelConfig.from_yaml(body.raw["model"], body.where("model")),
            guardrails=Guardrails.from_yaml(guardrails),
            server=ServerLimits.from_yaml(security.section("server", ServerLimits.KEYS)),
            rate_limit=RateLimit.from_yaml(security.section("rate_limit", RateLimit.KEYS)),
            content=ContentPolicy.from_yaml(security.section("content", ContentPolicy.KEYS)),
            ignored_keys=body.ignored + guardrails.ignored + security.ignored,
        )


def _agent_name(fields: _Section, key: str) -> str:
    name = fields.string(key)
    if len(name) > NAME_MAX_CHARS or not NAME_RE.match(name):
        raise _FieldError(
            fields.where(key),
            f"must be lowercase letters, digits and inner hyphens (at most {NAME_MAX_CHARS}), got {name!r}",
        )
    return name


def load_role(path: Path) -> Role:
    """Read and validate a role file; every problem is one ConfigError line."""
    raw = _read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the role file is empty")
    try:
        return Role.from_yaml(raw)
    except _FieldError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: role file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a role file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read role file: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(path, exc)) from None


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{path}: invalid YAML: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
