"""Wiring the router to the built-in emulators: used by the demo, the tests and the benchmarks.

Nothing here talks to a real provider. :func:`emulated_settings` points a
router's settings at a running :class:`~otp_router.emulators.EmulatorPair`
with the credentials the emulators accept, and :func:`read_code` plays the
user's phone: it returns the code once a channel has delivered it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from otp_router.config import Settings, TelegramSettings, TwilioSettings, VonageSettings
from otp_router.emulators import EmulatorPair, emulator_credentials, vonage_credentials

__all__ = ["emulated_settings", "provider_environ", "read_code", "sample_numbers"]

#: A Twilio "magic" test sender: the emulator accepts any E.164 number.
FROM_NUMBER = "+15005550006"
_DIGITS = re.compile(r"\b(\d{4,8})\b")


def emulated_settings(pair: EmulatorPair, base: Settings | None = None, **overrides: Any) -> Settings:
    """Settings whose providers are the running emulators.

    Args:
        pair: The running emulators.
        base: Settings to start from (default: built-in defaults, not the environment).
        **overrides: Top-level settings to replace (``store_url=…``, ``retry=…``).
    """
    base = base or Settings.model_construct()
    token, sid, auth = emulator_credentials(base)
    telegram = TelegramSettings(
        **{**base.telegram.model_dump(), "token": token, "base_url": pair.telegram_url}
    )
    twilio = TwilioSettings(
        **{
            **base.twilio.model_dump(),
            "account_sid": sid,
            "auth_token": auth,
            "base_url": pair.twilio_url,
            "from_number": base.twilio.from_number or FROM_NUMBER,
        }
    )
    data: dict[str, Any] = {**base.model_dump(), "telegram": telegram, "twilio": twilio}
    if pair.vonage_url is not None:
        # Credentials and URL only: whether Vonage is used stays the caller's choice
        # (OTP_ROUTER_VONAGE__ENABLED and a route bound to vonage_sms).
        key, secret, signature = vonage_credentials(base)
        data["vonage"] = VonageSettings(
            **{
                **base.vonage.model_dump(),
                "api_key": key,
                "api_secret": secret,
                "signature_secret": signature,
                "base_url": pair.vonage_url,
                "from_number": base.vonage.from_number or "otp-router",
            }
        )
    data |= overrides
    return Settings(**data)


def provider_environ(settings: Settings) -> dict[str, str]:
    """The ``OTP_ROUTER_*`` variables that give an ``otp-router`` child process the providers
    (Telegram and Twilio), store and code secret of ``settings``.

    Only these: callers add what else their child needs (retry, concurrency, ports…).
    """
    secret = settings.code_secret.get_secret_value() if settings.code_secret else ""
    return {
        "OTP_ROUTER_TELEGRAM__TOKEN": settings.telegram.token.get_secret_value(),
        "OTP_ROUTER_TELEGRAM__BASE_URL": settings.telegram.base_url,
        "OTP_ROUTER_TWILIO__ACCOUNT_SID": settings.twilio.account_sid,
        "OTP_ROUTER_TWILIO__AUTH_TOKEN": settings.twilio.auth_token.get_secret_value(),
        "OTP_ROUTER_TWILIO__FROM_NUMBER": settings.twilio.from_number or "",
        "OTP_ROUTER_TWILIO__BASE_URL": settings.twilio.base_url,
        "OTP_ROUTER_STORE_URL": settings.store_url,
        "OTP_ROUTER_CODE_SECRET": secret,
    }


async def read_code(pair: EmulatorPair, phone: str, *, wait: float = 10.0, poll: float = 0.02) -> str | None:
    """Wait until ``phone`` has received a code by any channel; None on timeout.

    This is what a person does with their phone: open Telegram or the SMS app
    and read the newest code.
    """
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while loop.time() < until:
        codes = pair.telegram.inbox(phone)
        if codes:
            return codes[-1]
        bodies = pair.twilio.inbox(phone) + pair.twilio.whatsapp_inbox(phone)
        bodies += pair.vonage.inbox(phone) if pair.vonage is not None else []
        for body in reversed(bodies):
            match = _DIGITS.search(body)
            if match:
                return match.group(1)
        for heard in reversed(pair.twilio.calls.heard(phone)):
            # A call reads "1, 2, 3, …." (twice): the digits of the first reading.
            digits = "".join(ch for ch in heard.split(".")[0] if ch.isdigit())
            if digits:
                return digits
        await asyncio.sleep(poll)
    return None


def sample_numbers(region: str, count: int, *, offset: int = 0) -> list[str]:
    """``count`` distinct valid mobile numbers of ``region`` in E.164 (for tests and the demo).

    Built from ``phonenumbers``' example mobile number by varying its last
    digits, keeping only numbers ``phonenumbers`` itself calls valid.
    """
    import phonenumbers

    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    if example is None:
        raise ValueError(f"no example mobile number for region {region}")
    out: list[str] = []
    national = example.national_number or 0
    step = offset
    while len(out) < count and step < offset + count * 50:
        candidate = phonenumbers.PhoneNumber(
            country_code=example.country_code, national_number=national - (national % 10000) + step % 10000
        )
        step += 1
        if phonenumbers.is_valid_number(candidate):
            e164 = phonenumbers.format_number(candidate, phonenumbers.PhoneNumberFormat.E164)
            if e164 not in out:
                out.append(e164)
    if len(out) < count:
        raise ValueError(f"could not build {count} valid numbers for {region}")
    return out
