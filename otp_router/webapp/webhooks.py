"""Delivery-report endpoints for Telegram and Twilio.

Both follow one order, so a refused callback never changes anything:

1. read the raw body (bounded);
2. check the signature (403 on failure, metric ``invalid_signature`` or ``stale``);
3. parse (400 when a correctly signed body is malformed: retrying cannot fix it,
   but a 400 shows up in the provider's console);
4. apply the report to the verification with compare-and-set, and answer.
   What the report sets off (a fallback to SMS after a failed Telegram
   delivery) runs after the answer, in a task of the router's own
   (:meth:`~otp_router.router.OtpRouter.apply_report`): a slow provider never
   makes the webhook slow, so the provider has no reason to retry it.

Answers after a valid signature:

=========================================  ======  ==================
case                                       status  metric outcome
=========================================  ======  ==================
report applied                             200     ``accepted``
already applied (retry or replay)          200     ``duplicate``
no verification id, or unknown id          200     ``bad_request``
=========================================  ======  ==================

An unknown verification is acknowledged with 200 (and logged at info) on
purpose: Telegram retries a non-200 report up to 10 times, and no retry can
make a deleted or foreign verification appear. It is counted as
``bad_request`` because nothing could be done with it.

**Replays.** Telegram reports carry a signed timestamp, refused outside
``OTP_ROUTER_TELEGRAM__CALLBACK_MAX_AGE`` seconds; inside the window a replay
is a duplicate. Twilio callbacks carry no timestamp, so a captured callback
stays valid forever; replaying one is harmless because delivery states only
move forward (a late ``sent`` never undoes ``delivered``) and costs are booked
under unique ledger keys.

**Twilio URL.** The signature covers the URL Twilio called. Behind a proxy or
TLS terminator the app cannot see that URL, and the ``Host`` and
``X-Forwarded-*`` headers are attacker-controlled, so they are never used. The
URL is rebuilt as ``public_url`` (``OTP_ROUTER_PUBLIC_URL`` unless given to
:func:`~otp_router.webapp.create_app`) + the path relative to the app's mount
point (``/webhooks/twilio``) + the raw query string, which is exactly how the router builds
``StatusCallback`` (``{public_url}/webhooks/twilio?vid={id}``). Without a
public URL the router asks for no callbacks, and any Twilio callback is refused.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from twilio.request_validator import RequestValidator

from otp_router.crashpoints import crash_point
from otp_router.errors import (
    InputError,
    InvalidSignature,
    StaleWebhook,
    VerificationNotFound,
    WebhookError,
)
from otp_router.providers.base import StatusResult
from otp_router.providers.telegram import parse_report, verify_report_signature
from otp_router.providers.twilio_sms import parse_status_callback, verify_status_callback
from otp_router.router import OtpRouter
from otp_router.webapp import schemas
from otp_router.webapp.api import JsonErrorRoute, RouterDependency, router_dependency
from otp_router.webapp.common import json_error, read_body

__all__ = ["TELEGRAM_PATH", "TWILIO_PATH", "WEBHOOK_BODY_LIMIT", "Webhooks", "webhook_router"]

log = logging.getLogger("otp_router.webapp")

#: Largest accepted callback body. Real reports are well under 2 KiB.
WEBHOOK_BODY_LIMIT = 64 * 1024
#: Where the routes are, relative to where they are included or mounted.
TELEGRAM_PATH = "/webhooks/telegram"
TWILIO_PATH = "/webhooks/twilio"
#: More form fields than this cannot be a Twilio status callback.
_MAX_FORM_FIELDS = 200


class _FormParams(dict[str, str]):
    """Form fields for twilio's ``RequestValidator`` that keep every value of a repeated name.

    The validator asks for ``getlist`` and signs each distinct value of a
    repeated name; a plain dict would keep only one and reject a genuine callback.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self._all: defaultdict[str, list[str]] = defaultdict(list)
        for name, value in pairs:
            self.setdefault(name, value)
            self._all[name].append(value)

    def getlist(self, name: str) -> list[str]:
        """Every value received for ``name``, in order."""
        return list(self._all.get(name, ()))

    @property
    def has_repeats(self) -> bool:
        """True when some name was received more than once."""
        return any(len(values) > 1 for values in self._all.values())


