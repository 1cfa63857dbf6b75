"""``GET /metrics`` and ``GET /healthz`` as an ``APIRouter``, optionally behind a token.

Neither contains phone numbers, codes or secrets, but both reveal traffic
volumes and which dependencies are down. Two settings keep them private:

* ``OTP_ROUTER_OPS_TOKEN``: both want ``Authorization: Bearer <token>``
  (Prometheus: ``authorization: {credentials: …}`` in the scrape config;
  Kubernetes probes: an ``httpHeaders`` entry). A missing or wrong token is a
  401 ``unauthorized``. The API's ``?token=`` form is not accepted here.
* ``OTP_ROUTER_OPS_PORT`` (and ``OTP_ROUTER_OPS_HOST``): the worker serves them
  on that port only, on an address of their own, and not on the public port
  (:func:`otp_router.webapp.create_ops_app`).

Without either they are open on the worker's HTTP port, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from otp_router.metrics import NullMetrics
from otp_router.router import OtpRouter
from otp_router.webapp import schemas
from otp_router.webapp.api import JsonErrorRoute, RouterDependency, check_token, router_dependency
from otp_router.webapp.health import DEFAULT_PING_TIMEOUT, Ping, run_pings

__all__ = ["ops_router"]


def _guard(request: Request, router: OtpRouter) -> None:
    secret = router.settings.ops_token
    if secret is not None and secret.get_secret_value():
        check_token(request, secret.get_secret_value(), allow_query=False, what="ops endpoint")


def ops_router(
    router: OtpRouter | None = None,
    *,
    get_router: RouterDependency | None = None,
    pings: Mapping[str, Ping] | None = None,
    ping_timeout: float = DEFAULT_PING_TIMEOUT,
) -> APIRouter:
    """``/metrics`` (Prometheus exposition) and ``/healthz`` (dependency pings).

    Args:
        router: Bind this router; without it (and without ``get_router``) each
            request uses :func:`otp_router.webapp.api.get_otp_router`.
        get_router: A dependency of your own that returns the router.
        pings: Extra health pings by name; the router's store is always
            pinged as ``"store"`` (a ``"store"`` ping given here replaces it).
        ping_timeout: Seconds each ping may take.
    """
    provide = get_router or router_dependency(router)
    extra = dict(pings or {})
    ops = APIRouter(route_class=JsonErrorRoute, tags=["operations"])
    unauthorized = {
        "model": schemas.Error,
        "description": "unauthorized: OTP_ROUTER_OPS_TOKEN is set and not given.",
    }
    text = {"text/plain": {"schema": {"type": "string"}}}

    @ops.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus exposition of the otp_router_ metrics.",
        response_class=PlainTextResponse,
        responses={
            200: {"description": "Prometheus text format.", "content": text},
            401: unauthorized,
            503: {"description": "prometheus-client is not installed.", "content": text},
        },
    )
    async def metrics(request: Request, otp: OtpRouter = Depends(provide)) -> Response:
        _guard(request, otp)
        if isinstance(otp.metrics, NullMetrics):
            return PlainTextResponse(
                "metrics are disabled: prometheus-client is not installed "
                "(pip install 'otp-router[metrics]')\n",
                status_code=503,
            )
        body, content_type = otp.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    @ops.get(
        "/healthz",
        operation_id="health",
        summary="Ping the store and every registered dependency.",
        response_model=schemas.Health,
        responses={
            200: {"description": "Every ping answered."},
            401: unauthorized,
            500: {"model": schemas.Health, "description": "At least one ping failed; see failing."},
        },
    )
    async def healthz(request: Request, otp: OtpRouter = Depends(provide)) -> Response:
        _guard(request, otp)
        report = await run_pings({"store": otp.store.ping, **extra}, ping_timeout=ping_timeout)
        return JSONResponse(report, status_code=500 if report["failing"] else 200)

    return ops
