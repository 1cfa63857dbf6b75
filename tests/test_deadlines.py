"""Deadlines are independent: one hanging provider call never holds back the others.

Fake channels, an in-memory store and a hand-set clock; the deadline loop runs
for real. A hanging call is an ``asyncio.Event`` the test controls, so every
assertion is about order and state, never about how long something took.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

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
NUMBERS = [f"+1202555{n:04d}" for n in range(100, 111)]  # eleven US numbers
HANGING = NUMBERS[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Telegram:
    """Accepts every send and never delivers; status polls of some refs wait for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hanging: set[str] = set()
        self.blocked = 0  # polls currently waiting
        self.most_blocked = 0

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref=f"req-{arg}", cost=TG)
        if method == "send":
            return SendResult(ref=arg.probe_ref, state=DeliveryState.SENT, cost=TG)
        if method == "status":
            if arg in self.hanging:
                self.blocked += 1
                self.most_blocked = max(self.most_blocked, self.blocked)
                try:
                    await self.release.wait()
                finally:
                    self.blocked -= 1
            return StatusResult(arg, DeliveryState.SENT, cost=TG)
        return True


async def sms(method: str, arg: Any) -> Any:
    if method == "send":
        return SendResult(ref=f"SM-{arg.phone}", state=DeliveryState.PENDING, cost=Decimal("0.0083"))
    if method == "status":
        return StatusResult(arg, DeliveryState.DELIVERED, cost=Decimal("0.0083"), cost_is_final=True)
    return True


Make = Callable[..., Awaitable[tuple[OtpRouter, Telegram, FakeChannel]]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    opened: list[OtpRouter] = []

    async def build(**settings: Any) -> tuple[OtpRouter, Telegram, FakeChannel]:
        telegram = Telegram()
        twilio = FakeChannel(ChannelName.SMS, sms, provider="twilio")
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
        return router, telegram, twilio

    yield build
    for router in opened:
        await router.aclose()


async def state_of(router: OtpRouter, vid: str) -> VerificationState:
    record = await router.store.get(vid)
    assert record is not None
    return VerificationState.model_validate_json(record.data)


async def wait_until(condition: Callable[[], Any], *, within: float = 10.0) -> None:
    """Poll ``condition`` (sync or async) until true; a safety net against hanging, not a timing check."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > until:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


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


async def test_one_hanging_poll_does_not_hold_back_the_other_deadlines(make: Make) -> None:
    """One deadline falls due and its status poll hangs; ten more fall due after it. The ten fall back
    to SMS while that poll is still blocked, and the hanging one falls back once its poll returns."""
    router, telegram, twilio = await make()
    clock = router.clock
    assert isinstance(clock, Clock)
    telegram.hanging = {f"req-{HANGING}"}
    ids = {HANGING: (await router.start(HANGING)).id}
    clock.now += 5
    others = NUMBERS[1:]
    ids.update({phone: (await router.start(phone)).id for phone in others})
    clock.now += 26  # only the first is past deliver_within (30 s)
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: telegram.blocked == 1)
        clock.now += 5  # now the ten are due as well
        await wait_until(lambda: on_sms(router, ids, others))
        # The ten are done while the hanging poll is still blocked, its verification untouched.
        assert telegram.blocked == 1 and not telegram.release.is_set()
        hung = await state_of(router, ids[HANGING])
        assert hung.channel is ChannelName.TELEGRAM and hung.status is Status.PENDING
        assert sorted(arg.phone for m, arg in twilio.calls if m == "send") == sorted(others)
        telegram.release.set()
        await wait_until(lambda: on_sms(router, ids, [HANGING]))
    finally:
        telegram.release.set()
        router._stopping.set()
        router._wakeup.set()
        await loop
    sends = [arg.phone for m, arg in twilio.calls if m == "send"]
    assert sorted(sends) == sorted(NUMBERS), "each number got exactly one SMS"


async def test_a_call_that_never_answers_is_given_up_after_the_call_timeout(make: Make) -> None:
    """A status poll that never returns is abandoned after deadline_call_timeout: its deadline goes on
    (falls back to SMS) without the answer, and fire_due itself returns."""
    router, telegram, twilio = await make(deadline_call_timeout=0.2)
    ids = await start_all(router)
    telegram.hanging = {f"req-{HANGING}"}
    clock = router.clock
    assert isinstance(clock, Clock)
    clock.now += 31
    assert await router.fire_due() == len(NUMBERS)
    assert not telegram.release.is_set()
    assert await on_sms(router, ids, NUMBERS)
    assert telegram.blocked == 0, "the abandoned poll was cancelled, not left running"
    assert sorted(arg.phone for m, arg in twilio.calls if m == "send") == sorted(NUMBERS)


async def test_deadlines_in_flight_are_bounded(make: Make) -> None:
    """With deadline_concurrency=3 and every poll hanging, at most three polls are in flight at once;
    when they are released, every deadline still fires exactly once."""
    router, telegram, twilio = await make(deadline_concurrency=3)
    ids = await start_all(router)
    telegram.hanging = {f"req-{phone}" for phone in NUMBERS}
    clock = router.clock
    assert isinstance(clock, Clock)
    clock.now += 31
    loop = asyncio.create_task(router.run_deadlines(poll_interval=0.05))
    try:
        await wait_until(lambda: telegram.blocked == 3)
        # Give the loop every chance to start more than three: it must not.
        for _ in range(20):
            await asyncio.sleep(0)
        assert telegram.most_blocked == 3
        telegram.release.set()
        await wait_until(lambda: on_sms(router, ids, NUMBERS))
    finally:
        telegram.release.set()
        router._stopping.set()
        router._wakeup.set()
        await loop
    assert telegram.most_blocked == 3
    sends = [arg.phone for m, arg in twilio.calls if m == "send"]
    assert sorted(sends) == sorted(NUMBERS)