def _ack(outcome: str) -> JSONResponse:
    return JSONResponse({"ok": True, "outcome": outcome})


class Webhooks:
    """The two callback endpoints, bound to one router.

    Args:
        router: The router reports are applied to; its settings hold the
            Telegram token and the Twilio auth token.
        public_url: Public base URL for Twilio signatures; defaults to
            ``router.settings.public_url``.
    """

    def __init__(self, router: OtpRouter, *, public_url: str | None = None) -> None:
        self.router = router
        base = public_url if public_url is not None else router.settings.public_url
        self.public_url = base.rstrip("/") if base else None

    # --- Telegram -------------------------------------------------------------

    async def telegram(self, request: Request) -> Response:
        """``POST /webhooks/telegram``: a signed Gateway delivery report (JSON ``RequestStatus``)."""
        settings = self.router.settings.telegram
        body = await read_body(request, WEBHOOK_BODY_LIMIT)
        token = settings.token.get_secret_value()
        try:
            if not token:
                # An empty key would let anyone sign: refuse rather than accept everything.
                raise InvalidSignature("OTP_ROUTER_TELEGRAM__TOKEN is not set")
            verify_report_signature(
                token,
                request.headers.get("x-request-timestamp", ""),
                request.headers.get("x-request-signature", ""),
                body,
                max_age=settings.callback_max_age,
                now=self.router.clock(),
            )
        except WebhookError as exc:
            return self._refused("telegram", exc)
        try:
            report, payload = parse_report(body)
        except WebhookError as exc:
            self.router.metrics.webhook("telegram", "bad_request")
            return json_error(400, "bad_request", str(exc))
        return await self._apply("telegram", payload, report)

    # --- Twilio -----------------------------------------------------------------

    def twilio_url(self, request: Request) -> str | None:
        """The public URL Twilio called for ``request``, or None without a public URL.

        Built from the configured public URL, never from ``Host``: see the module
        docs. The path is this endpoint's own, ``/webhooks/twilio``, whatever prefix
        the routes were included or mounted under: the router builds its
        ``StatusCallback`` the same way, and ``public_url`` already holds the prefix.
        """
        if not self.public_url:
            return None
        query = request.scope.get("query_string", b"").decode("latin-1")
        return self.public_url + TWILIO_PATH + ("?" + query if query else "")

    async def twilio(self, request: Request) -> Response:
        """``POST /webhooks/twilio?vid=…``: a signed, form-encoded message status callback."""
        body = await read_body(request, WEBHOOK_BODY_LIMIT)
        token = self.router.settings.twilio.auth_token.get_secret_value()
        url = self.twilio_url(request)
        signature = request.headers.get("x-twilio-signature", "")
        try:
            if not token:
                raise InvalidSignature("OTP_ROUTER_TWILIO__AUTH_TOKEN is not set")
            if url is None:
                raise InvalidSignature("OTP_ROUTER_PUBLIC_URL is not set: cannot check Twilio signatures")
            try:
                params = _FormParams(
                    parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS)
                )
            except ValueError:  # includes UnicodeDecodeError
                raise InvalidSignature("twilio status callback body is not a form") from None
            if params.has_repeats:
                # verify_status_callback takes a plain mapping; keep every repeated value.
                if not signature or not RequestValidator(token).validate(url, params, signature):
                    raise InvalidSignature("twilio status callback signature does not match")
            else:
                verify_status_callback(token, url, dict(params), signature)
        except WebhookError as exc:
            return self._refused("twilio", exc)
        try:
            report = parse_status_callback(params)
        except WebhookError as exc:
            self.router.metrics.webhook("twilio", "bad_request")
            return json_error(400, "bad_request", str(exc))
        return await self._apply("twilio", request.query_params.get("vid"), report)

    # --- shared -----------------------------------------------------------------

    def _refused(self, provider: str, exc: WebhookError) -> Response:
        stale = isinstance(exc, StaleWebhook)
        self.router.metrics.webhook(provider, "stale" if stale else "invalid_signature")
        log.warning("%s callback refused: %s", provider, exc)
        code = "stale_webhook" if stale else "invalid_signature"
        return json_error(403, code, str(exc))

    async def _apply(self, provider: str, verification_id: str | None, report: StatusResult) -> Response:
        metrics = self.router.metrics
        if not verification_id:
            metrics.webhook(provider, "bad_request")
            log.info("%s callback without a verification id ignored (ref %s)", provider, report.ref)
            return _ack("ignored")
        # A crash here loses nothing: the provider got no answer and retries the report.
        crash_point("webhook.received")
        try:
            changed = await self.router.apply_report(verification_id, report)
        except (VerificationNotFound, InputError):
            # InputError: a payload that cannot be one of our ids (control characters…).
            metrics.webhook(provider, "bad_request")
            # %r and a cap: the id comes from the request and must not forge log lines.
            log.info("%s callback for unknown verification %r ignored", provider, verification_id[:64])
            return _ack("ignored")
        outcome = "accepted" if changed else "duplicate"
        metrics.webhook(provider, outcome)
        log.info("%s callback %s: %s is %s", provider, outcome, verification_id, report.state.value)
        return _ack(outcome)


