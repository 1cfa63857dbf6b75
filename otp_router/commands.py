"""``otp-router send``, ``check`` and ``status``: one JSON object on stdout each.

Each invocation opens the store at ``OTP_ROUTER_STORE_URL``, so separate
invocations share state (the default SQLite file, or Redis). A bad input is a
one-line message on stderr and exit status 1; nothing is sent or stored. A
``send`` that no channel could deliver is a one-line message on stderr naming
the (stored, failed) verification and each channel's reason, exit status 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from otp_router.config import Settings
from otp_router.errors import AllProvidersFailed, OtpRouterError, RateLimited
from otp_router.router import OtpRouter

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_SENT",
    "check_arguments",
    "run_check",
    "run_send",
    "run_status",
    "send_arguments",
    "status_arguments",
]

EXIT_FAILED = 1
#: ``send``: no channel could send the code (the failed verification is stored).
EXIT_NOT_SENT = 3


def send_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``otp-router send``."""
    parser.add_argument("phone", help="phone number in international format, e.g. +447911123456")
    parser.add_argument("--idempotency-key", help="same key, same verification: nothing is sent twice")
    parser.add_argument("--region", help="ISO region for numbers in national format, e.g. GB")


def check_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``otp-router check``."""
    parser.add_argument("id", help="verification id printed by 'send'")
    parser.add_argument("code", help="the code the user entered")


def status_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``otp-router status``."""
    parser.add_argument("id", help="verification id printed by 'send'")


def _run(settings: Settings, body: Callable[[OtpRouter], Awaitable[tuple[dict[str, Any], int]]]) -> int:
    async def main() -> int:
        # No deadline loop: a one-shot command must not fire other verifications' fallbacks.
        async with OtpRouter.from_settings(settings, run_deadlines=False) as router:
            try:
                out, status = await body(router)
            except AllProvidersFailed as exc:
                print(f"otp-router: verification {exc.verification_id}: {exc}", file=sys.stderr)
                return EXIT_NOT_SENT
            except RateLimited as exc:
                print(f"otp-router: {exc} (retry after {exc.retry_after:.0f} s)", file=sys.stderr)
                return EXIT_FAILED
            except OtpRouterError as exc:
                print(f"otp-router: {exc}", file=sys.stderr)
                return EXIT_FAILED
            print(json.dumps(out, sort_keys=True))
            return status

    return asyncio.run(main())


def run_send(args: argparse.Namespace, settings: Settings) -> int:
    """Start a verification; Telegram refusals fall back to SMS within this call."""

    async def body(router: OtpRouter) -> tuple[dict[str, Any], int]:
        v = await router.start(args.phone, idempotency_key=args.idempotency_key, default_region=args.region)
        return v.to_dict(), 0

    return _run(settings, body)


def run_check(args: argparse.Namespace, settings: Settings) -> int:
    """Check a code; exit 0 only when it is valid."""

    async def body(router: OtpRouter) -> tuple[dict[str, Any], int]:
        result = await router.check(args.id, args.code)
        return result.to_dict(), 0 if result.valid else EXIT_FAILED

    return _run(settings, body)


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print a verification."""

    async def body(router: OtpRouter) -> tuple[dict[str, Any], int]:
        return (await router.get(args.id)).to_dict(), 0

    return _run(settings, body)
