"""Deadlines are independent: one hanging provider call never holds back the others.

Fake channels, an in-memory store and a hand-set clock; the deadline loop runs
for real. A hanging call is an ``asyncio.Event`` the test controls, so every
assertion is about order and state, never about how long something took.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_worker import wait_until

from otp_router.config import Settings
from otp_router.core import Status, VerificationState
from otp_router.metrics import Metrics
from otp_router.providers.base import (
    ChannelName,
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendResult,
    StatusResult,
)
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore

TG = Decimal("0.01")
SMS = Decimal("0.0083")
NUMBERS = [f"+1202555{n:04d}" for n in range(100, 111)]  # eleven US numbers
HANGING = NUMBERS[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """Provider calls that wait for ``release``, by ``(method, ref or phone)``; counts the waiting ones."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hanging: set[tuple[str, str]] = set()
        self.blocked = 0  # calls currently waiting
        self.most_blocked = 0

    async def through(self, method: str, key: str) -> bool:
        """Wait for ``release`` if this call is one that hangs; True if it waited."""
        if (method, key) not in self.hanging:
            return False
        self.blocked += 1
        self.most_blocked = max(self.most_blocked, self.blocked)
        try:
            await self.release.wait()
        finally:
            self.blocked -= 1
        return True


class Telegram:
    """Accepts every send and never delivers; status polls go through the gate, and one that had
    to wait answers that the message expired and was refunded."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref=f"req-{arg}", cost=TG)
        if method == "send":
            return SendResult(ref=arg.probe_ref, state=DeliveryState.SENT, cost=TG)
        if method == "status":
            if await self.gate.through("status", arg):
                return StatusResult(arg, DeliveryState.EXPIRED, cost=TG, refunded=True, cost_is_final=True)
            return StatusResult(arg, DeliveryState.SENT, cost=TG)
        return True


class Twilio:
    """Accepts every send (sends go through the gate, by phone) and delivers it."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "send":
            await self.gate.through("send", arg.phone)
            return SendResult(ref=f"SM-{arg.phone}", state=DeliveryState.PENDING, cost=SMS)
        if method == "status":
            return StatusResult(arg, DeliveryState.DELIVERED, cost=SMS, cost_is_final=True)
        return True


Make = Callable[..., Awaitable[tuple[OtpRouter, Gate, FakeChannel]]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    opened: list[OtpRouter] = []

    async def build(**settings: Any) -> tuple[OtpRouter, Gate, FakeChannel]:
        gate = Gate()
        telegram = Telegram(gate)
        twilio = FakeChannel(ChannelName.SMS, Twilio(gate), provider="twilio")
        router = OtpRouter(
            store=MemoryStore(),
            channels={
                ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, telegram, provider="telegram"),
                ChannelName.SMS: twilio,
            },
            settings=Settings(code_secret="deadline-secret", **settings),
            metrics=Metrics(CollectorRegistry()),
            clock=Clock(),
            run_deadlines=False,
        )
        await router.open()
        opened.append(router)
        return router, gate, twilio

    yield build
    for router in opened:
        await router.aclose()


async def state_of(router: OtpRouter, vid: str) -> VerificationState:
    record = await router.store.get(vid)
    assert record is not None
    return VerificationState.model_validate_json(record.data)


async def start_all(router: OtpRouter) -> dict[str, str]:
    """Start one verification per number; all wait on Telegram (deliver_within 30 s)."""
    return {phone: (await router.start(phone)).id for phone in NUMBERS}


async def on_sms(router: OtpRouter, ids: dict[str, str], phones: list[str]) -> bool:
    """Every one of ``phones`` has fallen back and its SMS was accepted (and recorded)."""
    for phone in phones:
        cur = (await state_of(router, ids[phone])).current
        if cur is None or cur.channel is not ChannelName.SMS or cur.sent_at is None:
            return False
    return True


def sms_sends(twilio: FakeChannel) -> list[str]:
    return sorted(arg.phone for method, arg in twilio.calls if method == "send")


def clock_of(router: OtpRouter) -> Clock:
    assert isinstance(router.clock, Clock)
    return router.clock


async def stop_loop(router: OtpRouter, gate: Gate, loop: asyncio.Task[None]) -> None:
    gate.release.set()
    router._stopping.set()
    router._wakeup.set()
    await loop


@pytest.mark.parametrize("hangs", ["status poll", "fallback send"])
async def test_one_hanging_call_does_not_hold_back_ten_due_deadlines(make: Make, hangs: str) -> None:
    """One deadline falls due and the provider call it makes hangs (its status poll, or its SMS
    fallback send); ten more fall due after it. The ten fall back to SMS while that call is still
    blocked, and the hanging one goes on once its call returns: each number gets exactly one SMS."""
    router, gate, twilio = await make()
    clock = clock_of(router)
    gate.hanging = {("status", f"req-{HANGING}")} if hangs == "status poll" else {("send", HANGING)}
    ids = {HANGING: (await router.start(HANGING)).id}
    clock.now += 5
    others = NUMBERS[1:]
    ids.update({phone: (await router.start(phone)).id for phone in others})
    clock.now += 26  # only the first is past deliver_within (30 s)
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: gate.blocked == 1)
        clock.now += 5  # now the ten are due as well
        await wait_until(lambda: on_sms(router, ids, others))
        # The ten are done while the hanging call is still blocked, its verification untouched.
        assert gate.blocked == 1 and not gate.release.is_set()
        hung = await state_of(router, ids[HANGING])
        assert hung.status is Status.PENDING and hung.current is not None
        if hangs == "status poll":
            assert hung.channel is ChannelName.TELEGRAM
            assert sms_sends(twilio) == sorted(others)
        else:
            assert hung.channel is ChannelName.SMS and hung.current.sent_at is None  # still sending
            assert sms_sends(twilio) == sorted(NUMBERS)  # its send began first, and is waiting
        gate.release.set()
        await wait_until(lambda: on_sms(router, ids, [HANGING]))
    finally:
        await stop_loop(router, gate, loop)
    assert sms_sends(twilio) == sorted(NUMBERS), "each number got exactly one SMS"


