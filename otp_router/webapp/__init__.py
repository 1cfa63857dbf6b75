"""The HTTP side of otp-router: webhooks, the verification API, metrics and health, on FastAPI.

FastAPI is the optional ``[server]`` extra: importing this package needs only
the core dependencies, and :func:`create_app` raises
:class:`~otp_router.errors.ConfigError` with the install command when FastAPI
is missing.

Three ways to serve the API:

1. **In your FastAPI app**: include the routers of
   :mod:`otp_router.webapp.api` (``verification_router()``),
   :mod:`~otp_router.webapp.webhooks` (``webhook_router()``) and
   :mod:`~otp_router.webapp.ops` (``ops_router()``); they find the router in
   the lifespan state that :func:`router_lifespan` provides::

       app = FastAPI(lifespan=router_lifespan)
       app.include_router(verification_router(), prefix="/otp")

2. **The worker's own server**: ``create_app(router)`` (what ``otp-router worker`` serves).
3. **Starlette or Django**: mount ``create_app()`` (no router: it reads the
   lifespan state) in a Starlette app whose lifespan is :func:`router_lifespan`,
   with Django's ASGI app mounted beside it (see the README).

See :mod:`otp_router.webapp.app` for the routes, :mod:`~otp_router.webapp.api`
for authentication and input rules, and :mod:`~otp_router.webapp.webhooks`
for signature checks, replay handling and proxies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from otp_router.errors import ConfigError
from otp_router.webapp.health import DEFAULT_PING_TIMEOUT, Ping, provider_pings, run_pings
from otp_router.webapp.logs import RedactQuery

if TYPE_CHECKING:
    from fastapi import FastAPI

    from otp_router.router import OtpRouter
    from otp_router.webapp.api import RouterDependency

__all__ = [
    "Ping",
    "RedactQuery",
    "create_app",
    "create_ops_app",
    "provider_pings",
    "router_lifespan",
    "run_pings",
]

INSTALL_HINT = "pip install 'otp-router[server]'"


def _missing(exc: ModuleNotFoundError) -> ConfigError:
    if exc.name is None or exc.name.split(".")[0] not in ("fastapi", "starlette"):
        raise exc
    return ConfigError(f"the HTTP app needs FastAPI: {INSTALL_HINT}")


def create_app(
    router: OtpRouter | None = None,
    *,
    get_router: RouterDependency | None = None,
    pings: Mapping[str, Ping] | None = None,
    public_url: str | None = None,
    ping_timeout: float = DEFAULT_PING_TIMEOUT,
    ops: bool = True,
) -> FastAPI:
    """Build the ASGI app (webhooks, the API, ``/metrics``, ``/healthz``, ``/openapi.json``).

    Args:
        router: The router (opened by its owner; the app never opens or closes
            it). Without one, each request takes the router from the lifespan
            state (``{"otp_router": router}``, see :func:`router_lifespan`),
            so the app can be built before anything is configured.
        get_router: Instead: a FastAPI dependency that returns the router.
        pings: Extra health pings by name (queue, providers: see
            :func:`provider_pings`). The store is always pinged as ``"store"``.
        public_url: Public base URL Twilio calls, for its signatures; defaults
            to the router's ``OTP_ROUTER_PUBLIC_URL``.
        ping_timeout: Seconds each health ping may take.
        ops: Serve ``/metrics`` and ``/healthz`` (False when they have a port
            of their own: :func:`create_ops_app`).

    Returns:
        A FastAPI application.

    Raises:
        ConfigError: FastAPI is not installed.
    """
    try:
        from otp_router.webapp.app import build_app
    except ModuleNotFoundError as exc:
        raise _missing(exc) from None
    return build_app(
        router, get_router=get_router, pings=pings, public_url=public_url, ping_timeout=ping_timeout, ops=ops
    )


def create_ops_app(
    router: OtpRouter | None = None,
    *,
    get_router: RouterDependency | None = None,
    pings: Mapping[str, Ping] | None = None,
    ping_timeout: float = DEFAULT_PING_TIMEOUT,
) -> FastAPI:
    """Only ``/metrics`` and ``/healthz``, for their own port (``OTP_ROUTER_OPS_PORT``).

    Raises:
        ConfigError: FastAPI is not installed.
    """
    try:
        from otp_router.webapp.app import build_ops_app
    except ModuleNotFoundError as exc:
        raise _missing(exc) from None
    return build_ops_app(router, get_router=get_router, pings=pings, ping_timeout=ping_timeout)


@asynccontextmanager
async def router_lifespan(app: Any = None) -> AsyncIterator[dict[str, Any]]:
    """An ASGI lifespan that opens ``OtpRouter.from_settings()`` and yields it as lifespan state.

    ``FastAPI(lifespan=router_lifespan)`` or ``Starlette(lifespan=router_lifespan)``:
    the settings are read when the server starts, not at import, and the
    routes of :mod:`otp_router.webapp.api` find the router under ``"otp_router"``.
    """
    from otp_router.router import OtpRouter

    async with OtpRouter.from_settings() as router:
        yield {"otp_router": router}
