"""The real router, real channels and a real SQLite file against the emulators over loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import CircuitSettings, RetrySettings
from otp_router.core import CheckOutcome, Status
from otp_router.emulators import EmulatorPair, Script
from otp_router.harness import emulated_settings, read_code, sample_numbers
from otp_router.metrics import Metrics
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName
from otp_router.router import OtpRouter

# Emulated time runs 20x faster: Telegram's minimum ttl of 30 s expires after 1.5 s.
TIME_SCALE = 0.05
FAST_POLICY = Policy(steps=(Step(ChannelName.TELEGRAM, 1.0, probe=True), Step(ChannelName.SMS, 2.0)))


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=TIME_SCALE, default_delivery=4.0))


@pytest.fixture
async def router(pair: EmulatorPair, tmp_path: Path) -> AsyncIterator[OtpRouter]:
    settings = emulated_settings(
        pair,
        store_url=f"sqlite:///{tmp_path / 'otp.db'}",
        code_secret="e2e-secret",
        retry=RetrySettings(backoff=False, attempts=3, timeout=10),
        circuit=CircuitSettings(failures=3, cooldown=60),
        settle_delay=0.5,
    )
    async with OtpRouter.from_settings(
        settings, policy=FAST_POLICY, metrics=Metrics(CollectorRegistry())
    ) as r:
        yield r


async def wait_for(router: OtpRouter, vid: str, predicate: Any, within: float = 8.0) -> Any:
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while loop.time() < until:
        state = await router.get(vid)
        if predicate(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached within {within}s: {await router.get(vid)}")


def sends(pair: EmulatorPair, phone: str) -> tuple[int, int]:
    telegram = [
        e for e in pair.telegram.log if e.method == "sendVerificationMessage" and e.phone_number == phone
    ]
    return sum(1 for e in telegram if e.outcome == "ok"), len(pair.twilio.messages_to(phone))


async def test_telegram_delivered_and_verified(router: OtpRouter, pair: EmulatorPair) -> None:
    """A Telegram user gets the code by Telegram only and verifies; cost is one Telegram code."""
    phone = "+447400120001"
    v = await router.start(phone)
    assert v.channel == "telegram"
    code = await read_code(pair, phone)
    assert code is not None
    result = await router.check(v.id, code)
    assert result.valid
    assert sends(pair, phone) == (1, 0)
    await router.wait_idle()
    assert await router.ledger_total(v.id) == Decimal("0.01")
    checks = [e for e in pair.telegram.log if e.method == "checkVerificationStatus"]
    assert checks, "the entered code is reported to Telegram"


async def test_not_on_telegram_goes_to_sms_at_once(router: OtpRouter, pair: EmulatorPair) -> None:
    """A number Telegram refuses gets the same code by SMS in the same call, with no Telegram charge."""
    phone = "+4915123450002"
    pair.script.set(phone, telegram="absent")
    v = await router.start(phone)
    assert v.channel == "sms" and v.fallbacks[0].reason == "ability_refused"
    code = await read_code(pair, phone)
    assert code is not None and (await router.check(v.id, code)).valid
    assert sends(pair, phone) == (0, 1)
    ledger = await router.store.ledger(v.id)
    assert {e.channel for e in ledger} == {"sms"}


async def test_never_delivered_falls_back_and_is_refunded(router: OtpRouter, pair: EmulatorPair) -> None:
    """Telegram never delivers: SMS at the deadline, and Telegram's charge comes back as a refund."""
    phone = "+33612340003"
    pair.script.set(phone, telegram_never=True)
    v = await router.start(phone)
    assert v.channel == "telegram"
    state = await wait_for(router, v.id, lambda s: s.channel == "sms")
    assert state.fallbacks[0].reason in ("deadline", "expired")
    code = await read_code(pair, phone)
    assert code is not None and (await router.check(v.id, code)).valid

    async def telegram_net() -> Decimal:
        return sum((e.amount for e in await router.store.ledger(v.id) if e.channel == "telegram"), Decimal(0))

    for _ in range(80):  # the refund arrives when Telegram's ttl runs out, then a settle pass books it
        if await telegram_net() == 0:
            break
        await asyncio.sleep(0.1)
    ledger = await router.store.ledger(v.id)
    assert [e.kind.value for e in ledger if e.channel == "telegram"] == ["charge", "refund"]
    assert await telegram_net() == 0
    assert sends(pair, phone) == (1, 1)


