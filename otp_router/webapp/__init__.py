"""The HTTP side of otp-router: a Starlette ASGI app for webhooks, the API, metrics and health.

Starlette is the optional ``[server]`` extra: importing this package needs
only the core dependencies, and :func:`create_app` raises
:class:`~otp_router.errors.ConfigError` with the install command when
Starlette is missing.

Mount it in your own app or serve it alone::

    router = OtpRouter.from_settings()
    app = create_app(router, pings=provider_pings(router))
    # uvicorn: uvicorn.run(app, access_log=False)

See :mod:`otp_router.webapp.app` for the routes, :mod:`~otp_router.webapp.api`
for authentication and input rules, and :mod:`~otp_router.webapp.webhooks`
for signature checks, replay handling and proxies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from otp_router.errors import ConfigError
from otp_router.webapp.health import DEFAULT_PING_TIMEOUT, Ping, provider_pings, run_pings
from otp_router.webapp.logs import RedactQuery

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from otp_router.router import OtpRouter

__all__ = ["Ping", "RedactQuery", "create_app", "provider_pings", "run_pings"]

INSTALL_HINT = "pip install 'otp-router[server]'"


def create_app(
    router: OtpRouter,
    *,
    pings: Mapping[str, Ping] | None = None,
    public_url: str | None = None,
    ping_timeout: float = DEFAULT_PING_TIMEOUT,
) -> Starlette:
    """Build the ASGI app around an (opened) router.

    Args:
        router: The router; the app never opens or closes it.
        pings: Extra health pings by name (queue, providers: see
            :func:`provider_pings`). The store is always pinged as ``"store"``.
        public_url: Public base URL Twilio calls, for its signatures; defaults
            to ``router.settings.public_url`` (``OTP_ROUTER_PUBLIC_URL``).
        ping_timeout: Seconds each health ping may take.

    Returns:
        A Starlette application.

    Raises:
        ConfigError: Starlette is not installed.
    """
    try:
        from otp_router.webapp.app import build_app
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "starlette":
            raise
        raise ConfigError(f"the HTTP app needs Starlette: {INSTALL_HINT}") from None
    return build_app(router, pings=pings, public_url=public_url, ping_timeout=ping_timeout)
