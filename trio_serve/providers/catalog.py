"""Which providers exist, which wire format each speaks, and their defaults.

Pure data: the role loader validates against it without importing httpx.
"""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class ProviderSpec:
    wire: str  # "openai", "anthropic" or "echo": which module speaks to it
    base_url: str | None  # None: no network (echo) or the role must give one
    key_env: str | None  # environment variable holding the key; None: no key needed


_OPENAI_COMPATIBLE: dict[str, tuple[str, str | None]] = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "ollama": ("http://localhost:11434/v1", None),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "together": ("https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "xai": ("https://api.x.ai/v1", "XAI_API_KEY"),
    "fireworks": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    "google": ("https://generativelanguage.googleapis.com/v1beta/openai", "GOOGLE_API_KEY"),
}

PROVIDERS: dict[str, ProviderSpec] = {
    name: ProviderSpec(wire="openai", base_url=url, key_env=env) for name, (url, env) in _OPENAI_COMPATIBLE.items()
}
PROVIDERS["anthropic"] = ProviderSpec(
    wire="anthropic", base_url="https://api.anthropic.com", key_env="ANTHROPIC_API_KEY"
)
PROVIDERS["echo"] = ProviderSpec(wire="echo", base_url=None, key_env=None)
