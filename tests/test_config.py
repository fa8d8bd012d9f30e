"""Role loading: both layouts, defaults, and errors that name file, line or field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from trio_serve.config import load_role
from trio_serve.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "role.yaml"
    path.write_text(textwrap.dedent(text))
    return path


ENVELOPE = """\
    apiVersion: initrunner/v1
    kind: Agent
    metadata: {name: my-agent, description: Helps.}
    spec:
      role: "You are a helpful assistant."
      model: {provider: openai, name: gpt-4o-mini, temperature: 0.3, max_tokens: 1000}
      guardrails: {timeout_seconds: 60, max_tokens_per_run: 50000}
      security:
        server: {cors_origins: ["https://a.example"], max_request_body_bytes: 2048, max_conversations: 5}
        rate_limit: {requests_per_minute: 120, burst_size: 20}
        content: {blocked_input_patterns: ["ignore previous"], max_prompt_length: 100}
    """


def test_envelope_layout_loads_every_section(tmp_path: Path) -> None:
    role = load_role(write(tmp_path, ENVELOPE))
    assert role.name == "my-agent"
    assert role.description == "Helps."
    assert role.system_prompt == "You are a helpful assistant."
    assert (role.model.provider, role.model.name) == ("openai", "gpt-4o-mini")
    assert (role.model.temperature, role.model.max_tokens) == (0.3, 1000)
    assert role.guardrails.timeout_seconds == 60
    assert role.server.cors_origins == ("https://a.example",)
    assert role.server.max_request_body_bytes == 2048
    assert role.server.max_conversations == 5
    assert (role.rate_limit.requests_per_minute, role.rate_limit.burst_size) == (120, 20)
    assert role.content.blocked_input_patterns == ("ignore previous",)
    assert role.ignored_keys == ()


def test_flat_layout_with_shorthand_model_and_defaults(tmp_path: Path) -> None:
    role = load_role(write(tmp_path, "name: flat-agent\nprompt: Be brief.\nmodel: openai:gpt-4o-mini\n"))
    assert (role.name, role.system_prompt) == ("flat-agent", "Be brief.")
    assert (role.model.provider, role.model.name) == ("openai", "gpt-4o-mini")
    assert (role.model.temperature, role.model.max_tokens) == (0.1, 4096)
    assert role.server.max_request_body_bytes == 1_048_576
    assert role.guardrails.timeout_seconds == 300


def test_model_mapping_optional_keys(tmp_path: Path) -> None:
    role = load_role(
        write(
            tmp_path,
            """\
            name: a
            prompt: p
            model:
              provider: openai
              name: local
              base_url: http://localhost:8080/v1/
              api_key_env: LOCAL_KEY
              top_p: 0.9
              stop: ["END"]
              extra_headers: {X-Team: research}
              extra_body: {reasoning_effort: low}
            """,
        )
    )
    model = role.model
    assert model.base_url == "http://localhost:8080/v1"  # trailing slash removed
    assert (model.api_key_env, model.top_p, model.stop) == ("LOCAL_KEY", 0.9, ("END",))
    assert model.extra_headers == {"X-Team": "research"}
    assert model.extra_body == {"reasoning_effort": "low"}


def test_unserved_initrunner_features_are_ignored_and_reported(tmp_path: Path) -> None:
    text = ENVELOPE.rstrip(" ") + "      tools: [{type: shell}]\n      memory: {max_sessions: 3}\n"
    role = load_role(write(tmp_path, text))
    assert role.ignored_keys == ("spec.tools", "spec.memory")


BAD_ROLES = [
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, temperature: 7}\n",
     "model.temperature: must be between 0 and 2, got 7"),
    (ENVELOPE.replace("temperature: 0.3", "temperature: 7"),
     "spec.model.temperature: must be between 0 and 2, got 7"),
    (ENVELOPE.replace("max_tokens: 1000", "max_tokns: 1000"),
     "spec.model.max_tokns: unknown key (did you mean 'max_tokens'?)"),
    (ENVELOPE.replace("burst_size", "burst_sise"),
     "spec.security.rate_limit.burst_sise: unknown key (did you mean 'burst_size'?)"),
    ("name: My Agent\nprompt: p\nmodel: openai:m\n", "name: must be lowercase letters"),
    ("name: a\nprompt: p\nmodel: nope:m\n", "model: unknown provider 'nope'"),
    ("name: a\nprompt: p\nmodel: gpt-4o\n", "model: must be 'provider:model' or a mapping"),
    ("name: a\nprompt: p\n", "model: is required"),
    ("name: a\nmodel: openai:m\n", "prompt: is required"),
    ("prompt: p\nmodel: openai:m\n", "name: is required"),
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, max_tokens: 0}\n",
     "model.max_tokens: must be at least 1, got 0"),
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, max_tokens: many}\n",
     "model.max_tokens: must be a whole number, got 'many'"),
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, base_url: ftp://x}\n",
     "model.base_url: must start with http:// or https://"),
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, base_url: 'http://127.0.0.1:Error/v1'}\n",
     "model.base_url: has an invalid port, got 'http://127.0.0.1:Error/v1'"),
    ("name: a\nprompt: p\nmodel: {provider: openai, name: m, base_url: 'http:///v1'}\n",
     "model.base_url: needs a host name"),
    ("name: a\nprompt: p\nmodel: openai:m\nsecurity: {content: {blocked_input_patterns: ['(']}}\n",
     "security.content.blocked_input_patterns[0]: invalid regular expression"),
    (ENVELOPE.replace("kind: Agent", "kind: Team"), "kind: must be Agent, got 'Team'"),
    ("- a\n- b\n", "role: must be a mapping, got list"),
    ("", "the role file is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD_ROLES)
def test_invalid_roles_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_role(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_yaml_errors_name_the_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\nprompt: p\nmodel: {provider: openai\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:1: invalid YAML: "):
        load_role(path)


def test_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: role file not found$"):
        load_role(tmp_path / "missing.yaml")


def test_directory_is_not_a_role_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_role(tmp_path)


def test_bundled_examples_load() -> None:
    examples = Path(__file__).parent.parent / "examples"
    role = load_role(examples / "hello.yaml")
    assert (role.name, role.model.provider) == ("hello", "echo")
    assert load_role(examples / "openai.yaml").model.provider == "openai"