async def test_5xx_storm_opens_circuit(router: OtpRouter, pair: EmulatorPair) -> None:
    """Telegram answering 502 to everyone opens its circuit; later users go straight to SMS."""
    phones = sample_numbers("GB", 5, offset=100)
    for phone in phones:
        pair.script.set(phone, telegram_5xx=100)
    first = [await router.start(p) for p in phones[:3]]
    assert all(v.channel == "sms" for v in first)
    assert router.circuits[ChannelName.TELEGRAM] == 1
    before = len(pair.telegram.log)
    later = await router.start(phones[3])
    assert later.fallbacks[0].reason == "circuit_open"
    assert len(pair.telegram.log) == before, "no Telegram call while the circuit is open"


async def test_flood_wait_is_honoured(router: OtpRouter, pair: EmulatorPair) -> None:
    """FLOOD_WAIT_1 is waited out and the probe retried; the user still gets Telegram."""
    phone = "+393123450004"
    pair.script.set(phone, telegram_flood_wait=1, telegram_flood_count=1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    v = await router.start(phone)
    waited = loop.time() - began
    assert v.channel == "telegram" and v.fallbacks == ()
    calls = [e for e in pair.telegram.log if e.phone_number == phone and e.method == "checkSendAbility"]
    assert [c.outcome for c in calls][:1] == ["FLOOD_WAIT_1"] and len(calls) == 2
    assert waited >= 0.9, "the retry came after the wait Telegram asked for"


async def test_duplicate_idempotency_key(router: OtpRouter, pair: EmulatorPair) -> None:
    """Two starts with one key create one verification and one message."""
    phone = "+34612340005"
    a = await router.start(phone, idempotency_key="signup-7")
    b = await router.start(phone, idempotency_key="signup-7")
    assert a.id == b.id
    assert sends(pair, phone) == (1, 0)


async def test_wrong_code_then_right_code(router: OtpRouter, pair: EmulatorPair) -> None:
    """A wrong code leaves attempts; the right one then verifies."""
    phone = "+48512340006"
    v = await router.start(phone)
    code = await read_code(pair, phone)
    assert code is not None
    wrong = await router.check(v.id, f"{(int(code) + 1) % 1_000_000:06d}")
    assert wrong.status is CheckOutcome.INVALID and wrong.attempts_left == 4
    assert (await router.check(v.id, code)).valid


async def test_attempts_exhausted(router: OtpRouter, pair: EmulatorPair) -> None:
    """Five wrong codes lock the verification; the right code is then refused."""
    phone = "+61412340007"
    v = await router.start(phone)
    code = await read_code(pair, phone)
    assert code is not None
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    outcomes = [(await router.check(v.id, wrong)).status for _ in range(5)]
    assert outcomes[-1] is CheckOutcome.TOO_MANY_ATTEMPTS
    assert (await router.check(v.id, code)).status is CheckOutcome.TOO_MANY_ATTEMPTS
    assert (await router.get(v.id)).status is Status.TOO_MANY_ATTEMPTS


async def test_expiry(pair: EmulatorPair, tmp_path: Path) -> None:
    """A code entered after its ttl is expired, and the deadline loop marks it expired by itself."""
    settings = emulated_settings(
        pair, store_url=f"sqlite:///{tmp_path / 'x.db'}", code_secret="s", code_ttl=30, settle_delay=0.5
    )
    clock_offset = [0.0]

    def clock() -> float:
        import time

        return time.time() + clock_offset[0]

    async with OtpRouter.from_settings(
        settings, policy=FAST_POLICY, metrics=Metrics(CollectorRegistry()), clock=clock
    ) as router:
        phone = "+819012340008"
        v = await router.start(phone)
        code = await read_code(pair, phone)
        assert code is not None
        clock_offset[0] = 31
        state = await wait_for(router, v.id, lambda s: s.status is Status.EXPIRED)
        assert state.status is Status.EXPIRED
        assert (await router.check(v.id, code)).status is CheckOutcome.EXPIRED
