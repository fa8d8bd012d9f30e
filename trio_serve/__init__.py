"""trio_serve: an InitRunner agent behind an OpenAI-compatible HTTP API, on Trio."""

__version__ = "0.1.0"
