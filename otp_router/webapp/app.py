"""Assemble the ASGI app: webhooks, the verification API, ``/metrics``, ``/healthz``, ``/openapi.json``.

Routes (all relative to where the app is mounted):

==========================================  =====================================================
``POST /webhooks/telegram``                 Telegram delivery reports (signature-checked)
``POST /webhooks/twilio?vid=…``             Twilio status callbacks (signature-checked)
``POST /v1/verifications``                  start (``GET /v1/verifications/start?phone=…`` too)
``POST /v1/verifications/{id}/check``       check (``GET …/check?code=…`` too)
``GET /v1/verifications/{id}``              current state
``POST /v1/verifications/{id}/cancel``      cancel
``POST /v1/verifications/{id}/resend``      resend on the next channel
``GET /metrics``                            Prometheus exposition
``GET /healthz``                            dependency pings
``GET /openapi.json``                       OpenAPI 3.1 description
==========================================  =====================================================

``/metrics``, ``/healthz`` and ``/openapi.json`` need no token: they contain
no phone numbers, codes or secrets, but do reveal traffic volumes, so keep
them off the public internet (bind them to an internal interface or filter
at the proxy).

The app does not open or close the router: its owner does (for example in
the lifespan of the application it is mounted in), so one router can serve
the app, the library calls and the deadline loop of the same process.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from otp_router.errors import OtpRouterError
from otp_router.metrics import NullMetrics
from otp_router.router import OtpRouter
from otp_router.webapp.api import VerificationApi
from otp_router.webapp.common import ApiError, http_exception_handler, router_error_handler
from otp_router.webapp.health import DEFAULT_PING_TIMEOUT, Ping, run_pings
from otp_router.webapp.openapi import openapi_document
from otp_router.webapp.webhooks import Webhooks

__all__ = ["build_app"]


def build_app(
    router: OtpRouter,
    *,
    pings: Mapping[str, Ping] | None = None,
    public_url: str | None = None,
    ping_timeout: float = DEFAULT_PING_TIMEOUT,
) -> Starlette:
    """Build the Starlette app; see :func:`otp_router.webapp.create_app` for the arguments."""
    hooks = Webhooks(router, public_url=public_url)
    api = VerificationApi(router)
    # The store is always pinged; a caller's "store" ping replaces ours.
    all_pings: dict[str, Ping] = {"store": router.store.ping, **(pings or {})}
    document = openapi_document(hooks.public_url)

    async def metrics(request: Request) -> Response:
        if isinstance(router.metrics, NullMetrics):
            return PlainTextResponse(
                "metrics are disabled: prometheus-client is not installed "
                "(pip install 'otp-router[metrics]')\n",
                status_code=503,
            )
        body, content_type = router.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    async def healthz(request: Request) -> Response:
        report = await run_pings(all_pings, ping_timeout=ping_timeout)
        return JSONResponse(report, status_code=500 if report["failing"] else 200)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes = [
        Route("/webhooks/telegram", hooks.telegram, methods=["POST"]),
        Route("/webhooks/twilio", hooks.twilio, methods=["POST"]),
        Route("/v1/verifications", api.start, methods=["POST"]),
        # Before "/{id}": "start" is a word here, never an id (ids start with "v_").
        Route("/v1/verifications/start", api.start, methods=["GET"]),
        Route("/v1/verifications/{id}", api.get, methods=["GET"]),
        Route("/v1/verifications/{id}/check", api.check, methods=["GET", "POST"]),
        Route("/v1/verifications/{id}/cancel", api.cancel, methods=["POST"]),
        Route("/v1/verifications/{id}/resend", api.resend, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            ApiError: router_error_handler,
            OtpRouterError: router_error_handler,
            HTTPException: http_exception_handler,
        },
    )
