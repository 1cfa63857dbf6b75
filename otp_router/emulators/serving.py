"""Serving an emulator's ``aiohttp`` application on a TCP port."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otp_router.errors import InputError
from otp_router.inputs import PHONE_FIELDS, decode_form

__all__ = ["query_phone", "serve_app"]


def query_phone(request: web.Request) -> str:
    """The ``phone`` query parameter of an admin request, under the literal plus rule.

    ``/_emulator/inbox?phone=+4915123456789`` (typed as is, the ``+`` not
    encoded) means the number with its plus, as in the router's HTTP API (see
    :func:`otp_router.inputs.decode_form`); a query string that is not UTF-8
    reads as no number.
    """
    query = request.raw_path.partition("?")[2]
    try:
        pairs = decode_form(query, max_fields=20, what="query string", plus_fields=PHONE_FIELDS)
    except InputError:
        return ""
    return next((value for name, value in pairs if name == "phone"), "")


async def serve_app(app: web.Application, host: str, port: int, **runner_options: Any) -> web.AppRunner:
    """Start serving ``app`` on ``host:port`` (``port=0`` picks a free one).

    No access log: it costs CPU under benchmarks and would print phone numbers
    from query strings. ``handler_cancellation``: a client that gave up (a
    timeout) also ends the answer an emulator is holding back.

    Args:
        app: The application.
        host: Interface to bind.
        port: TCP port; 0 picks a free one.
        **runner_options: More :class:`aiohttp.web.AppRunner` options.

    Returns:
        The started runner; ``runner.addresses[0][1]`` is the bound port, and
        ``await runner.cleanup()`` stops it.
    """
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        # A port already in use must not leave the runner's hooks half set up.
        await runner.cleanup()
        raise
    return runner
