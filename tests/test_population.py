"""The simulated population follows its shape, reproducibly (no router involved)."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from otp_router.population import SHAPES, Shape, make_population
from otp_router.prices import SmsPrices

SEEDS = (1, 2, 3)


def test_same_seed_same_users_other_seed_or_shape_other_users() -> None:
    a = make_population(300, 5)
    assert a == make_population(300, 5)
    assert a != make_population(300, 6)
    assert a != make_population(300, 5, "emerging")
    phones = [u.phone for u in a.users if u.valid]
    assert len(phones) == len(set(phones))
    # Every kind the dashboards' end-to-end test relies on shows up in a few hundred users.
    assert {u.kind for u in a.users} >= {"telegram", "slow", "never", "absent", "bad_number"}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shares_and_latencies_follow_the_shape(name: str, seed: int) -> None:
    """A large draw's shares and latency quantiles match the shape's parameters, for every seed."""
    shape = SHAPES[name]
    users = [u for u in make_population(6000, seed, shape).users if u.valid]
    reachable = [u for u in users if u.kind not in ("absent", "unavailable")]
    assert len(reachable) / len(users) == pytest.approx(shape.on_telegram, abs=0.03)

    online_users = [u for u in reachable if u.kind in ("telegram", "telegram_5xx", "flood")]
    assert len(online_users) / len(reachable) == pytest.approx(shape.online, abs=0.03)
    errors = [u for u in online_users if u.kind != "telegram"]
    assert len(errors) / len(online_users) == pytest.approx(shape.telegram_errors, abs=0.01)
    # A 502 on the ability check: the router falls back at once, the message is never sent.
    assert all(u.telegram_latency is None for u in errors if u.kind == "telegram_5xx")
    online = sorted(u.telegram_latency for u in online_users if u.telegram_latency is not None)
    # Lognormal body: median at the shape's median, 95th percentile at median * exp(1.645 sigma).
    assert statistics.median(online) == pytest.approx(shape.telegram_median, rel=0.08)
    p95 = online[int(0.95 * len(online))]
    assert p95 == pytest.approx(shape.telegram_median * math.exp(1.645 * shape.telegram_sigma), rel=0.15)

    late = [u.telegram_latency for u in reachable if u.kind == "slow"]
    assert len(late) / len(reachable) == pytest.approx(shape.late, abs=0.02)
    low, high = shape.late_range
    assert all(t is not None and low <= t <= high for t in late)
    # Log-uniform: the share of late users delivered within 30 s is log(30/low) / log(high/low).
    within = sum(1 for t in late if t is not None and t <= 30) / len(late)
    assert within == pytest.approx(math.log(30 / low) / math.log(high / low), abs=0.06)

    never = [u for u in reachable if u.kind == "never"]
    assert all(u.telegram_latency is None for u in never)
    assert len(never) / len(reachable) == pytest.approx(1 - shape.online - shape.late, abs=0.02)
    assert all(u.telegram_latency is None for u in users if u.kind in ("absent", "unavailable"))

    assert sum(not u.sms_delivered for u in users) / len(users) == pytest.approx(shape.sms_failure, abs=0.012)
    fast_sms = sorted(u.sms_latency for u in users if u.sms_latency < shape.sms_slow_range[0])
    assert statistics.median(fast_sms) == pytest.approx(shape.sms_median, rel=0.1)
    # Above the queue's lower bound: every held SMS, and the lognormal's own tail of the others.
    slow = shape.sms_slow_range[0]
    tail = 0.5 * math.erfc(math.log(slow / shape.sms_median) / (shape.sms_sigma * math.sqrt(2)))
    held = sum(1 for u in users if u.sms_latency >= slow) / len(users)
    assert held == pytest.approx(shape.sms_slow + (1 - shape.sms_slow) * tail, abs=0.012)


@pytest.mark.parametrize("name", list(SHAPES))
def test_countries_span_cheap_to_expensive_sms(name: str) -> None:
    """Every shape mixes countries whose SMS costs cents with some above $0.30."""
    prices = SmsPrices.load()
    users = [u for u in make_population(2000, 1, name).users if u.valid]
    regions = {u.region for u in users}
    assert regions == set(SHAPES[name].countries)
    costs = [float(prices.sms(r)) for r in regions]
    assert min(costs) < 0.05
    assert max(costs) > 0.30


def test_emulator_script_plays_the_drawn_future() -> None:
    """The script the emulators get holds each user's drawn latencies, scaled by time_scale."""
    population = make_population(200, 4)
    script = population.script(0.1)
    for user in population.users:
        if not user.valid:
            continue
        entry = user.behaviour
        assert entry["sms_delay"] == user.sms_latency
        if user.telegram_latency is not None:
            assert entry["telegram_delay"] == user.telegram_latency
        assert ("sms_final" in entry) is (not user.sms_delivered)
    assert script.time_scale == 0.1


def test_shape_refuses_impossible_shares() -> None:
    base = SHAPES["mixed"]
    with pytest.raises(ValueError):
        replace(base, online=0.9, late=0.2)
    with pytest.raises(ValueError):
        replace(base, sms_failure=1.5)
    with pytest.raises(ValueError):
        Shape("empty", "no countries", countries={})
