"""Shared HTTP helpers: bounded body reading, JSON errors, and the error-to-status map.

Every error the app returns has the same shape::

    {"error": {"code": "invalid_phone_number", "message": "phone number cannot be parsed: …"}}

``code`` is stable and meant for programs; ``message`` is for people and may
change. ``all_providers_failed`` (502) also carries the stored, failed
verification's ``verification_id`` and ``causes`` (channel → reason, in the
order tried). Messages come from our own exceptions, which never contain a phone
number, a code or a secret.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otp_router.errors import (
    AllProvidersFailed,
    IdempotencyConflict,
    InputError,
    InvalidCode,
    InvalidPhoneNumber,
    OtpRouterError,
    RateLimited,
    StoreError,
    UnsupportedCountry,
    UnsupportedNumberType,
    VerificationNotFound,
)
from otp_router.logs import event as log_event
from otp_router.router import ResendNotAllowed

__all__ = [
    "ApiError",
    "error_response",
    "http_exception_handler",
    "json_error",
    "read_body",
    "retry_after_header",
    "router_error_handler",
]

log = logging.getLogger("otp_router.webapp")

#: Router error class -> (HTTP status, error code). Most specific first: the first match wins.
ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (InvalidPhoneNumber, 400, "invalid_phone_number"),
    (InvalidCode, 400, "invalid_code"),
    (UnsupportedCountry, 422, "unsupported_country"),
    (UnsupportedNumberType, 422, "unsupported_number_type"),
    (InputError, 400, "bad_request"),
    (RateLimited, 429, "rate_limited"),
    (ResendNotAllowed, 429, "resend_not_allowed"),
    (IdempotencyConflict, 409, "idempotency_conflict"),
    (VerificationNotFound, 404, "not_found"),
    (StoreError, 503, "store_unavailable"),
    (AllProvidersFailed, 502, "all_providers_failed"),
)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """An HTTP error raised inside an endpoint; the app turns it into a JSON error body.

    Args:
        status: HTTP status.
        code: Stable machine-readable error code.
        message: Human readable detail (never a phone number or secret).
        headers: Extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def json_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> JSONResponse:
    """Build an error response in the app's one error shape.

    Args:
        status: HTTP status.
        code: Stable machine-readable error code.
        message: Human readable detail.
        headers: Extra response headers.
        extra: More fields of the ``error`` object (never a phone number or secret).

    Returns:
        ``{"error": {"code": …, "message": …}}`` with that status.
    """
    body = {"code": code, "message": message, **(extra or {})}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds (at least 1), or none when unknown."""
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_response(exc: Exception) -> JSONResponse:
    """Map an exception raised by the router (or :class:`ApiError`) to a JSON error response.

    Args:
        exc: The exception.

    Returns:
        The response; unexpected otp-router errors become a 500 ``internal_error``
        whose message does not repeat the exception text.
    """
    if isinstance(exc, ApiError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)
    for cls, status, code in ERROR_STATUS:
        if isinstance(exc, cls):
            headers: dict[str, str] = {}
            extra: dict[str, object] = {}
            if isinstance(exc, RateLimited | ResendNotAllowed):
                headers = retry_after_header(exc.retry_after)
            if isinstance(exc, AllProvidersFailed):
                extra = {"verification_id": exc.verification_id, "causes": exc.causes}
                if exc.verification_id is not None:
                    headers["Location"] = f"/v1/verifications/{exc.verification_id}"
            return json_error(status, code, str(exc), headers, extra)
    log_event(log, logging.ERROR, "request_failed", error=type(exc).__name__)
    return json_error(500, "internal_error", "internal error")


async def router_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for :class:`ApiError` and :class:`OtpRouterError`."""
    if isinstance(exc, OtpRouterError | ApiError):
        return error_response(exc)
    raise exc  # pragma: no cover - only registered for the classes above


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown route, wrong method) in the app's JSON error shape."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "bad_request")
    return json_error(exc.status_code, code, str(exc.detail), exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """Read the raw request body, refusing more than ``limit`` bytes.

    Webhook signatures cover the exact bytes received, so the body is read
    raw and never re-serialised. The limit keeps a flood of large bodies from
    exhausting memory before the signature check can refuse them.

    Args:
        request: The request.
        limit: Largest accepted body, in bytes.

    Returns:
        The body.

    Raises:
        ApiError: 413 when the body (or its declared ``Content-Length``) is larger.
    """
    too_large = ApiError(413, "payload_too_large", f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
