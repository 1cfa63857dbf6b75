"""The learned latency estimate and the priced deadline rule (deliver_within = "auto")."""

from __future__ import annotations

import math
import random
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otp_router.latency import (
    EDGES,
    ERA,
    HALF_LIFE,
    LatencyDistribution,
    LearnedDeadlines,
    choose_deadline,
    estimate_from_weights,
    expected_score,
    observation,
    stale_cells,
)
from otp_router.policy import AutoDeadline, Policy, Step
from otp_router.prices import SmsPrices
from otp_router.providers.base import ChannelName

NOW = 1_800_000_000.0
BOUNDS = AutoDeadline(3.0, 30.0)
RULE: dict[str, Any] = {
    "ttl": 30.0,
    "telegram_price": 0.01,
    "sms_latency": 5.0,
    "wait_cost_per_second": 0.001,
    "min_samples": 50.0,
}


def lognormal_cdf(x: float, median: float, sigma: float) -> float:
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def record(
    latencies: list[float | None], region: str = "GB", *, start: float = NOW, spread: float = 0.0
) -> dict[str, float]:
    """Cells as the router leaves them: one increment per outcome, observed evenly over ``spread`` seconds."""
    cells: Counter[str] = Counter()
    for i, latency in enumerate(latencies):
        cell, weight = observation("telegram", region, latency, start + spread * i / max(1, len(latencies)))
        cells[cell] += weight
    return dict(cells)


def realistic(rng: random.Random, n: int, never: float = 0.1) -> list[float | None]:
    """Most deliveries within seconds (lognormal, median 2 s), 15 % up to minutes later, some never."""
    out: list[float | None] = []
    for _ in range(n):
        u = rng.random()
        if u < never:
            out.append(None)
        elif u < never + 0.15:
            out.append(rng.uniform(10, 300))
        else:
            out.append(rng.lognormvariate(math.log(2.0), 0.8))
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), median=st.floats(0.5, 20), sigma=st.floats(0.3, 1.5))
def test_estimate_converges_on_a_known_distribution(seed: int, median: float, sigma: float) -> None:
    """20,000 lognormal latencies, 10 % never delivered: the estimated CDF is within 0.02 of the true one."""
    rng = random.Random(seed)
    latencies: list[float | None] = [
        None if rng.random() < 0.1 else rng.lognormvariate(math.log(median), sigma) for _ in range(20_000)
    ]
    dist = estimate_from_weights(record(latencies, spread=600), NOW + 600)[("telegram", "GB")]
    # Spread over ten minutes, the observations have decayed by at most 2 %.
    assert 0.98 * 20_000 <= dist.count <= 20_000
    for x in (0.5, 1, 2, 5, 10, 30, 120):
        assert dist.cdf(x) == pytest.approx(0.9 * lognormal_cdf(x, median, sigma), abs=0.02), x
    assert dist.never / dist.count == pytest.approx(0.1, abs=0.015)
    mean = dist.delivered_mean()
    assert mean == pytest.approx(median * math.exp(sigma**2 / 2), rel=0.1)


@given(age=st.floats(0, 20 * HALF_LIFE), offset=st.floats(0, 3 * ERA))
def test_an_observation_halves_every_half_life(age: float, offset: float) -> None:
    """Whatever era it fell in, an observation ``age`` seconds old weighs 2 ** (-age / HALF_LIFE)."""
    at = NOW + offset
    cell, weight = observation("telegram", "GB", 3.0, at)
    dist = estimate_from_weights({cell: weight}, at + age)[("telegram", "GB")]
    assert dist.count == pytest.approx(2 ** (-age / HALF_LIFE), rel=1e-9)


@given(
    a=st.lists(st.one_of(st.none(), st.floats(0, 5000)), max_size=30),
    b=st.lists(st.one_of(st.none(), st.floats(0, 5000)), max_size=30),
)
def test_estimates_merge_by_adding_cells(a: list[float | None], b: list[float | None]) -> None:
    """Two processes adding to one store give the estimate of all their observations together."""
    both = Counter(record(a))
    both.update(record(b))
    merged = estimate_from_weights(dict(both), NOW).get(("telegram", "GB"), LatencyDistribution())
    expected = LatencyDistribution.from_latencies(a + b)
    assert merged.never == pytest.approx(expected.never)
    assert merged.weights == pytest.approx(expected.weights)


def test_unparseable_cells_are_ignored() -> None:
    """Cells from another version (wrong shape, bad era or bucket) do not break the estimate."""
    good, weight = observation("telegram", "GB", 2.0, NOW)
    cells = {good: weight, "x": 1.0, "telegram|GB|era|3": 1.0, f"telegram|GB|0|{len(EDGES) + 5}": 1.0}
    assert set(estimate_from_weights(cells, NOW)) == {("telegram", "GB")}
    assert estimate_from_weights(cells, NOW)[("telegram", "GB")].count == pytest.approx(1.0)


