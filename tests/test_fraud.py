"""Toll-fraud defences on start(): number-type policy, prefix velocity and the conversion guard.

Everything runs through the real router with fake channels, an in-memory store
and a hand-driven clock; the scripted pumping attack counts the SMS sends and
the ledger cost the attacker obtained before being cut off.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import phonenumbers
import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import FraudSettings, LimitSettings, Settings
from otp_router.core import CheckOutcome, Status
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
    env = await make(
        limits=LimitSettings(per_prefix=3, per_prefix_window=600), fraud=FraudSettings(min_conversion=0)
    )
    attacked = sample_numbers("ID", 5)
    for phone in attacked[:3]:
        await env.router.start(phone)
    with pytest.raises(RateLimited) as info:
        await env.router.start(attacked[3])
    assert info.value.scope == "prefix" and 0 < info.value.retry_after <= 600
    assert attacked[3][1:] not in str(info.value)
    await env.router.start(mobiles("+62813", 1)[0])
    assert env.sms_sends() == 4


# -- conversion guard ---------------------------------------------------------------


async def test_pumping_attack_is_cut_off_within_budget(make: Any, clock: Clock) -> None:
    """Many numbers of one expensive prefix, none verified: at most prefix_min_started SMS are paid for.

    Meanwhile users of another prefix of the same country and of another
    country keep getting codes and verifying.
    """
    budget = 20
    env = await make(
        limits=LimitSettings(per_prefix=0),
        fraud=FraudSettings(prefix_min_started=budget, country_min_started=60, min_conversion=0.2),
    )
    attack = sample_numbers("ID", 300)
    legit = mobiles("+62813", 40) + sample_numbers("GB", 40)
    refused: list[str] = []
    verified = 0
    for i, phone in enumerate(attack):
        clock.now += 1
        try:
            await env.router.start(phone)
        except RateLimited as exc:
            assert exc.scope == "prefix_conversion"
            refused.append(phone)
        if i % 3 == 0 and legit:
            user = legit.pop()
            v = await env.router.start(user)
            clock.now += 20
            result = await env.router.check(v.id, env.code_for(user))
            verified += result.status is CheckOutcome.VALID
    attacked = set(attack)
    assert env.sms_sends(attacked) == budget, "cut off exactly at the configured volume"
    assert len(refused) == len(attack) - budget
    ledger = await env.router.store.ledger()
    attack_cost = sum((e.amount for e in ledger if e.region == "ID"), Decimal(0))
    assert attack_cost == Decimal("0.4023") * (budget + 40), "the attack's 20 SMS and the 40 real users'"
    assert legit == [] and verified == 80
    assert env.blocks("prefix_conversion") == len(refused)
    assert env.blocks("country_conversion") == 0


def come_of_age(fraud: FraudSettings) -> float:
    """Seconds after which a start is surely judged: the grace, plus the one slot (grace / 12)
    that the guard counts as fresh while part of it still is."""
    return fraud.conversion_grace * 13 / 12


async def burst(env: Env, clock: Clock, phones: list[str], *, verify_after: float | None) -> list[str]:
    """Start ``phones`` one a second; each user enters the code ``verify_after`` s later (None: never).

    Returns the numbers refused by the conversion guard.
    """
    refused: list[str] = []
    pending: list[tuple[float, str, str]] = []  # (when the user types, vid, phone)
    start = clock.now
    for i, phone in enumerate(phones):
        at = start + i + 1
        for when, vid, user in [p for p in pending if p[0] <= at]:
            clock.now = when
            assert (await env.router.check(vid, env.code_for(user))).status is CheckOutcome.VALID
            pending.remove((when, vid, user))
        clock.now = at
        try:
            v = await env.router.start(phone)
        except RateLimited as exc:
            assert exc.scope == "prefix_conversion"
            refused.append(phone)
            continue
        if verify_after is not None:
            pending.append((at + verify_after, v.id, phone))
    for when, vid, user in pending:
        clock.now = max(clock.now, when)
        assert (await env.router.check(vid, env.code_for(user))).status is CheckOutcome.VALID
    return refused


async def test_fresh_legitimate_burst_is_not_judged_before_it_could_convert(make: Any, clock: Clock) -> None:
    """60 real users in a new prefix within a minute, each typing the code 45 s after the start: none is
    refused, although 30 starts were made before any verification. Without the grace the same burst is cut
    off at the 31st start (the defect the grace fixes)."""
    phones = sample_numbers("ID", 60)
    env = await make(limits=LimitSettings(per_prefix=0), fraud=FraudSettings())
    assert await burst(env, clock, phones, verify_after=45) == []
    assert env.blocks("prefix_conversion") == env.blocks("country_conversion") == 0
    assert env.sms_sends(set(phones)) == 60

    strict = await make(limits=LimitSettings(per_prefix=0), fraud=FraudSettings(conversion_grace=0))
    refused = await burst(strict, clock, phones, verify_after=45)
    assert refused and refused[0] == phones[30]


async def test_fresh_burst_that_never_converts_is_cut_off_once_it_comes_of_age(
    make: Any, clock: Clock
) -> None:
    """A pumping burst gets at most the grace's worth of starts (plus one grace slot): once its first
    starts are older than the grace with no verification behind them, the prefix is refused."""
    fraud = FraudSettings()
    env = await make(limits=LimitSettings(per_prefix=0), fraud=fraud)
    attack = sample_numbers("ID", 300)
    refused = await burst(env, clock, attack, verify_after=None)
    paid = env.sms_sends(set(attack))
    slot = fraud.conversion_grace / 12
    assert fraud.conversion_grace <= paid <= fraud.conversion_grace + slot
    assert refused == attack[paid:], "every start after the cut-off is refused"
    assert env.blocks("prefix_conversion") == len(refused)


async def test_blocked_prefix_reopens_after_the_cooldown(make: Any, clock: Clock) -> None:
    """The block lasts block_cooldown; once the unverified starts left the window the prefix is open again."""
    fraud = FraudSettings(prefix_min_started=5, min_conversion=0.5, conversion_window=600, block_cooldown=900)
    env = await make(limits=LimitSettings(per_prefix=0), fraud=fraud)
    numbers = sample_numbers("ID", 12)
    for phone in numbers[:5]:
        await env.router.start(phone)
    clock.now += come_of_age(fraud)  # old enough to have been verified: now they are judged
    with pytest.raises(RateLimited) as info:
        await env.router.start(numbers[5])
    assert info.value.retry_after == pytest.approx(900)
    clock.now += 899
    with pytest.raises(RateLimited):
        await env.router.start(numbers[6])
    clock.now += 2
    v = await env.router.start(numbers[7])
    assert v.status is Status.PENDING and env.sms_sends() == 6


async def test_country_conversion_guard(make: Any, clock: Clock) -> None:
    """With the prefix guard off, a country whose conversion collapses is blocked; others are not."""
    fraud = FraudSettings(prefix_min_started=0, country_min_started=10, min_conversion=0.3)
    env = await make(limits=LimitSettings(per_prefix=0), fraud=fraud)
    attack = sample_numbers("ID", 15)
    for phone in attack[:10]:
        clock.now += 1
        await env.router.start(phone)
    clock.now += come_of_age(fraud)
    with pytest.raises(RateLimited) as info:
        await env.router.start(attack[10])
    assert info.value.scope == "country_conversion"
    assert env.blocks("country_conversion") == 1
    gb = sample_numbers("GB", 1)[0]
    v = await env.router.start(gb)
    assert (await env.router.check(v.id, env.code_for(gb))).status is CheckOutcome.VALID


async def test_verified_traffic_is_never_blocked(make: Any, clock: Clock) -> None:
    """A prefix whose users verify keeps working far past the minimum volume."""
    fraud = FraudSettings(prefix_min_started=5, country_min_started=5, min_conversion=0.5)
    env = await make(limits=LimitSettings(per_prefix=0), fraud=fraud)
    for phone in sample_numbers("ID", 60):
        clock.now += 5
        v = await env.router.start(phone)
        assert (await env.router.check(v.id, env.code_for(phone))).status is CheckOutcome.VALID
    assert env.blocks("prefix_conversion") == env.blocks("country_conversion") == 0


async def test_guard_off_with_zero(make: Any) -> None:
    """min_conversion = 0 turns the conversion guard off: unverified traffic is only rate limited."""
    env = await make(
        limits=LimitSettings(per_prefix=0), fraud=FraudSettings(min_conversion=0, prefix_min_started=2)
    )
    for phone in sample_numbers("ID", 10):
        await env.router.start(phone)
    assert env.sms_sends() == 10


async def test_guard_keeps_no_number_or_prefix_in_keys_or_logs(
    make: Any, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Limit and guard keys are keyed hashes (country aside), and a block logs the region only."""
    caplog.set_level("DEBUG")
    fraud = FraudSettings(prefix_min_started=3, min_conversion=0.5, prefix_digits=4)
    env = await make(limits=LimitSettings(per_prefix=50), fraud=fraud)
    numbers = sample_numbers("ID", 4)
    for phone in numbers[:3]:
        clock.now += 1
        await env.router.start(phone)
    clock.now += come_of_age(fraud)
    with pytest.raises(RateLimited):
        await env.router.start(numbers[3])
    store = env.router.store
    assert isinstance(store, MemoryStore)
    keys = [*store._hits, *store._conversion, *store._conversion_blocks]
    assert any(k.startswith("conv-prefix:") for k in keys) and "conv-country:ID" in keys
    for key in keys:
        value = key.partition(":")[2]
        assert value == "ID" or re.fullmatch("[0-9a-f]{32}", value), key
    for phone in numbers:
        assert phone[3:] not in caplog.text
