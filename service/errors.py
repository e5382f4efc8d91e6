"""The service's errors, and the one place that maps them to HTTP responses.

Every error body has the same shape:
    {"error": {"code": "invalid_input", "message": "...", "field": "inputs[2]"}}
`field` names the request field at fault, or is null. Under /v2 (the Open Inference Protocol) the
body is that protocol's `{"error": "..."}`, with the same status code.
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.batching import BatchFailed, QueueFull

log = logging.getLogger("vaeserve")


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = 6
_SHORT.maxdict, _SHORT.maxlevel = 4, 2
MAX_MESSAGE = 2000  # characters: a backstop; what was sent is quoted through `quoted` in the first place


def quoted(value: object) -> str:
    """A short repr of what a client sent: an error names it without echoing megabytes back."""
    return _SHORT.repr(value)


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class MalformedBody(ServiceError):
    status, code = 400, "malformed_body"


class NotAllowed(ServiceError):
    """A request this server refuses by design (Triton's explicit load/unload, which it answers 400 in poll mode)."""

    status, code = 400, "not_allowed"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class NotAcceptable(ServiceError):
    status, code = 406, "not_acceptable"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Timeout(ServiceError):
    status, code = 504, "timeout"


class ClientGone(ServiceError):
    """The client closed its connection while its request ran; nobody reads this answer (nginx's 499)."""

    status, code = 499, "client_closed_request"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


V2_PREFIX = "/v2"


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, *, v2: bool = False) -> Response:
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    if field is not None and len(field) > 200:
        field = field[:200] + "..."
    error = message if v2 else {"code": code, "message": message, "field": field}
    return Response(orjson.dumps({"error": error}), status_code=status, media_type="application/json",
                    headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'inputs', 2) -> 'inputs[2]'."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0]
    field = field_path(first.get("loc", ())) or None
    received = first.get("input")
    shown = "" if isinstance(received, dict | list) or received is None else f" (received {quoted(received)})"
    message = f"{field}: {first['msg']}{shown}" if field else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, field


# On the Open Inference Protocol's paths a request the server cannot serve as asked (invalid input,
# an unknown model, version or operation) answers 400, the one error status the protocol's OpenAPI
# document gives and what Triton answers; the native API keeps 422 and 404.
V2_AS_BAD_REQUEST = frozenset({404, 422})


def status_of(exc: BaseException, *, v2: bool = False) -> int:
    """The HTTP status an exception maps to (what `response_for` answers)."""
    if isinstance(exc, ServiceError):
        return 400 if v2 and exc.status in V2_AS_BAD_REQUEST else exc.status
    if isinstance(exc, QueueFull):
        return 503
    if isinstance(exc, asyncio.CancelledError):  # the caller cancelled, or its deadline passed
        return ClientGone.status
    if isinstance(exc, RequestValidationError):
        return 400 if v2 else 422
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    return 500


def response_for(exc: Exception, retry_after: int, *, v2: bool = False) -> Response:
    """The one mapping from an exception to its HTTP response; unknown ones become a logged 500.

    `v2`: answer the Open Inference Protocol's body (the request came in under /v2).
    """
    if isinstance(exc, ServiceError):
        headers = dict(exc.headers)
        if exc.status == 503:
            headers.setdefault("Retry-After", str(retry_after))
        return error_response(status_of(exc, v2=v2), exc.code, exc.message, exc.field, headers, v2=v2)
    if isinstance(exc, QueueFull):
        return error_response(503, Overloaded.code, str(exc), headers={"Retry-After": str(retry_after)}, v2=v2)
    if isinstance(exc, BatchFailed):
        log.error("inference batch failed: %s", exc)
        return error_response(500, InferenceFailed.code, str(exc), v2=v2)
    if isinstance(exc, RequestValidationError):
        message, field = validation_message(list(exc.errors()))
        return error_response(status_of(exc, v2=v2), InvalidInput.code, message, field, v2=v2)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}), v2=v2)
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", f"internal error: {type(exc).__name__}", v2=v2)


# HTTP status -> gRPC status code name, for the gRPC face (grpc_api.py); 503 splits by cause below.
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 406: "INVALID_ARGUMENT",
              413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 499: "CANCELLED",
              500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}


def grpc_error(exc: Exception) -> tuple[str, str, bool]:
    """(gRPC status code name, message, whether to retry later) for an exception: the same mapping as
    `response_for`, in gRPC's terms. Overload is RESOURCE_EXHAUSTED (retry), loading UNAVAILABLE (retry)."""
    if isinstance(exc, QueueFull | Overloaded):
        return "RESOURCE_EXHAUSTED", str(exc), True
    if isinstance(exc, NotReady):
        return "UNAVAILABLE", exc.message, True
    if isinstance(exc, ServiceError):
        return GRPC_CODES.get(exc.status, "INTERNAL"), exc.message, False
    if isinstance(exc, BatchFailed):
        log.error("inference batch failed: %s", exc)
        return "INTERNAL", str(exc), False
    log.error("unhandled error", exc_info=exc)
    return "INTERNAL", f"internal error: {type(exc).__name__}", False


def install_handlers(app: FastAPI, retry_after: int) -> None:
    """Route every exception FastAPI sees through `response_for`."""

    async def handle(request: Request, exc: Exception) -> Response:
        return response_for(exc, retry_after, v2=request.url.path.startswith(V2_PREFIX))

    for kind in (ServiceError, QueueFull, BatchFailed, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
