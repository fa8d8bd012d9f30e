"""Choosing and building the provider a role names, and finding its key."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from trio_serve.config import ModelConfig
from trio_serve.errors import StartupError
from trio_serve.providers.anthropic import Anthropic
from trio_serve.providers.base import Provider
from trio_serve.providers.catalog import PROVIDERS
from trio_serve.providers.echo import EchoProvider
from trio_serve.providers.openai_compat import OpenAICompatible
from trio_serve.providers.upstream import DEFAULT_RETRY, RetryPolicy, Upstream


def provider_api_key(model: ModelConfig, env: Mapping[str, str]) -> str | None:
    """The provider key from the environment; a StartupError if it is required and unset.

    A key is required for a provider's own service, and whenever the role names
    the variable; a custom `base_url` (a local server) may go without one.
    """
    spec = PROVIDERS[model.provider]
    variable = model.api_key_env or spec.key_env
    if variable is None:
        return None
    key = env.get(variable, "").strip()
    required = model.api_key_env is not None or model.base_url is None
    if not key and required:
        raise StartupError(f"the {model.provider} provider needs an API key: set the environment variable {variable}")
    return key or None


def make_provider(
    model: ModelConfig,
    *,
    client: httpx.AsyncClient,
    api_key: str | None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Provider:
    spec = PROVIDERS[model.provider]
    if spec.wire == "echo":
        return EchoProvider(delay_s=model.delay_ms / 1000)
    base_url = model.base_url or spec.base_url
    if base_url is None:
        raise StartupError(f"the {model.provider} provider needs model.base_url")
    upstream = Upstream(client=client, provider=model.provider, secrets=(api_key,) if api_key else (), retry=retry)
    wire = Anthropic if spec.wire == "anthropic" else OpenAICompatible
    return wire(upstream=upstream, base_url=base_url, api_key=api_key, model=model)
