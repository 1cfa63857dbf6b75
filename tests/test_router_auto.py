"""The router with deliver_within = "auto": it learns latencies and falls back at the learned deadline.

Memory store, fake channels and a hand-driven clock, as in ``test_router.py``.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import LimitSettings, Settings
from otp_router.core import FallbackReason, VerificationState
from otp_router.latency import EDGES, LearnedDeadlines, estimate_from_weights, observation
from otp_router.metrics import Metrics
from otp_router.policy import AutoDeadline, Policy, Step
from otp_router.prices import SmsPrices
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

US = "+12025550143"
BR = "+5511987654321"
PRICES = SmsPrices(sms_by_region={"US": Decimal("0.0083"), "BR": Decimal("0.30")}, telegram=Decimal("0.01"))
START = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Telegram:
    """A fake Telegram whose status answer the test sets."""

    def __init__(self) -> None:
        self.status = StatusResult("req-1", DeliveryState.SENT)

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref="req-1", cost=Decimal("0.01"))
        if method == "send":
            return SendResult(ref=arg.probe_ref, state=DeliveryState.SENT, cost=Decimal("0.01"))
        if method == "status":
            return self.status
        return True


async def sms(method: str, arg: Any) -> Any:
    if method == "send":
        return SendResult(
            ref="SM1", state=DeliveryState.PENDING, cost=Decimal("0.0083"), cost_is_estimate=True
        )
    if method == "status":
        return StatusResult(arg, DeliveryState.SENT)
    return ProbeResult(True)


def fast_telegram(n: int, seed: int = 1) -> list[float | None]:
    """Most messages within a few seconds (lognormal, median 1.5 s), 10 % never."""
    rng = random.Random(seed)
    return [None if rng.random() < 0.1 else rng.lognormvariate(math.log(1.5), 0.6) for _ in range(n)]


async def learn(store: MemoryStore, region: str, latencies: list[float | None], at: float = START) -> None:
    """Put observations in the store exactly as routers record them."""
    for latency in latencies:
        await store.add_latency(*observation("telegram", region, latency, at))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def build(clock: Clock, registry: CollectorRegistry) -> Any:
    """Factory: an opened router with the default (auto) policy over a given store."""

    async def make(store: MemoryStore, telegram: Telegram | None = None, **settings: Any) -> OtpRouter:
        channels = {
            ChannelName.TELEGRAM: FakeChannel(
                ChannelName.TELEGRAM, telegram or Telegram(), provider="telegram"
            ),
            ChannelName.SMS: FakeChannel(ChannelName.SMS, sms, provider="twilio"),
        }
        router = OtpRouter(
            store=store,
            channels=channels,
            settings=Settings(
                code_secret="test-secret",
                limits=LimitSettings(per_phone=0, per_prefix=0, per_country=0),
                **settings,
            ),
            policy=Policy(),
            prices=PRICES,
            metrics=Metrics(registry),
            clock=clock,
            run_deadlines=False,
        )
        await router.open()
        return router

    return make


async def state_of(router: OtpRouter, vid: str) -> VerificationState:
    record = await router.store.get(vid)
    assert record is not None
    return VerificationState.model_validate_json(record.data)


def gauge(registry: CollectorRegistry, country: str) -> float | None:
    return registry.get_sample_value(
        "otp_router_learned_deadline_seconds", {"channel": "telegram", "country": country}
    )


def test_the_default_policy_learns_its_telegram_deadline() -> None:
    """Out of the box the Telegram step is auto, between 3 s and its 30 s ttl."""
    tg = Policy().steps[0]
    assert (tg.channel, tg.auto, tg.ttl, tg.deliver_within) == (
        ChannelName.TELEGRAM,
        AutoDeadline(3, 30),
        30,
        30,
    )


async def test_falls_back_at_the_learned_deadline(
    build: Any, clock: Clock, registry: CollectorRegistry
) -> None:
    """With fast Telegram deliveries learned, an undelivered code falls back at the learned deadline."""
    store = MemoryStore()
    await learn(store, "US", fast_telegram(500))
    router = await build(store)
    expected = LearnedDeadlines()
    expected.update(await store.latency_cells(), clock.now)
    deadline = expected.resolve(Policy().steps, "US", Policy(), PRICES)[0].deliver_within
    assert 3.0 <= deadline < 10.0

    v = await router.start(US)
    state = await state_of(router, v.id)
    assert (state.steps[0].deliver_within, state.steps[0].auto, state.steps[0].ttl) == (deadline, None, 30)
    assert gauge(registry, "US") == deadline
    sent_at = state.attempts[0].sent_at
    assert sent_at is not None and state.deadline == pytest.approx(sent_at + deadline)

    clock.now = sent_at + deadline - 0.01
    assert await router.fire_due() == 0
    clock.now = sent_at + deadline
    assert await router.fire_due() == 1
    state = await state_of(router, v.id)
    assert state.channel is ChannelName.SMS
    assert [f.reason for f in state.fallbacks] == [FallbackReason.DEADLINE]
    await router.aclose()


async def test_dear_sms_country_waits_longer_than_cheap(build: Any, registry: CollectorRegistry) -> None:
    """The same Telegram latencies in a $0.30-SMS and a $0.0083-SMS country: the dear one waits longer."""
    store = MemoryStore()
    await learn(store, "US", fast_telegram(2000, seed=4))
    await learn(store, "BR", fast_telegram(2000, seed=4))
    router = await build(store)
    us = await state_of(router, (await router.start(US)).id)
    br = await state_of(router, (await router.start(BR)).id)
    assert us.steps[0].deliver_within < br.steps[0].deliver_within <= 30.0
    assert gauge(registry, "US") == us.steps[0].deliver_within
    assert gauge(registry, "BR") == br.steps[0].deliver_within
    await router.aclose()


async def test_cold_start_waits_the_default(build: Any, registry: CollectorRegistry) -> None:
    """No observations at all: the step keeps its configured default, the 30 s bound toward the ttl."""
    router = await build(MemoryStore())
    state = await state_of(router, (await router.start(US)).id)
    assert state.steps[0].deliver_within == 30.0
    assert gauge(registry, "US") == 30.0
    await router.aclose()


async def test_deliveries_feed_the_shared_estimate(build: Any, clock: Clock) -> None:
    """A delivery report adds its latency (sent to delivered) to the store; another process reads it."""
    store = MemoryStore()
    router = await build(store)
    v = await router.start(US)
    sent_at = (await state_of(router, v.id)).attempts[0].sent_at
    assert sent_at is not None
    clock.now = sent_at + 2.0
    await router.apply_report(v.id, StatusResult("req-1", DeliveryState.DELIVERED))
    # A duplicate report changes nothing and records nothing.
    await router.apply_report(v.id, StatusResult("req-1", DeliveryState.DELIVERED))
    await router.wait_idle()
    cells = await store.latency_cells()
    assert cells == {
        observation("telegram", "US", 2.0, clock.now)[0]: pytest.approx(
            observation("telegram", "US", 2.0, clock.now)[1]
        )
    }
    other = LearnedDeadlines()
    other.update(cells, clock.now)
    dist = other.distribution("telegram", "US")
    assert (
        dist is not None and dist.count == pytest.approx(1.0) and dist.cdf(2.1) == 1.0 and dist.cdf(1.5) < 1
    )
    await router.aclose()


async def test_a_late_poll_dates_the_delivery_by_the_providers_time(build: Any, clock: Clock) -> None:
    """Polled at the 30 s deadline, a delivery Telegram dated 3 s after the send counts ~3.5 s, not 30."""
    telegram = Telegram()
    store = MemoryStore()
    router = await build(store, telegram)
    v = await router.start(US)
    sent_at = (await state_of(router, v.id)).attempts[0].sent_at
    assert sent_at is not None
    telegram.status = StatusResult("req-1", DeliveryState.DELIVERED, updated_at=math.floor(sent_at) + 3)
    clock.now = sent_at + 30.0
    assert await router.fire_due() == 1  # the deadline polls, finds it delivered
    await router.wait_idle()
    state = await state_of(router, v.id)
    delivered_at = state.attempts[0].delivered_at
    assert delivered_at == math.floor(sent_at) + 3.5
    (dist,) = estimate_from_weights(await store.latency_cells(), clock.now).values()
    assert dist.count == pytest.approx(1.0, rel=1e-2)  # observed 26.5 s ago: barely decayed
    assert dist.cdf(delivered_at - sent_at - 0.5) < 1 and dist.cdf(delivered_at - sent_at + 1.0) == 1
    assert state.channel is ChannelName.TELEGRAM
    await router.aclose()


@pytest.mark.parametrize(
    ("state", "recorded"), [(DeliveryState.EXPIRED, True), (DeliveryState.REVOKED, False)]
)
async def test_a_message_that_never_arrives_counts_but_a_revoked_one_does_not(
    build: Any, clock: Clock, state: DeliveryState, recorded: bool
) -> None:
    """Expired (not delivered within the ttl) counts as never delivered; revoked (our doing) counts not."""
    store = MemoryStore()
    router = await build(store)
    v = await router.start(US)
    clock.now += 31
    await router.apply_report(v.id, StatusResult("req-1", state))
    await router.wait_idle()
    estimate = estimate_from_weights(await store.latency_cells(), clock.now)
    if recorded:
        assert estimate[("telegram", "US")].never == pytest.approx(1.0)
        assert sum(estimate[("telegram", "US")].weights) == 0
    else:
        assert estimate == {}
    await router.aclose()


async def test_the_estimate_is_refreshed_in_the_background(build: Any, clock: Clock) -> None:
    """Observations made by another process reach this one's deadlines after latency_refresh seconds."""
    store = MemoryStore()
    router = await build(store, latency_refresh=60)
    await learn(store, "US", fast_telegram(500), at=clock.now)  # written after this router's first read
    first = await state_of(router, (await router.start(US)).id)
    assert first.steps[0].deliver_within == 30.0, "the in-process copy is still the empty one"
    clock.now += 61
    await router.start(US)  # finds its copy stale: refreshes in the background, uses the old copy now
    await router.wait_idle()
    third = await state_of(router, (await router.start(US)).id)
    assert third.steps[0].deliver_within < 10.0
    await router.aclose()


async def test_fixed_policies_never_read_the_estimate(clock: Clock, registry: CollectorRegistry) -> None:
    """A workflow with no auto step makes no latency read, and its steps are used as configured."""

    class Counting(MemoryStore):
        reads = 0

        async def latency_cells(self) -> dict[str, float]:
            Counting.reads += 1
            return await super().latency_cells()

    store = Counting()
    router = OtpRouter(
        store=store,
        channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, Telegram(), provider="telegram")},
        settings=Settings(code_secret="s", limits=LimitSettings(per_phone=0, per_prefix=0, per_country=0)),
        policy=Policy(steps=(Step(ChannelName.TELEGRAM, 12.0, probe=True),)),
        prices=PRICES,
        metrics=Metrics(registry),
        clock=clock,
        run_deadlines=False,
    )
    await router.open()
    state = await state_of(router, (await router.start(US)).id)
    assert state.steps[0].deliver_within == 12.0
    assert Counting.reads == 0 and gauge(registry, "US") is None
    await router.aclose()


def test_bucket_edges_cover_scaled_and_real_latencies() -> None:
    """The buckets resolve a 50 ms scaled-demo latency and an hour-long one alike."""
    assert EDGES[0] < 0.05 and EDGES[-1] > 3600