async def test_a_hanging_settle_poll_does_not_hold_back_ten_due_fallbacks(make: Make) -> None:
    """A settle poll (the final cost of a message left behind by a fallback) hangs; ten other
    verifications fall due meanwhile and fall back to SMS while the poll is still blocked."""
    router, gate, twilio = await make()
    clock = clock_of(router)
    ids = {HANGING: (await router.start(HANGING)).id}
    clock.now += 31
    assert await router.fire_due() == 1  # the first falls back; its Telegram message waits to settle
    first = await state_of(router, ids[HANGING])
    assert first.channel is ChannelName.SMS and first.settle_at is not None
    gate.hanging = {("status", f"req-{HANGING}")}  # from now on: only the settle poll asks for it
    others = NUMBERS[1:]
    ids.update({phone: (await router.start(phone)).id for phone in others})
    clock.now = first.settle_at + 1  # the settle is due, the ten are not yet (30 s)
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: gate.blocked == 1)
        # Now the ten are due as well (and the settle's 30 s claim lease still holds: the fake clock
        # moves while the poll waits on an event, not on the loop's real timer).
        clock.now += 15
        await wait_until(lambda: on_sms(router, ids, others))
        assert gate.blocked == 1 and not gate.release.is_set()
        assert not (await state_of(router, ids[HANGING])).attempts[0].refunded
        gate.release.set()
        await wait_until(lambda: telegram_refunded(router, ids[HANGING]))
    finally:
        await stop_loop(router, gate, loop)
    assert sms_sends(twilio) == sorted(NUMBERS), "each number got exactly one SMS"


async def telegram_refunded(router: OtpRouter, vid: str) -> bool:
    """The settle poll's answer (expired, refunded) is stored on the Telegram attempt."""
    return (await state_of(router, vid)).attempts[0].refunded


async def test_a_call_that_never_answers_is_given_up_after_the_call_timeout(make: Make) -> None:
    """A status poll that never returns is abandoned after deadline_call_timeout: its deadline goes on
    (falls back to SMS) without the answer, and fire_due itself returns."""
    router, gate, twilio = await make(deadline_call_timeout=0.2)
    ids = await start_all(router)
    gate.hanging = {("status", f"req-{HANGING}")}
    clock_of(router).now += 31
    assert await router.fire_due() == len(NUMBERS)
    assert not gate.release.is_set()
    assert await on_sms(router, ids, NUMBERS)
    assert gate.blocked == 0, "the abandoned poll was cancelled, not left running"
    assert sms_sends(twilio) == sorted(NUMBERS)


async def test_deadlines_in_flight_are_bounded(make: Make) -> None:
    """With deadline_concurrency=3 and every poll hanging, at most three polls are in flight at once;
    when they are released, every deadline still fires exactly once."""
    router, gate, twilio = await make(deadline_concurrency=3)
    ids = await start_all(router)
    gate.hanging = {("status", f"req-{phone}") for phone in NUMBERS}
    clock_of(router).now += 31
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: gate.blocked == 3)
        # Give the loop every chance to start more than three: it must not.
        for _ in range(20):
            await asyncio.sleep(0)
        assert gate.most_blocked == 3
        gate.release.set()
        await wait_until(lambda: on_sms(router, ids, NUMBERS))
    finally:
        await stop_loop(router, gate, loop)
    assert gate.most_blocked == 3
    assert sms_sends(twilio) == sorted(NUMBERS)


async def test_with_every_slot_busy_the_loop_asks_the_store_nothing(make: Make) -> None:
    """While all deadline_concurrency handlers hang, wake-ups make no claim or next_deadline call:
    nothing could be started anyway. Once they are released, every deadline still fires once."""
    router, gate, twilio = await make(deadline_concurrency=3)
    ids = await start_all(router)
    gate.hanging = {("status", f"req-{phone}") for phone in NUMBERS}
    clock_of(router).now += 31
    calls: list[str] = []
    store = router.store
    claim_due, next_deadline = store.claim_due, store.next_deadline

    async def counted_claim(*args: Any, **kwargs: Any) -> Any:
        calls.append("claim_due")
        return await claim_due(*args, **kwargs)

    async def counted_next() -> Any:
        calls.append("next_deadline")
        return await next_deadline()

    store.claim_due = counted_claim  # type: ignore[method-assign]
    store.next_deadline = counted_next  # type: ignore[method-assign]
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: gate.blocked == 3)
        for _ in range(5):
            await asyncio.sleep(0)
        before = len(calls)
        for _ in range(10):  # wake the loop: it must look, find no free slot, and wait again
            router._wakeup.set()
            for _ in range(5):
                await asyncio.sleep(0)
        assert len(calls) == before
        gate.release.set()
        await wait_until(lambda: on_sms(router, ids, NUMBERS))
    finally:
        await stop_loop(router, gate, loop)
    assert sms_sends(twilio) == sorted(NUMBERS)
