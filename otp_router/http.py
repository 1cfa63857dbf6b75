"""The one shared outgoing HTTP client per process.

httpx's API over the aiohttp transport (``httpx-aiohttp``): measured several
times cheaper in CPU per request than httpx's default transport (see DESIGN).
Channels receive this client; they never create or close their own.
"""

from __future__ import annotations

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from otp_router.config import HttpSettings

__all__ = ["create_http_client"]


def create_http_client(settings: HttpSettings | None = None) -> httpx.AsyncClient:
    """Create the shared client; the caller owns it and must ``aclose()`` it.

    Args:
        settings: Pool size and connect timeout.

    Returns:
        An ``httpx.AsyncClient`` running on aiohttp.
    """
    settings = settings or HttpSettings()
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
    )
    return HttpxAiohttpClient(
        limits=limits,
        timeout=httpx.Timeout(10.0, connect=settings.connect_timeout),
        # Never pick up proxies or .netrc from the environment for provider calls.
        trust_env=False,
        follow_redirects=False,
    )
