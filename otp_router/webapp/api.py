"""The verification HTTP API (``/v1/verifications``): start, check, get, cancel, resend.

**Authentication.** Every route needs ``OTP_ROUTER_API_TOKEN``, sent as
``Authorization: Bearer <token>`` or as a ``?token=<token>`` query parameter,
compared in constant time. The query form exists for no-code bot builders
that can only call a URL; its cost is that the token then appears wherever
URLs are kept (proxy and access logs, browser history), so prefer the header
and rotate a token that was used in URLs. When ``OTP_ROUTER_API_TOKEN`` is
unset the API is disabled: every ``/v1`` route answers 404 ``not_found``, so
an unconfigured deployment exposes nothing that can send messages.

**Input.** ``POST`` bodies may be JSON objects or
``application/x-www-form-urlencoded``; ``start`` and ``check`` are also
available as ``GET`` with query parameters. Every field is a string; an
unknown, repeated or non-string field is a 400 that names it, so a typo never
silently drops an idempotency key. Optional fields given as empty strings
count as absent (what form builders send for an empty input).

**Privacy.** The phone number is never repeated in a response, an error or a
log line. With the ``GET`` variant the number travels in the URL: run the
server with access logs off or filtered (:class:`~otp_router.webapp.RedactQuery`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otp_router.inputs import JsonInputError, decode_json
from otp_router.router import OtpRouter
from otp_router.webapp.common import ApiError, read_body

__all__ = ["API_BODY_LIMIT", "VerificationApi"]

log = logging.getLogger("otp_router.webapp")

#: Largest accepted API request body.
API_BODY_LIMIT = 16 * 1024
_MAX_FIELDS = 20

_START_FIELDS = frozenset({"phone", "idempotency_key", "default_region"})
_CHECK_FIELDS = frozenset({"code"})
_NO_FIELDS: frozenset[str] = frozenset()


def _names(names: Iterable[str]) -> str:
    # Field names are echoed so callers can fix typos; cap them so a body
    # cannot turn an error message into an echo of arbitrary input.
    return ", ".join(sorted(repr(name[:40]) for name in set(names)))


def _pairs_to_fields(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if name in fields:
            repeated.add(name)
        fields[name] = value
    if repeated:
        raise ApiError(400, "bad_request", f"field given more than once: {_names(repeated)}")
    return fields


def _form_pairs(raw: bytes, what: str) -> list[tuple[str, str]]:
    """Decode form or query bytes strictly: percent-escapes must decode to UTF-8.

    Starlette's own query parsing replaces invalid bytes with U+FFFD, which
    would turn two different malformed idempotency keys into the same one.
    """
    try:
        return parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=_MAX_FIELDS,
            encoding="utf-8",
            errors="strict",
        )
    except ValueError:  # includes UnicodeDecodeError and too many fields
        raise ApiError(400, "bad_request", f"{what} is not valid UTF-8 form data") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class VerificationApi:
    """The ``/v1`` endpoints, bound to one router.

    Args:
        router: The router behind the API; ``router.settings.api_token`` is the bearer token.
    """

    def __init__(self, router: OtpRouter) -> None:
        self.router = router

    # --- plumbing ---------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """Check the bearer token.

        Raises:
            ApiError: 404 when the API is disabled (no token configured), 401
                when the token is missing or wrong.
        """
        configured = self.router.settings.api_token
        if configured is None or not configured.get_secret_value():
            raise ApiError(404, "not_found", "the verification API is disabled (set OTP_ROUTER_API_TOKEN)")
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            given = credentials.strip()
        else:
            given = request.query_params.get("token", "")
        expected = configured.get_secret_value().encode("utf-8")
        # compare_digest on bytes: constant time whatever the given value contains.
        if not given or not hmac.compare_digest(given.encode("utf-8"), expected):
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid API token",
                headers={"WWW-Authenticate": 'Bearer realm="otp-router"'},
            )

    async def fields(
        self, request: Request, *, allowed: frozenset[str], required: frozenset[str] = _NO_FIELDS
    ) -> dict[str, str | None]:
        """Read the request's input fields from the query (``GET``) or the body (``POST``).

        Returns:
            Every allowed field; absent optional ones (and empty optional strings) as None.

        Raises:
            ApiError: 400 for unknown, repeated, non-string or missing fields
                and unparseable bodies; 413 for large bodies; 415 for other
                content types.
        """
        query = [
            (k, v) for k, v in _form_pairs(request.scope["query_string"], "query string") if k != "token"
        ]
        if request.method == "GET":
            raw = _pairs_to_fields(query)
        else:
            if query:
                names = _names(name for name, _ in query)
                raise ApiError(400, "bad_request", f"unexpected query parameter: {names}")
            raw = await self._body_fields(request)
        unknown = set(raw) - allowed
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field: {_names(unknown)}")
        fields: dict[str, str | None] = {}
        for name in allowed:
            value = raw.get(name)
            if value is not None and not isinstance(value, str):
                raise ApiError(400, "bad_request", f"field {name!r} must be a string")
            if name in required and value is None:
                raise ApiError(400, "bad_request", f"missing field: {name!r}")
            fields[name] = value if (value or name in required) else None
        return fields

    async def _body_fields(self, request: Request) -> dict[str, Any]:
        body = await read_body(request, API_BODY_LIMIT)
        if not body.strip():
            return {}
        media = _media_type(request)
        if media == "application/json" or media.endswith("+json"):
            try:
                # Strict: UTF-8 only, bounded depth, a repeated key is refused (never "last one wins").
                data = decode_json(body, max_bytes=API_BODY_LIMIT)
            except JsonInputError as exc:
                raise ApiError(400, "bad_request", f"request body is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ApiError(400, "bad_request", "request body must be a JSON object")
            return data
        if media == "application/x-www-form-urlencoded":
            return _pairs_to_fields(_form_pairs(body, "request body"))
        raise ApiError(
            415,
            "unsupported_media_type",
            "send application/json or application/x-www-form-urlencoded",
        )

    # --- endpoints ----------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        """``POST /v1/verifications`` and ``GET /v1/verifications/start``.

        201 with the new verification; 200 with the same body when an
        ``idempotency_key`` finds an earlier one.
        """
        self.authorize(request)
        f = await self.fields(request, allowed=_START_FIELDS, required=frozenset({"phone"}))
        key = f["idempotency_key"]
        verification = await self.router.start(
            f["phone"] or "", idempotency_key=key, default_region=f["default_region"]
        )
        created = verification.created
        log.info("verification %s started (%s)", verification.id, "new" if created else "idempotent repeat")
        headers = {"Location": f"/v1/verifications/{verification.id}"}
        return JSONResponse(verification.to_dict(), status_code=201 if created else 200, headers=headers)

    async def check(self, request: Request) -> Response:
        """``POST``/``GET /v1/verifications/{id}/check``: 200 with the check result.

        ``status`` is ``valid``, ``invalid``, ``expired``, ``too_many_attempts``
        or ``not_found`` (an unknown id is an answer here, not a 404, so login
        forms have one shape to handle).
        """
        self.authorize(request)
        f = await self.fields(request, allowed=_CHECK_FIELDS, required=_CHECK_FIELDS)
        result = await self.router.check(request.path_params["id"], f["code"] or "")
        return JSONResponse(result.to_dict())

    async def get(self, request: Request) -> Response:
        """``GET /v1/verifications/{id}``: 200 with the verification, 404 when unknown."""
        self.authorize(request)
        await self.fields(request, allowed=_NO_FIELDS)
        return JSONResponse((await self.router.get(request.path_params["id"])).to_dict())

    async def cancel(self, request: Request) -> Response:
        """``POST /v1/verifications/{id}/cancel``: 200 with the verification, 404 when unknown."""
        self.authorize(request)
        await self.fields(request, allowed=_NO_FIELDS)
        return JSONResponse((await self.router.cancel(request.path_params["id"])).to_dict())

    async def resend(self, request: Request) -> Response:
        """``POST /v1/verifications/{id}/resend``: 200, or 429 ``resend_not_allowed``.

        ``Retry-After`` is set when a later resend would be accepted; without
        it no resend will ever be accepted for this verification.
        """
        self.authorize(request)
        await self.fields(request, allowed=_NO_FIELDS)
        return JSONResponse((await self.router.resend(request.path_params["id"])).to_dict())