def test_expensive_sms_waits_longer_than_cheap_sms() -> None:
    """Same latencies, different SMS prices: the expensive-SMS country gets the longer deadline."""
    dist = LatencyDistribution.from_latencies(realistic(random.Random(7), 5000))
    cheap = choose_deadline(dist, bounds=BOUNDS, sms_price=0.0083, **RULE)
    dear = choose_deadline(dist, bounds=BOUNDS, sms_price=0.30, **RULE)
    assert 3.0 <= cheap < dear <= 30.0
    # Each is the least score over a fine grid of the bounds, for its own price.
    for price, chosen in ((0.0083, cheap), (0.30, dear)):

        def score(d: float, price: float = price) -> float:
            cost, time = expected_score(
                dist, d, ttl=30.0, telegram_price=0.01, sms_price=price, sms_latency=5.0
            )
            return cost + 0.001 * time

        assert all(score(chosen) <= score(3 + i / 10) + 1e-9 for i in range(271))


def test_expected_score_counts_paid_twice_and_the_first_code() -> None:
    """Half delivered at 1 s, a quarter at 20 s, a quarter never: the formula's cost and time, by hand."""
    dist = LatencyDistribution.from_latencies([1.0, 1.0, 20.0, None])
    within = {d: dist.cdf(d) for d in (1.0, 10.0, 20.0, 30.0)}
    assert within[1.0] == pytest.approx(0.5, abs=0.01) and within[30.0] == pytest.approx(0.75)
    cost, time = expected_score(dist, 10.0, ttl=30.0, telegram_price=0.01, sms_price=0.2, sms_latency=5.0)
    # Telegram charges the three delivered within the ttl; SMS goes to the half not served by 10 s.
    assert cost == pytest.approx(0.75 * 0.01 + 0.5 * 0.2)
    # Codes at ~1 s (half) and at the SMS's 15 s (the other half: Telegram's 20 s comes later).
    assert time == pytest.approx(0.5 * dist.partial_mean(1.0) / 0.5 + 0.5 * 15.0, abs=0.01)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 1000), low=st.floats(0.5, 60), high=st.floats(0.5, 60), price=st.floats(0, 1))
def test_a_dearer_sms_never_shortens_the_deadline(seed: int, low: float, high: float, price: float) -> None:
    """Whatever the latencies and bounds, raising the SMS price never moves the deadline earlier."""
    bounds = AutoDeadline(min(low, high), max(low, high))
    dist = LatencyDistribution.from_latencies(realistic(random.Random(seed), 300))
    rule = RULE | {"ttl": 60.0}
    first = choose_deadline(dist, bounds=bounds, sms_price=price, **rule)
    second = choose_deadline(dist, bounds=bounds, sms_price=price * 1.5 + 0.01, **rule)
    assert bounds.minimum <= first <= second <= bounds.maximum


deadline_bounds = st.tuples(st.floats(1, 60), st.floats(0, 60)).map(lambda t: AutoDeadline(t[0], t[0] + t[1]))


@given(bounds=deadline_bounds, price=st.floats(0, 1), ttl=st.integers(30, 3600))
def test_cold_start_uses_the_default_within_bounds(bounds: AutoDeadline, price: float, ttl: int) -> None:
    """No data: the configured default (the maximum unless given), clamped into [min, max] and the ttl."""
    rule = RULE | {"ttl": float(ttl)}
    for dist in (None, LatencyDistribution()):
        d = choose_deadline(dist, bounds=bounds, sms_price=price, **rule)
        assert d == min(bounds.maximum, ttl)
        assert choose_deadline(dist, bounds=bounds, sms_price=price, default=0.0, **rule) == min(
            bounds.minimum, ttl
        )


