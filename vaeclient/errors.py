"""What the client raises: the server's own error, with its code, message and field."""

from __future__ import annotations


class VAEError(Exception):
    """Anything the client raises on purpose."""


class APIError(VAEError):
    """The server answered with an error body: `{"error": {"code", "message", "field"}}`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after
