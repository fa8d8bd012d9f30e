"""Secrets out of text: provider keys, Bearer tokens and key-shaped strings.

Used wherever text from elsewhere (a provider's error message, a prompt for the
audit log) is shown or stored, so no key ever leaves through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
_BEARER_RE = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
# sk-... (OpenAI, Anthropic sk-ant-..., DeepSeek), gsk_... (Groq), xai-... (xAI)
_KEY_RE = re.compile(r"\b(sk|gsk|xai)([-_])[A-Za-z0-9_\-]{8,}")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with each known secret and anything shaped like a key replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _BEARER_RE.sub(rf"\1 {REDACTED}", text)
    return _KEY_RE.sub(rf"\1\2{REDACTED}", text)
