"""Local Telegram Gateway, Twilio and Vonage servers that speak the real wire formats.

They power the demo, the tests, the benchmarks and users' own CI. Both accept
the credentials the router itself reads from :class:`~otp_router.config.Settings`
(``settings.telegram.token``, ``settings.twilio.account_sid``,
``settings.twilio.auth_token``), so one environment configures both sides.
When those are empty the fixed defaults below are used; set the router to the
same values (``OTP_ROUTER_TELEGRAM__TOKEN=emulator-token`` …).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otp_router.config import Settings
from otp_router.emulators.script import Behaviour, Script
from otp_router.prices import SmsPrices

if TYPE_CHECKING:
    from otp_router.emulators.telegram import TelegramEmulator
    from otp_router.emulators.twilio import TwilioEmulator
    from otp_router.emulators.vonage import VonageEmulator

__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "DEFAULT_TELEGRAM_PORT",
    "DEFAULT_TELEGRAM_TOKEN",
    "DEFAULT_TWILIO_PORT",
    "DEFAULT_VONAGE_KEY",
    "DEFAULT_VONAGE_PORT",
    "DEFAULT_VONAGE_SECRET",
    "DEFAULT_VONAGE_SIGNATURE_SECRET",
    "Behaviour",
    "EmulatorPair",
    "Script",
    "emulator_credentials",
    "run_emulators",
    "serve_emulators",
    "vonage_credentials",
]

#: Telegram Gateway token the emulator accepts when ``OTP_ROUTER_TELEGRAM__TOKEN`` is empty.
DEFAULT_TELEGRAM_TOKEN = "emulator-token"
#: Twilio Account SID the emulator serves when ``OTP_ROUTER_TWILIO__ACCOUNT_SID`` is empty.
DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
#: Twilio Auth Token the emulator accepts when ``OTP_ROUTER_TWILIO__AUTH_TOKEN`` is empty.
DEFAULT_AUTH_TOKEN = "emulator-auth-token"
#: Ports ``otp-router emulate`` uses unless told otherwise.
DEFAULT_TELEGRAM_PORT = 8801
DEFAULT_TWILIO_PORT = 8802
DEFAULT_VONAGE_PORT = 8803
#: Vonage credentials the emulator accepts when ``OTP_ROUTER_VONAGE__*`` are empty.
DEFAULT_VONAGE_KEY = "emulator-key"
DEFAULT_VONAGE_SECRET = "emulator-secret"
DEFAULT_VONAGE_SIGNATURE_SECRET = "emulator-signature-secret"


def emulator_credentials(settings: Settings) -> tuple[str, str, str]:
    """The credentials the emulators accept: the router's own, or the defaults.

    Args:
        settings: The same settings the router reads.

    Returns:
        ``(telegram_token, twilio_account_sid, twilio_auth_token)``.
    """
    return (
        settings.telegram.token.get_secret_value() or DEFAULT_TELEGRAM_TOKEN,
        settings.twilio.account_sid or DEFAULT_ACCOUNT_SID,
        settings.twilio.auth_token.get_secret_value() or DEFAULT_AUTH_TOKEN,
    )


def _url(host: str, port: int) -> str:
    # A wildcard bind is reachable on loopback; print an address clients can use.
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(slots=True)
class EmulatorPair:
    """Both emulators, running.

    Attributes:
        telegram: The Telegram Gateway emulator.
        twilio: The Twilio emulator.
        telegram_url: Base URL for ``OTP_ROUTER_TELEGRAM__BASE_URL``.
        twilio_url: Base URL for ``OTP_ROUTER_TWILIO__BASE_URL``.
        script: The script both share.
    """

    telegram: TelegramEmulator
    twilio: TwilioEmulator
    telegram_url: str
    twilio_url: str
    script: Script
    #: The Vonage SMS emulator, when started (``vonage_port`` not None).
    vonage: VonageEmulator | None = None
    vonage_url: str | None = None

    async def aclose(self) -> None:
        """Stop the emulators (pending callbacks are cancelled)."""
        try:
            if self.vonage is not None:
                await self.vonage.stop()
        finally:
            try:
                await self.twilio.stop()
            finally:
                await self.telegram.stop()


def vonage_credentials(settings: Settings) -> tuple[str, str, str]:
    """``(api_key, api_secret, signature_secret)`` the Vonage emulator accepts (the router's, or defaults)."""
    vonage = settings.vonage
    return (
        vonage.api_key or DEFAULT_VONAGE_KEY,
        vonage.api_secret.get_secret_value() or DEFAULT_VONAGE_SECRET,
        vonage.signature_secret.get_secret_value() or DEFAULT_VONAGE_SIGNATURE_SECRET,
    )


async def serve_emulators(
    settings: Settings,
    *,
    host: str,
    telegram_port: int,
    twilio_port: int,
    script: Script,
    vonage_port: int | None = 0,
) -> EmulatorPair:
    """Start the emulators sharing one script.

    Args:
        settings: Source of the credentials (see :func:`emulator_credentials`)
            and of the price table (``prices_file``).
        host: Interface to bind.
        telegram_port: Port for the Telegram emulator; 0 picks a free one.
        twilio_port: Port for the Twilio emulator; 0 picks a free one.
        script: Behaviour per number, shared by all.
        vonage_port: Port for the Vonage emulator; 0 picks a free one; None: not started.

    Returns:
        The running pair; call :meth:`EmulatorPair.aclose` to stop it.
    """
    # Imported here so that importing this package stays cheap and does not
    # need aiohttp's server side until emulators are actually started.
    from otp_router.emulators.telegram import TelegramEmulator
    from otp_router.emulators.twilio import TwilioEmulator
    from otp_router.emulators.vonage import VonageEmulator

    token, account_sid, auth_token = emulator_credentials(settings)
    prices = SmsPrices.load(settings.prices_file)
    telegram = TelegramEmulator(token, script, price=prices.telegram)
    twilio = TwilioEmulator(account_sid, auth_token, script, prices=prices)
    bound_telegram = await telegram.start(host, telegram_port)
    vonage: VonageEmulator | None = None
    try:
        bound_twilio = await twilio.start(host, twilio_port)
        if vonage_port is not None:
            from otp_router.emulators.vonage import VonageEmulator

            key, secret, signature = vonage_credentials(settings)
            vonage = VonageEmulator(
                key,
                secret,
                script,
                signature_secret=signature,
                signature_method=settings.vonage.signature_method,
                prices=prices,
            )
            bound_vonage = await vonage.start(host, vonage_port)
    except BaseException:
        await twilio.stop()
        await telegram.stop()
        raise
    return EmulatorPair(
        telegram=telegram,
        twilio=twilio,
        telegram_url=_url(host, bound_telegram),
        twilio_url=_url(host, bound_twilio),
        script=script,
        vonage=vonage,
        vonage_url=_url(host, bound_vonage) if vonage is not None else None,
    )


async def run_emulators(
    settings: Settings,
    *,
    host: str,
    telegram_port: int,
    twilio_port: int,
    script: Script,
    on_ready: Callable[[EmulatorPair], None] | None = None,
    vonage_port: int | None = DEFAULT_VONAGE_PORT,
) -> None:
    """Serve both emulators until SIGTERM or SIGINT.

    Args:
        settings: As for :func:`serve_emulators`.
        host: Interface to bind.
        telegram_port: Telegram emulator port (0: any free port).
        twilio_port: Twilio emulator port (0: any free port).
        script: Shared behaviour script.
        on_ready: Called once all are listening (the CLI prints the URLs).
        vonage_port: Vonage emulator port (0: any free port; None: not started).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        pair = await serve_emulators(
            settings,
            host=host,
            telegram_port=telegram_port,
            twilio_port=twilio_port,
            script=script,
            vonage_port=vonage_port,
        )
        try:
            if on_ready is not None:
                on_ready(pair)
            await stop.wait()
        finally:
            await pair.aclose()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
