"""Delivery-report endpoints: one route per receiver of the configured adapters.

Each adapter owns its receiver (:class:`~otp_router.providers.base.ReceiverSpec`):
its path, how its signature is checked and how its report is read. This module
only mounts them and applies what they read; it knows no provider. The
built-in ones are ``/webhooks/telegram`` (Telegram Gateway reports),
``/webhooks/twilio?vid=…`` (Twilio message and call status callbacks) and
``/webhooks/vonage`` (Vonage delivery receipts).

Every report follows one order, so a refused callback never changes anything:

1. read the raw body (bounded);
2. check the signature (403 on failure, metric ``invalid_signature`` or ``stale``);
3. parse (400 when a correctly signed body is malformed: retrying cannot fix it,
   but a 400 shows up in the provider's console);
4. apply the report to the verification with compare-and-set, and answer.
   What the report sets off (a fallback after a failed delivery) runs after
   the answer, in a task of the router's own
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
purpose: providers retry a non-200 report, and no retry can make a deleted or
foreign verification appear. It is counted as ``bad_request`` because nothing
could be done with it.

**Replays.** Receivers whose reports carry a signed timestamp (Telegram,
Vonage) refuse stale ones; inside the window, or for a provider that signs no
time (Twilio), a replay is harmless: delivery states only move forward (a late
``sent`` never undoes ``delivered``) and costs are booked under unique ledger keys.

**Public URL.** Some signatures (Twilio's) cover the URL the provider called.
Behind a proxy or TLS terminator the app cannot see that URL, and the ``Host``
and ``X-Forwarded-*`` headers are attacker-controlled, so they are never used.
The URL is rebuilt as ``public_url`` (``OTP_ROUTER_PUBLIC_URL`` unless given to
:func:`~otp_router.webapp.create_app`) + the receiver's path relative to the
app's mount point + the raw query string, which is exactly how the adapters
build their callback URLs. Without a public URL the router asks for no
callbacks, and such receivers refuse every one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otp_router.crashpoints import crash_point
from otp_router.errors import (
    InputError,
    InvalidSignature,
    StaleWebhook,
    VerificationNotFound,
    WebhookError,
)
from otp_router.providers.base import InboundReport, ReceiverSpec, StatusResult
from otp_router.providers.registry import builtin_receivers, report_receivers
from otp_router.router import OtpRouter
from otp_router.webapp import schemas
from otp_router.webapp.api import JsonErrorRoute, RouterDependency, router_dependency
from otp_router.webapp.common import json_error, read_body

__all__ = ["WEBHOOK_BODY_LIMIT", "Webhooks", "webhook_router"]

log = logging.getLogger("otp_router.webapp")

#: Largest accepted callback body. Real reports are well under 2 KiB.
WEBHOOK_BODY_LIMIT = 64 * 1024


def _ack(outcome: str) -> JSONResponse:
    return JSONResponse({"ok": True, "outcome": outcome})


class Webhooks:
    """The receivers, bound to one router.

    Args:
        router: The router reports are applied to; its settings hold the secrets.
        public_url: Public base URL for signatures over the URL; defaults to
            ``router.settings.public_url``.
    """

    def __init__(self, router: OtpRouter, *, public_url: str | None = None) -> None:
        self.router = router
        base = public_url if public_url is not None else router.settings.public_url
        self.public_url = base.rstrip("/") if base else None

    def url_for(self, spec: ReceiverSpec, query: str) -> str | None:
        """The public URL the provider called for ``spec`` with ``query``, or None without a public URL.

        The path is the receiver's own, whatever prefix the routes were
        included or mounted under: adapters build their callback URLs the same
        way, and ``public_url`` already holds the prefix.
        """
        if not self.public_url:
            return None
        return self.public_url + spec.path + ("?" + query if query else "")

    async def receive(self, request: Request, spec: ReceiverSpec) -> Response:
        """Check, read and apply one report for ``spec``."""
        body = await read_body(request, WEBHOOK_BODY_LIMIT)
        query = request.scope.get("query_string", b"").decode("latin-1")
        inbound = InboundReport(
            body=body,
            query=query,
            headers={name.lower(): value for name, value in request.headers.items()},
            url=self.url_for(spec, query),
        )
        try:
            received = spec.build(self.router.settings)(inbound, self.router.clock())
        except (InvalidSignature, StaleWebhook) as exc:
            return self._refused(spec.provider, exc)
        except WebhookError as exc:
            self.router.metrics.webhook(spec.provider, "bad_request")
            return json_error(400, "bad_request", str(exc))
        return await self._apply(spec.provider, received.verification_id, received.report)

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


def webhook_router(
    router: OtpRouter | None = None,
    *,
    get_router: RouterDependency | None = None,
    public_url: str | None = None,
    receivers: Mapping[str, ReceiverSpec] | None = None,
) -> APIRouter:
    """One route per delivery-report receiver, as an ``APIRouter``.

    Args:
        router: Bind this router; its configured adapters choose the receivers.
            Without it (and without ``get_router``) each request uses
            :func:`otp_router.webapp.api.get_otp_router`.
        get_router: A dependency of your own that returns the router.
        public_url: Public base URL for signatures over the URL (where these
            routes are reachable from the internet, prefix included); defaults
            to the router's ``OTP_ROUTER_PUBLIC_URL``.
        receivers: The receivers to mount by path; default: those of the bound
            router's adapters, or every built-in and registered adapter's when
            the router is only known per request.
    """
    provide = get_router or router_dependency(router)
    if receivers is None:
        receivers = report_receivers(router.channels) if router is not None else builtin_receivers()
    hooks = APIRouter(route_class=JsonErrorRoute, tags=["webhooks"])
    for spec in receivers.values():
        _add_route(hooks, spec, provide, public_url)
    return hooks


def _add_route(hooks: APIRouter, spec: ReceiverSpec, provide: Any, public_url: str | None) -> None:
    async def endpoint(request: Request, otp: OtpRouter = Depends(provide)) -> Response:
        return await Webhooks(otp, public_url=public_url).receive(request, spec)

    responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Acknowledged: accepted, a duplicate, or ignored (no or unknown verification id)."
        },
        400: {"model": schemas.Error, "description": spec.bad_request},
        403: {
            "model": schemas.Error,
            "description": "invalid_signature or stale_webhook: nothing was changed.",
        },
        413: {
            "model": schemas.Error,
            "description": f"payload_too_large: the body is larger than {WEBHOOK_BODY_LIMIT} bytes.",
        },
        503: {
            "model": schemas.Error,
            "description": "store_unavailable: the report could not be stored; the provider retries it.",
        },
    }
    for method in spec.methods:
        # One operation per method: OpenAPI operation ids must be unique.
        suffix = "" if method == spec.methods[0] else method.title()
        extra = dict(spec.openapi_extra)
        if method == "GET":
            extra.pop("requestBody", None)
        hooks.add_api_route(
            spec.path,
            endpoint,
            methods=[method],
            operation_id=(spec.operation_id or f"{spec.provider}Report") + suffix,
            summary=spec.summary or None,
            response_model=schemas.WebhookAck,
            responses=responses,
            openapi_extra=extra,
        )
