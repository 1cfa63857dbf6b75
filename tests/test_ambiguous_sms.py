"""An ambiguous SMS send resolved by message lookups: the real router against both emulators.

Counts come from the Twilio emulator's own records (create log, messages,
inbox), never from the router's view of itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import RetrySettings, Settings, SmsLookupSettings, TwilioSettings
from otp_router.core import Status, VerificationState
from otp_router.emulators import EmulatorPair, Script
from otp_router.harness import emulated_settings, read_code
from otp_router.metrics import Metrics
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName
from otp_router.router import OtpRouter
from otp_router.store.base import LedgerKind

TIME_SCALE = 0.05
POLICY = Policy(steps=(Step(ChannelName.TELEGRAM, 1.0, probe=True), Step(ChannelName.SMS, 5.0)))
#: Real seconds: lookups 0.1, 0.4 and 1.0 s after the send began; "absent" counts from 0.8 s.
LOOKUP = SmsLookupSettings(delays=(0.1, 0.4, 1.0), grace=0.8)


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=TIME_SCALE))


@pytest.fixture
async def router(pair: EmulatorPair, tmp_path: Path) -> AsyncIterator[OtpRouter]:
    settings = emulated_settings(
        pair,
        store_url=f"sqlite:///{tmp_path / 'otp.db'}",
        code_secret="lookup-secret",
        retry=RetrySettings(backoff=False, attempts=3, timeout=10),
        settle_delay=0.3,
        sms_lookup=LOOKUP,
    )
    async with OtpRouter.from_settings(settings, policy=POLICY, metrics=Metrics(CollectorRegistry())) as r:
        yield r


async def state_of(router: OtpRouter, vid: str) -> VerificationState:
    record = await router.store.get(vid)
    assert record is not None
    return VerificationState.model_validate_json(record.data)


async def until(
    router: OtpRouter, vid: str, predicate: Callable[[VerificationState], bool]
) -> VerificationState:
    for _ in range(200):
        state = await state_of(router, vid)
        if predicate(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached: {await state_of(router, vid)!r}")


def creates(pair: EmulatorPair, phone: str) -> list[str]:
    """Outcome of every create request the emulator received for ``phone``."""
    return [entry.outcome for entry in pair.twilio.log if entry.to == phone]


async def test_lost_answer_recovers_the_ref_and_books_the_charge(
    router: OtpRouter, pair: EmulatorPair
) -> None:
    """Created then 503: the lookup finds the message, no second SMS, and Twilio's price is booked."""
    phone = "+4915123450101"
    pair.script.set(phone, telegram="absent", sms_5xx_after_create=1)
    v = await router.start(phone)
    assert v.channel == "sms" and v.status is Status.PENDING
    state = await until(router, v.id, lambda s: s.current is not None and s.current.ref is not None)
    assert state.current is not None and [state.current.ref] == pair.twilio.messages_to(phone)
    code = await read_code(pair, phone)
    assert code is not None and (await router.check(v.id, code)).valid
    message = pair.twilio.messages[pair.twilio.messages_to(phone)[0]]
    assert message.price is not None
    price = abs(Decimal(message.price))
    await until(router, v.id, lambda s: s.attempts[-1].cost_final)
    ledger = [e for e in await router.store.ledger(v.id) if e.channel == "sms"]
    assert sum((e.amount for e in ledger), Decimal(0)) == price
    assert LedgerKind.CHARGE in {e.kind for e in ledger}
    await pair.twilio.settle()
    assert creates(pair, phone) == ["http 503 after create"]
    assert len(pair.twilio.inbox(phone)) == 1


async def test_5xx_without_effect_sends_exactly_one_sms(router: OtpRouter, pair: EmulatorPair) -> None:
    """503 and nothing created: after the grace the SMS is sent again, once; the user gets one code."""
    phone = "+4915123450102"
    pair.script.set(phone, telegram="absent", sms_5xx=1)
    v = await router.start(phone)
    assert v.channel == "sms"
    code = await read_code(pair, phone)
    assert code is not None and (await router.check(v.id, code)).valid
    state = await state_of(router, v.id)
    assert [f.reason.value for f in state.fallbacks] == ["ability_refused", "not_created"]
    await pair.twilio.settle()
    assert creates(pair, phone) == ["http 503", "queued"]
    assert len(pair.twilio.messages_to(phone)) == 1 and len(pair.twilio.inbox(phone)) == 1
    assert {e.verification_id for e in await router.store.ledger(v.id) if e.channel == "sms"} == {v.id}
    assert {e.key.split("/")[1] for e in await router.store.ledger(v.id) if e.channel == "sms"} == {"2"}


async def test_list_lag_within_the_grace_is_not_mistaken_for_loss(
    router: OtpRouter, pair: EmulatorPair
) -> None:
    """The message shows in Twilio's list only after 0.6 s: early empty lists prove nothing, no resend."""
    phone = "+4915123450103"
    pair.script.set(phone, telegram="absent", sms_5xx_after_create=1, sms_list_lag=0.6 / TIME_SCALE)
    v = await router.start(phone)
    state = await until(router, v.id, lambda s: s.current is not None and s.current.ref is not None)
    assert state.current is not None and state.current.lookups == 3
    await pair.twilio.settle()
    assert creates(pair, phone) == ["http 503 after create"]
    assert pair.twilio.list_requests == 3


async def test_lookups_failing_leave_one_sms_and_a_reason(router: OtpRouter, pair: EmulatorPair) -> None:
    """Every lookup 503s: still exactly one SMS, the attempt says send_unknown, the code still verifies."""
    phone = "+4915123450104"
    pair.script.set(phone, telegram="absent", sms_5xx_after_create=1, sms_list_5xx=100)
    v = await router.start(phone)
    state = await until(router, v.id, lambda s: s.current is not None and s.current.reason == "send_unknown")
    assert state.current is not None and state.current.ref is None and state.status is Status.PENDING
    code = await read_code(pair, phone)
    assert code is not None and (await router.check(v.id, code)).valid
    assert creates(pair, phone) == ["http 503 after create"]
    assert pair.twilio.list_requests == 3 * 3  # three lookups, each read tried three times


async def test_timeout_after_create_recovers_the_ref(pair: EmulatorPair, tmp_path: Path) -> None:
    """The answer comes too late (client timeout after the message exists): found, never sent twice."""
    base = Settings.model_construct(twilio=TwilioSettings(timeout=0.3))
    settings = emulated_settings(
        pair,
        base,
        store_url=f"sqlite:///{tmp_path / 'otp.db'}",
        code_secret="lookup-secret",
        retry=RetrySettings(backoff=False, attempts=3, timeout=10),
        sms_lookup=LOOKUP,
    )
    phone = "+4915123450105"
    pair.script.set(phone, telegram="absent", sms_latency_after_create=5.0 / TIME_SCALE)
    async with OtpRouter.from_settings(
        settings, policy=POLICY, metrics=Metrics(CollectorRegistry())
    ) as router:
        v = await router.start(phone)
        state = await until(router, v.id, lambda s: s.current is not None and s.current.ref is not None)
        assert state.current is not None and [state.current.ref] == pair.twilio.messages_to(phone)
        code = await read_code(pair, phone)
        assert code is not None and (await router.check(v.id, code)).valid
    assert creates(pair, phone) == ["queued"]
