"""Health pings for ``/healthz``, in the style of svcs.

A ping is an ``async () -> None`` that raises when its dependency is not
usable. :func:`run_pings` runs them all at once, each under its own timeout,
and reports ``{"ok": [...], "failing": {name: repr(exc)}}``; the names are
the ones Grafana panels and alerts use.

This module needs only httpx, not Starlette: :func:`provider_pings` can be
used by a worker that reports health some other way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from otp_router.router import OtpRouter

__all__ = ["DEFAULT_PING_TIMEOUT", "Ping", "PingTimeout", "provider_pings", "run_pings"]

#: An async check that raises when its dependency is unusable.
Ping = Callable[[], Awaitable[None]]

#: Seconds one ping may take before it counts as failing.
DEFAULT_PING_TIMEOUT = 2.0


class PingTimeout(TimeoutError):
    """A ping did not answer within its timeout."""


async def _timed(ping: Ping, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await ping()
    except TimeoutError:
        raise PingTimeout(f"no answer within {seconds:g} s") from None


async def run_pings(
    pings: Mapping[str, Ping], *, ping_timeout: float = DEFAULT_PING_TIMEOUT
) -> dict[str, Any]:
    """Run every ping concurrently, each bounded by ``ping_timeout``.

    Args:
        pings: Ping per dependency name.
        ping_timeout: Seconds each ping may take.

    Returns:
        ``{"ok": [names...], "failing": {name: repr(exception)}}``, names in
        the order given.
    """
    names = list(pings)
    results = await asyncio.gather(
        *(_timed(pings[name], ping_timeout) for name in names), return_exceptions=True
    )
    ok: list[str] = []
    failing: dict[str, str] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                # Cancellation and interpreter exits are not health answers.
                raise result
            failing[name] = repr(result)
        else:
            ok.append(name)
    return {"ok": ok, "failing": failing}


def _reachability_ping(url: str, client: httpx.AsyncClient | None, timeout: float) -> Ping:
    async def ping() -> None:
        # Any HTTP answer (even 401 or 404) proves the provider is reachable;
        # only a transport failure (DNS, refused, TLS, timeout) raises here.
        if client is not None:
            await client.get(url, timeout=timeout)
            return
        async with httpx.AsyncClient(trust_env=False, timeout=timeout, follow_redirects=False) as own:
            await own.get(url)

    return ping


def provider_pings(
    router: OtpRouter,
    *,
    client: httpx.AsyncClient | None = None,
    timeout: float = DEFAULT_PING_TIMEOUT,
) -> dict[str, Ping]:
    """Cheap reachability pings for the router's Telegram and Twilio channels.

    Each ping is a ``GET`` on the provider's base URL (``OTP_ROUTER_TELEGRAM__BASE_URL``,
    ``OTP_ROUTER_TWILIO__BASE_URL``): it sends no message, costs nothing and
    carries no credentials. Any HTTP status counts as healthy, so this is a
    *reachability* check (DNS, network, TLS, an emulator that is up), **not**
    an authentication check: a revoked token still passes. Channels of other
    providers get no ping here; pass your own in ``pings``.

    Args:
        router: The router whose channels to ping; keys are provider names
            (``"telegram"``, ``"twilio"``).
        client: HTTP client to use (the process's shared one, ideally). Without
            it each ping opens and closes a short-lived client.
        timeout: Seconds per request.

    Returns:
        Ping per provider name, for :func:`otp_router.webapp.create_app`'s ``pings``.
    """
    base_urls = {
        "telegram": router.settings.telegram.base_url,
        "twilio": router.settings.twilio.base_url,
    }
    pings: dict[str, Ping] = {}
    for channel in router.channels.values():
        url = base_urls.get(channel.provider)
        if url is not None:
            pings[channel.provider] = _reachability_ping(url + "/", client, timeout)
    return pings
