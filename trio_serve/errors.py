"""One exception tree for the whole server.

`ApiError` and its subclasses know the HTTP status and the OpenAI error `type`
they are answered with; `StartupError` is a user mistake found before serving
(one line, exit status 2). Foreign exceptions (h11, httpx, yaml, OSError) are
mapped to these at the edge with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence


class TrioServeError(Exception):
    """Base of every error this package raises on purpose."""


class StartupError(TrioServeError):
    """A user mistake found before serving: printed as one line, exit status 2."""


class ConfigError(StartupError):
    """The role file is missing, unreadable, not YAML, or not a valid role."""


class ApiError(TrioServeError):
    """An error answered to the client with the OpenAI error envelope."""

    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = tuple(headers)


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(ApiError):
    status = 408
    type = "timeout"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class UriTooLong(ApiError):
    status = 414
    type = "invalid_request_error"


class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_exceeded"


class HeaderTooLarge(ApiError):
    status = 431
    type = "invalid_request_error"


class UpstreamError(ApiError):
    """The model provider failed or answered something we cannot use."""

    status = 502
    type = "upstream_error"


class Overloaded(ApiError):
    status = 503
    type = "overloaded"


class GatewayTimeout(ApiError):
    status = 504
    type = "timeout"
