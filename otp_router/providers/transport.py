"""One map from HTTP transport failures to our error tree, shared by every adapter.

What matters for a send is whether the request *can have been performed*:
only a failure to connect proves it was never written (safe to retry a
send); a timeout or a dropped connection after writing may have sent the
message. The same failure means the same class for every provider.
"""

from __future__ import annotations

import aiohttp
import httpx

from otp_router.errors import (
    ProviderError,
    ProviderRejected,
    ProviderResponseError,
    ProviderTimeout,
    ProviderUnavailable,
)

__all__ = ["map_requests_error", "map_transport_error"]


def map_transport_error(exc: Exception, *, provider: str, message: str) -> ProviderError:
    """Map an httpx (or, through httpx-aiohttp, aiohttp) failure to our exception.

    =====================================================  =========================  =============
    failure                                                class                      not_performed
    =====================================================  =========================  =============
    unsupported scheme, invalid URL (configuration)        ProviderRejected           (permanent)
    connect timeout, pool timeout                          ProviderTimeout            True
    read/write timeout                                     ProviderTimeout            False
    connection refused (connect error)                     ProviderUnavailable        True
    malformed answer (decoding, bad status line, payload)  ProviderResponseError      False
    anything else (reset, disconnect, protocol error)      ProviderUnavailable        False
    =====================================================  =========================  =============

    Args:
        exc: An ``httpx.HTTPError``/``httpx.InvalidURL`` or ``aiohttp.ClientError``.
        provider: Provider name carried by the error.
        message: The error's message (the caller decides what detail is safe to show).

    Returns:
        The exception to raise ``from exc``.
    """
    # httpx-aiohttp maps *every* aiohttp ClientConnectionError (even "server
    # disconnected" after the request was written) to httpx.ConnectTimeout,
    # so the aiohttp cause, when there is one, is the more precise witness.
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    if isinstance(cause, httpx.UnsupportedProtocol | httpx.InvalidURL | aiohttp.InvalidURL):
        # A bad base_url: a configuration problem that retrying cannot fix.
        return ProviderRejected(message, provider=provider, code="INVALID_URL")
    if isinstance(cause, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ProviderTimeout(message, provider=provider, not_performed=True)
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return ProviderTimeout(message, provider=provider, not_performed=False)
    if isinstance(cause, aiohttp.ClientConnectorError | httpx.ConnectError):
        return ProviderUnavailable(message, provider=provider, not_performed=True)
    if isinstance(cause, aiohttp.ClientResponseError | aiohttp.ClientPayloadError | httpx.DecodingError):
        # The server answered, but not in a form we can read: it may have acted.
        return ProviderResponseError(message, provider=provider, not_performed=False)
    # A reset or a protocol error is a connection that broke after the request
    # was (maybe) written: unavailable, and perhaps performed.
    return ProviderUnavailable(message, provider=provider, not_performed=False)


def map_requests_error(exc: Exception, *, provider: str, message: str) -> ProviderError:
    """The same map for ``requests`` failures (SDKs that bring their own synchronous client).

    ``requests`` reports a refused connection and a connection dropped after
    the request was written both as ``ConnectionError``; only the former,
    recognisable by urllib3's ``NewConnectionError`` inside, is not performed.

    Args:
        exc: A ``requests.RequestException``.
        provider: Provider name carried by the error.
        message: The error's message.

    Returns:
        The exception to raise ``from exc``.
    """
    import requests
    from urllib3.exceptions import NewConnectionError

    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema):
        return ProviderRejected(message, provider=provider, code="INVALID_URL")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return ProviderTimeout(message, provider=provider, not_performed=True)
    if isinstance(exc, requests.exceptions.Timeout):
        return ProviderTimeout(message, provider=provider, not_performed=False)
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        refused = isinstance(getattr(reason, "reason", reason), NewConnectionError)
        return ProviderUnavailable(message, provider=provider, not_performed=refused)
    if isinstance(exc, requests.exceptions.ContentDecodingError | requests.exceptions.JSONDecodeError):
        return ProviderResponseError(message, provider=provider, not_performed=False)
    return ProviderUnavailable(message, provider=provider, not_performed=False)