# --- as FastAPI routes -------------------------------------------------------------------


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def webhook_router(
    router: OtpRouter | None = None,
    *,
    get_router: RouterDependency | None = None,
    public_url: str | None = None,
) -> APIRouter:
    """``POST /webhooks/telegram`` and ``POST /webhooks/twilio`` as an ``APIRouter``.

    Args:
        router: Bind this router; without it (and without ``get_router``) each
            request uses :func:`otp_router.webapp.api.get_otp_router`.
        get_router: A dependency of your own that returns the router.
        public_url: Public base URL for Twilio signatures (where these routes
            are reachable from the internet, prefix included); defaults to the
            router's ``OTP_ROUTER_PUBLIC_URL``.
    """
    provide = get_router or router_dependency(router)
    hooks = APIRouter(route_class=JsonErrorRoute, tags=["webhooks"])
    refused = {
        "model": schemas.Error,
        "description": "invalid_signature or stale_webhook: nothing was changed.",
    }
    too_large = {
        "model": schemas.Error,
        "description": f"payload_too_large: the body is larger than {WEBHOOK_BODY_LIMIT} bytes.",
    }
    unavailable = {
        "model": schemas.Error,
        "description": "store_unavailable: the report could not be stored; the provider retries it.",
    }
    ack = "Acknowledged: accepted, a duplicate, or ignored (no or an unknown verification id)."

    @hooks.post(
        TELEGRAM_PATH,
        operation_id="telegramReport",
        summary="Telegram Gateway delivery report, signed with X-Request-Signature.",
        response_model=schemas.WebhookAck,
        responses={
            200: {"description": ack},
            400: {"model": schemas.Error, "description": "bad_request: signed, but not a RequestStatus."},
            403: refused,
            413: too_large,
            503: unavailable,
        },
        openapi_extra={
            "parameters": [
                _header("X-Request-Timestamp", "Unix time the report was signed at."),
                _header("X-Request-Signature", "HMAC-SHA256 of timestamp and body (hex)."),
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        },
    )
    async def telegram(request: Request, otp: OtpRouter = Depends(provide)) -> Response:
        return await Webhooks(otp, public_url=public_url).telegram(request)

    @hooks.post(
        TWILIO_PATH,
        operation_id="twilioStatusCallback",
        summary="Twilio status callback, signed with X-Twilio-Signature over the public URL.",
        response_model=schemas.WebhookAck,
        responses={
            200: {"description": ack},
            400: {
                "model": schemas.Error,
                "description": "bad_request: signed, but no MessageSid/MessageStatus.",
            },
            403: refused,
            413: too_large,
            503: unavailable,
        },
        openapi_extra={
            "parameters": [
                {
                    "name": "vid",
                    "in": "query",
                    "required": True,
                    "description": "Verification id (part of the signed URL).",
                    "schema": {"type": "string"},
                },
                _header("X-Twilio-Signature", "Base64 HMAC-SHA1 of the public URL and the sorted form."),
            ],
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
            },
        },
    )
    async def twilio(request: Request, otp: OtpRouter = Depends(provide)) -> Response:
        return await Webhooks(otp, public_url=public_url).twilio(request)

    return hooks
