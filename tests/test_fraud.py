"""Toll-fraud defences on start(): number-type policy and prefix velocity.

Everything runs through the real router with fake channels, an in-memory store
and a hand-driven clock.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import phonenumbers
import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import FraudSettings, LimitSettings, Settings
from otp_router.errors import ConfigError, RateLimited, UnsupportedNumberType
from otp_router.harness import sample_numbers
from otp_router.metrics import Metrics
from otp_router.phone import number_prefix, parse_phone
from otp_router.providers.base import (
    ChannelName,
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendRequest,
    SendResult,
)
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def not_on_telegram(method: str, arg: Any) -> Any:
    """Telegram refuses every number at the (free) probe, so every code goes by SMS."""
    if method == "probe":
        return ProbeResult(False, reason="PHONE_NUMBER_NOT_FOUND")
    raise AssertionError(f"unexpected telegram call {method}")


def sms_at(price: Decimal) -> Any:
    async def handle(method: str, arg: Any) -> Any:
        if method == "send":
            return SendResult(ref=f"SM{id(arg)}", state=DeliveryState.PENDING, cost=price)
        return True

    return handle


def mobiles(start: str, count: int) -> list[str]:
    """``count`` valid mobile numbers that begin with the E.164 digits ``start``."""
    for width in range(3, 12):
        candidates = (f"{start}{i:0{width}d}" for i in range(min(10**width, 5000)))
        found = [n for n in candidates if _is_mobile(n)]
        if len(found) >= count:
            return found[:count]
    raise AssertionError(f"not enough mobile numbers under {start}")


def _is_mobile(number: str) -> bool:
    parsed = phonenumbers.parse(number)
    return (
        phonenumbers.is_valid_number(parsed)
        and phonenumbers.number_type(parsed) == phonenumbers.PhoneNumberType.MOBILE
    )


class Env:
    def __init__(
        self, router: OtpRouter, tg: FakeChannel, sms: FakeChannel, registry: CollectorRegistry
    ) -> None:
        self.router, self.tg, self.sms, self.registry = router, tg, sms, registry

    def sms_sends(self, phones: set[str] | None = None) -> int:
        return sum(
            1
            for method, arg in self.sms.calls
            if method == "send" and (phones is None or (isinstance(arg, SendRequest) and arg.phone in phones))
        )

    def code_for(self, phone: str) -> str:
        return next(
            arg.code for method, arg in reversed(self.sms.calls) if method == "send" and arg.phone == phone
        )

    def blocks(self, scope: str) -> float:
        return self.registry.get_sample_value("otp_router_fraud_blocks_total", {"scope": scope}) or 0.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(clock: Clock) -> Any:
    """Factory: an opened router over fake channels (SMS at Indonesia's price), closed afterwards."""
    opened: list[OtpRouter] = []

    async def build(price: Decimal = Decimal("0.4023"), **settings: Any) -> Env:
        registry = CollectorRegistry()
        tg = FakeChannel(ChannelName.TELEGRAM, not_on_telegram, provider="telegram")
        sms = FakeChannel(ChannelName.SMS, sms_at(price), provider="twilio")
        settings.setdefault("code_secret", "test-secret")
        router = OtpRouter(
            store=MemoryStore(),
            channels={ChannelName.TELEGRAM: tg, ChannelName.SMS: sms},
            settings=Settings(**settings),
            metrics=Metrics(registry),
            clock=clock,
            run_deadlines=False,
        )
        await router.open()
        opened.append(router)
        return Env(router, tg, sms, registry)

    yield build
    for router in opened:
        await router.aclose()


# -- number types ------------------------------------------------------------------

REFUSED_TYPES = [
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
]


def example_of(type_name: str) -> str:
    """phonenumbers' example number of this type, from the first region that has one."""
    kind = getattr(phonenumbers.PhoneNumberType, type_name.upper())
    for region in ["GB", *sorted(phonenumbers.SUPPORTED_REGIONS)]:
        example = phonenumbers.example_number_for_type(region, kind)
        if example is not None:
            number = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            if parse_phone(number).number_type == type_name:
                return number
    raise AssertionError(f"no example number of type {type_name}")


@pytest.mark.parametrize("type_name", REFUSED_TYPES)
async def test_non_mobile_numbers_are_refused_before_any_call(make: Any, type_name: str) -> None:
    """Premium rate, toll free, VoIP, fixed line… raise UnsupportedNumberType; nothing sent or stored."""
    env = await make()
    with pytest.raises(UnsupportedNumberType) as info:
        await env.router.start(example_of(type_name))
    assert info.value.number_type == type_name
    assert type_name in str(info.value)
    assert env.tg.calls == [] and env.sms.calls == []
    assert isinstance(env.router.store, MemoryStore) and env.router.store._records == {}
    assert env.blocks("number_type") == 1


@pytest.mark.parametrize("phone", ["+447400123456", "+4915112345678", "+12025550143", "+14165550123"])
async def test_mobile_and_fixed_line_or_mobile_numbers_are_sent_to(make: Any, phone: str) -> None:
    """Mobile numbers, and US/CA numbers phonenumbers cannot tell apart (fixed_line_or_mobile), get a code."""
    env = await make()
    assert parse_phone(phone).number_type in {"mobile", "fixed_line_or_mobile"}
    verification = await env.router.start(phone)
    assert verification.channel == "sms" and env.sms_sends() == 1


async def test_number_types_are_per_channel(make: Any) -> None:
    """Allowing fixed lines on SMS only sends a fixed-line number by SMS, never trying Telegram."""
    fraud = FraudSettings(allowed_number_types={"sms": ["MOBILE", "Fixed_Line"]})
    env = await make(fraud=fraud)
    verification = await env.router.start(example_of("fixed_line"))
    assert verification.channel == "sms" and env.sms_sends() == 1
    assert env.tg.calls == [], "telegram keeps the default types, so it is skipped for a fixed line"
    # Telegram still gets mobile numbers (its default), probed first.
    await env.router.start("+447400123456")
    assert [method for method, _ in env.tg.calls] == ["probe"]


def test_unknown_number_type_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt type or channel is a ConfigError that names the variable and lists the known names."""
    monkeypatch.setenv("OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES", '{"sms": ["mobile", "landline"]}')
    with pytest.raises(ConfigError, match=r"OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES.*landline.*fixed_line"):
        Settings.load()
    monkeypatch.setenv("OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES", '{"smss": ["mobile"]}')
    with pytest.raises(ConfigError, match=r"OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES.*smss.*telegram"):
        Settings.load()
    monkeypatch.setenv("OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES", '{"sms": ["mobile", "FIXED_LINE"]}')
    assert Settings.load().fraud.number_types_for("sms") == ("mobile", "fixed_line")
    assert Settings.load().fraud.number_types_for("telegram") == ("mobile", "fixed_line_or_mobile")


def test_prefix_is_never_a_whole_number() -> None:
    """The prefix is the calling code and the first digits of the national number, and stays short."""
    assert number_prefix(parse_phone("+447400123456"), 4) == "+44 7400"
    assert number_prefix(parse_phone("+62812340001"), 5) == "+62 81234"
    assert number_prefix(parse_phone("+4930123"), 6) == "+49 301"


# -- velocity per prefix -------------------------------------------------------------


async def test_prefix_velocity_limit(make: Any) -> None:
    """Past per_prefix starts in one prefix, its new numbers are refused; other prefixes are not."""
    env = await make(limits=LimitSettings(per_prefix=3, per_prefix_window=600))
    attacked = sample_numbers("ID", 5)
    for phone in attacked[:3]:
        await env.router.start(phone)
    with pytest.raises(RateLimited) as info:
        await env.router.start(attacked[3])
    assert info.value.scope == "prefix" and 0 < info.value.retry_after <= 600
    assert attacked[3][1:] not in str(info.value)
    await env.router.start(mobiles("+62813", 1)[0])
    assert env.sms_sends() == 4