def test_thin_data_leans_toward_the_default() -> None:
    """With fewer observations than min_samples the deadline sits between the learned one and the default."""
    latencies = realistic(random.Random(5), 1000)
    full = choose_deadline(
        LatencyDistribution.from_latencies(latencies), bounds=BOUNDS, sms_price=0.01, **RULE
    )
    thin = choose_deadline(
        LatencyDistribution.from_latencies(latencies[:10]), bounds=BOUNDS, sms_price=0.01, **RULE
    )
    assert full < 20.0
    # 10 of 50 samples: four fifths of the way back to the 30 s default.
    assert 30.0 - (30.0 - 3.0) / 5 - 1e-9 <= thin < 30.0


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 1000),
    bounds=deadline_bounds,
    price=st.floats(0, 1),
    never=st.floats(0, 0.9),
    age=st.floats(0, 40 * HALF_LIFE),
)
def test_deadline_stays_within_bounds_and_widens_as_data_decays(
    seed: int, bounds: AutoDeadline, price: float, never: float, age: float
) -> None:
    """Learned or decayed, the deadline is within [min, max]; decay moves it only toward the default."""
    rule = RULE | {"ttl": max(30.0, bounds.maximum)}
    cells = record(realistic(random.Random(seed), 400, never), spread=3600)
    fresh = estimate_from_weights(cells, NOW + 3600)[("telegram", "GB")]
    old = estimate_from_weights(cells, NOW + 3600 + age).get(("telegram", "GB"))
    d_fresh = choose_deadline(fresh, bounds=bounds, sms_price=price, **rule)
    d_old = choose_deadline(old, bounds=bounds, sms_price=price, **rule)
    assert bounds.minimum <= d_fresh <= d_old <= bounds.maximum
    if age > 20 * HALF_LIFE:
        assert d_old == pytest.approx(bounds.maximum, abs=1e-3)


def test_the_deadline_never_exceeds_the_ttl() -> None:
    """Bounds above the ttl are cut to it: Telegram has given up (and refunded) by then."""
    dist = LatencyDistribution.from_latencies(realistic(random.Random(1), 500))
    d = choose_deadline(dist, bounds=AutoDeadline(40.0, 90.0), sms_price=1.0, **(RULE | {"ttl": 30.0}))
    assert d == 30.0


def test_stale_eras_are_pruned() -> None:
    """Cells two eras old are reported stale; the current and previous eras are kept."""
    old, _ = observation("telegram", "GB", 1.0, NOW - 2 * ERA)
    previous, _ = observation("telegram", "GB", 1.0, NOW - ERA)
    current, _ = observation("telegram", "GB", 1.0, NOW)
    assert stale_cells([old, previous, current, "junk"], NOW) == [old]


def test_learned_deadlines_resolve_auto_steps() -> None:
    """resolve() makes an auto step a fixed one at the learned deadline (ttl kept); fixed steps pass."""
    auto = Step(ChannelName.TELEGRAM, 30.0, probe=True, auto=BOUNDS)
    policy = Policy(steps=(auto, Step(ChannelName.SMS, 120.0)))
    learned = LearnedDeadlines()
    cells = record(realistic(random.Random(3), 3000), "US")
    cells.update(record(realistic(random.Random(3), 3000), "BR"))
    learned.update(cells, NOW)
    prices = SmsPrices(sms_by_region={"US": Decimal("0.0083"), "BR": Decimal("0.30")})
    us = learned.resolve(policy.steps, "US", policy, prices)
    br = learned.resolve(policy.steps, "BR", policy, prices)
    cold = learned.resolve(policy.steps, "DE", policy, prices)
    assert us[0].auto is None and us[0].ttl == 30 and us[0].probe and us[1] == policy.steps[1]
    assert 3.0 <= us[0].deliver_within < br[0].deliver_within <= 30.0
    assert cold[0].deliver_within == 30.0, "no data: the default, the bound toward the ttl"
    fixed = (Step(ChannelName.TELEGRAM, 12.0, probe=True),)
    assert learned.resolve(fixed, "US", policy, prices) is fixed
    # A refresh with no data forgets what was learned.
    learned.update({}, NOW)
    assert learned.resolve(policy.steps, "US", policy, prices)[0].deliver_within == 30.0


def test_learned_sms_latency_moves_the_deadline() -> None:
    """A learned SMS latency replaces the policy's assumption: slower SMS, longer wait."""
    policy = Policy(steps=(Step(ChannelName.TELEGRAM, 30.0, auto=BOUNDS),), sms_latency=1.0)
    prices = SmsPrices(sms_by_region={"GB": Decimal("0.02")})
    rng = random.Random(9)
    cells = record(
        [None if rng.random() < 0.1 else rng.lognormvariate(math.log(4), 1.0) for _ in range(3000)]
    )
    learned = LearnedDeadlines()
    learned.update(cells, NOW)
    assumed = learned.resolve(policy.steps, "GB", policy, prices)[0].deliver_within
    for i in range(200):
        cell, weight = observation("sms", "GB", 25.0, NOW - i)
        cells[cell] = cells.get(cell, 0.0) + weight
    learned.update(cells, NOW)
    slow_sms = learned.resolve(policy.steps, "GB", policy, prices)[0].deliver_within
    assert assumed < slow_sms
