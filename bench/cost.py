"""Cost against time to code: fixed Telegram deadlines and ``auto`` against an all-knowing oracle.

Run ``python bench/cost.py`` (about half an hour on 2 cores). It writes
``bench/results/cost.md``, ``.json`` and ``cost.png`` (the frontier).

Each run replays a seeded population (:mod:`otp_router.population`) through
the real router (``otp_router.demo.run_demo``: SQLite store, webhook server,
the Telegram Gateway and Twilio emulators in process), with emulated provider
time running faster than the wall clock. The workflow is Telegram (probe,
then send with a 30 s ttl) then SMS; what changes between policies is the
Telegram step's deadline: fixed 5, 10, 15 or 30 s, or ``auto`` when the
policy supports it. Every policy of one population shape and seed meets the
same users. The router's cost is read from its ledger (charges minus
Telegram refunds); time to code and paid-twice users from its stored
verifications (:mod:`otp_router.accounting`).

Beside each run, over the same users:

* **oracle**: knows each user's future. It pays Telegram for a user whose
  Telegram message would be delivered within the ttl (time to code = that
  latency) and the country's SMS price for every other valid number (time to
  code = the SMS latency, when the SMS is delivered). No router can pay less.
* **SMS-only**: one SMS per started verification at the country's price.

The report also works the arithmetic from the drawn users alone (no router):
for each deadline, the share of users whose Telegram latency falls between
the deadline and the ttl (they pay twice) and the p95 time to code a router
with no overhead would reach. Where no deadline meets every target, that
table shows why.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from _results import DEFAULT_OUT, machine, median, publish, ratio, today

from otp_router.demo import DemoSummary, run_demo
from otp_router.latency import LearnedDeadlines, observation
from otp_router.metrics import NullMetrics
from otp_router.policy import CountryRule, Policy, Step
from otp_router.population import SHAPES, Population, Shape, User, make_population
from otp_router.prices import SmsPrices
from otp_router.providers.base import ChannelName

NAME = "cost"
#: The Telegram ttl every policy sends (seconds): Telegram refunds a message not delivered within it.
TTL = 30.0
#: Fixed Telegram step deadlines compared (seconds).
FIXED = (5.0, 10.0, 15.0, 30.0)
#: The issue's targets (median over seeds).
TARGET_COST = 1.02
TARGET_P95 = 15.0
TARGET_PAID_TWICE = 0.02


@dataclass(frozen=True, slots=True)
class Candidate:
    """A routing policy under test.

    Attributes:
        name: Label in the report.
        policy: The policy, in provider seconds.
        deadline: The fixed Telegram deadline; None for ``auto``.
    """

    name: str
    policy: Policy
    deadline: float | None


def fixed(deadline: float) -> Candidate:
    """Telegram with a fixed deadline (ttl 30 s), then SMS with 120 s."""
    steps = (Step(ChannelName.TELEGRAM, deadline, probe=True, ttl=int(TTL)), Step(ChannelName.SMS, 120.0))
    return Candidate(f"{deadline:g} s", Policy(steps=steps), deadline)


def auto_policy(wait_cost_per_second: float | None = None) -> Policy:
    """The learned-deadline policy: the built-in default when it is ``auto``, else its ``auto`` twin.

    Either way every ``auto`` parameter (bounds, ``wait_cost_per_second``,
    ``auto_min_samples``, ``sms_latency``) is the router's own default unless
    ``wait_cost_per_second`` is given (the arithmetic's sweep).
    """
    default = Policy()
    if any(step.auto is not None for step in default.steps if step.channel is ChannelName.TELEGRAM):
        policy = default
    else:
        policy = Policy.from_dict(
            {
                "steps": [
                    {"channel": "telegram", "deliver_within": "auto", "ttl": int(TTL)},
                    {"channel": "sms", "deliver_within": 120},
                ]
            }
        )
    if wait_cost_per_second is not None:
        policy = dataclasses.replace(policy, wait_cost_per_second=wait_cost_per_second)
    return policy


def candidates() -> list[Candidate]:
    """The fixed deadlines and ``auto``."""
    return [*(fixed(d) for d in FIXED), Candidate("auto", auto_policy(), None)]


#: Size and seed offset of the population whose deliveries ``auto`` learns from.
TRAIN_USERS = 5000
TRAIN_SEED_OFFSET = 1000


def learned_deadlines(policy: Policy, shape: Shape, seed: int) -> dict[str, float]:
    """What the router's :class:`~otp_router.latency.LearnedDeadlines` resolves per country
    after it has seen the deliveries of a large population of the same shape (another seed).

    The observations are the ones the router records in production: for each
    Telegram message sent (every reachable number; a 502 on the ability check
    sends none), its latency when delivered within the ttl, else "never"
    (refunded); for each SMS, its latency, or "never" when undelivered. All
    at one instant (no decay): the steady state after the warm-up, not the
    cold start.
    """
    population = make_population(TRAIN_USERS, seed + TRAIN_SEED_OFFSET, shape)
    now = time.time()
    cells: dict[str, float] = {}

    def add(channel: ChannelName, region: str, latency: float | None) -> None:
        cell, weight = observation(channel.value, region, latency, now)
        cells[cell] = cells.get(cell, 0.0) + weight

    for user in population.users:
        if not user.valid:
            continue
        if user.kind not in ("absent", "unavailable", "telegram_5xx"):
            within = user.telegram_latency if user.telegram_within(TTL) else None
            add(ChannelName.TELEGRAM, user.region, within)
        add(ChannelName.SMS, user.region, user.sms_latency if user.sms_delivered else None)
    learned = LearnedDeadlines()
    learned.update(cells, now)
    prices = SmsPrices.load()
    out: dict[str, float] = {}
    for region in sorted(shape.countries):
        steps = learned.resolve(policy.steps_for(region), region, policy, prices)
        out[region] = next(s.deliver_within for s in steps if s.channel is ChannelName.TELEGRAM)
    return out


def with_deadlines(policy: Policy, deadlines: Mapping[str, float]) -> Policy:
    """``policy`` with its Telegram step fixed per country at ``deadlines`` (what ``resolve`` returns)."""
    (telegram,) = (s for s in policy.steps if s.channel is ChannelName.TELEGRAM)
    concrete = dataclasses.replace(telegram, auto=None)
    countries = {
        region: CountryRule(steps={ChannelName.TELEGRAM: dataclasses.replace(concrete, deliver_within=d)})
        for region, d in deadlines.items()
    }
    steps = tuple(concrete if s is telegram else s for s in policy.steps)
    return dataclasses.replace(policy, steps=steps, countries=countries)


# --- the oracle and the arithmetic ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Oracle:
    """What the all-knowing router pays and how fast its users get their code."""

    total: Decimal
    started: int
    on_telegram: int
    time_to_code: tuple[float, ...]


def quantile(values: Sequence[float], q: float) -> float | None:
    """Inclusive quantile ``q`` of ``values`` (the demo summary's method)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def oracle_cost(population: Population, prices: SmsPrices) -> Oracle:
    """Price every valid user on the channel that will deliver, with its latency as time to code."""
    total, started, on_telegram, ttc = Decimal(0), 0, 0, []
    for user in population.users:
        if not user.valid:
            continue  # refused before any provider call: free for everyone
        started += 1
        if user.telegram_within(TTL):
            assert user.telegram_latency is not None
            total += prices.telegram
            on_telegram += 1
            ttc.append(user.telegram_latency)
        else:
            total += prices.sms(user.region)
            if user.sms_delivered:
                ttc.append(user.sms_latency)
    return Oracle(total, started, on_telegram, tuple(ttc))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One user under a fixed deadline, with no router overhead: when the code arrives, what it costs."""

    time_to_code: float | None
    paid_twice: bool
    extra: Decimal  # paid on top of the oracle: the SMS of a user who paid twice


def outcome(user: User, deadline: float, prices: SmsPrices) -> Outcome:
    """What a Telegram deadline of ``deadline`` (ttl :data:`TTL`) does to ``user``.

    A reachable user whose Telegram latency is within the deadline gets the
    code then and costs what the oracle pays. Otherwise the SMS goes out at
    the deadline (at once for a number Telegram cannot reach); if Telegram
    still delivers within the ttl, its charge is kept: the user paid twice,
    and the SMS is the extra over the oracle. The code arrives with whichever
    message is first.
    """
    reachable = user.kind not in ("absent", "unavailable")
    latency = user.telegram_latency if reachable else None
    if latency is not None and latency <= deadline:
        return Outcome(latency, False, Decimal(0))
    sms_at = (deadline if reachable else 0.0) + user.sms_latency
    sms = sms_at if user.sms_delivered else None
    if latency is not None and latency <= TTL:
        return Outcome(latency if sms is None else min(latency, sms), True, prices.sms(user.region))
    return Outcome(sms, False, Decimal(0))


def arithmetic(
    population: Population, prices: SmsPrices, deadline: float | Mapping[str, float]
) -> dict[str, Any]:
    """Cost ÷ oracle, paid-twice share and p95 of a deadline (one for all, or per country)."""
    oracle = oracle_cost(population, prices)
    extra, twice, ttc = Decimal(0), 0, []
    for user in population.users:
        if not user.valid:
            continue
        d = deadline if isinstance(deadline, float | int) else deadline[user.region]
        result = outcome(user, float(d), prices)
        extra += result.extra
        twice += result.paid_twice
        if result.time_to_code is not None:
            ttc.append(result.time_to_code)
    ttc.sort()
    return {
        "paid_twice_share": twice / oracle.started if oracle.started else None,
        "cost_over_oracle": ratio(float(oracle.total + extra), float(oracle.total)),
        "time_to_code_p95_s": quantile(ttc, 0.95),
        "slower_than_target_share": sum(t > TARGET_P95 for t in ttc) / len(ttc) if ttc else None,
    }


#: Prices of a second of waiting (USD) the arithmetic runs ``auto``'s rule with, besides the default.
AUTO_SWEEP = (0.0003, 0.001, 0.003, 0.01, 0.03)
#: Deadlines the arithmetic tries (seconds).
GRID = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)


#: Per-country deadlines the exact search tries: every half second up to the ttl.
FINE_GRID = tuple(0.5 * i for i in range(1, int(2 * TTL) + 1))


def best_per_country(population: Population, prices: SmsPrices) -> dict[str, Any]:
    """The fewest users slower than the p95 target that any per-country deadline can reach
    while the cost stays within ``TARGET_COST`` times the oracle's.

    Exact on the drawn users, up to two relaxations that can only make the
    answer smaller (so it is a lower bound for every per-country deadline
    policy on :data:`FINE_GRID`): each country's extra cost is rounded *down*
    to the cent, and the paid-twice target is not imposed (the share the
    answer reaches is reported beside it). A dynamic programme over the
    countries: for every whole number of cents spent so far, the fewest slow
    users. p95 ≤ target needs at most 5 % of users slower than the target, so
    a result above 5 % proves that no per-country deadline meets both the
    cost and the p95 target.

    Also reports the share of users that no policy at all can serve within
    the target: their Telegram message (if any) arrives after it, or never
    within the ttl, and their SMS, even sent at once, arrives after it too.
    """
    oracle = oracle_cost(population, prices)
    by_region: dict[str, list[User]] = {}
    for user in population.users:
        if user.valid:
            by_region.setdefault(user.region, []).append(user)
    budget = math.floor((TARGET_COST - 1) * float(oracle.total) * 100 + 1e-9)
    # best[c]: (slow users, users paying twice, deadlines) with c cents of extra cost.
    best: list[tuple[int, int, dict[str, float]] | None] = [None] * (budget + 1)
    best[0] = (0, 0, {})
    for region, users in sorted(by_region.items()):
        options = []
        for d in FINE_GRID:
            outcomes = [outcome(u, d, prices) for u in users]
            slow = sum(1 for o in outcomes if o.time_to_code is not None and o.time_to_code > TARGET_P95)
            cents = math.floor(sum((o.extra for o in outcomes), Decimal(0)) * 100)
            options.append((d, slow, sum(o.paid_twice for o in outcomes), int(cents)))
        step: list[tuple[int, int, dict[str, float]] | None] = [None] * (budget + 1)
        for spent, held in enumerate(best):
            if held is None:
                continue
            for d, slow, twice, cents in options:
                total = spent + cents
                if total > budget:
                    continue
                candidate = (held[0] + slow, held[1] + twice, {**held[2], region: d})
                current = step[total]
                if current is None or candidate[:2] < current[:2]:
                    step[total] = candidate
        best = step
    found = min((b for b in best if b is not None), key=lambda b: b[:2])
    # Who gets a code does not depend on the deadline (a Telegram message delivered within
    # the ttl arrives either way; everyone else depends on the SMS), so the p95's population
    # is the oracle's: shares below are of the users who get a code.
    coded = max(len(oracle.time_to_code), 1)
    hopeless = sum(1 for u in by_region.values() for x in u if _hopeless(x))
    return {
        "deadlines": dict(sorted(found[2].items())),
        "slower_than_target_lower_bound": found[0] / coded,
        "slower_than_target_any_policy": hopeless / coded,
        "cost_slack": len(by_region) * 0.01 / float(oracle.total) if oracle.total else 0.0,
        **arithmetic(population, prices, found[2]),
    }


def _hopeless(user: User) -> bool:
    """No policy gets this user a code within the target (see :func:`best_per_country`)."""
    telegram = user.telegram_latency if user.telegram_within(TTL) else None
    fastest = [t for t in (telegram, user.sms_latency if user.sms_delivered else None) if t is not None]
    return bool(fastest) and min(fastest) > TARGET_P95


# --- runs ---------------------------------------------------------------------------


def measure(
    shape: Shape, seed: int, who: Candidate, summary: DemoSummary, oracle: Oracle, time_scale: float
) -> dict[str, Any]:
    """One run's numbers, JSON-ready (money as floats in USD, exact totals as strings)."""
    p50, p95 = summary.percentile(0.5), summary.percentile(0.95)
    return {
        "shape": shape.name,
        "seed": seed,
        "policy": who.name,
        "deadline_s": who.deadline,
        "users": summary.users,
        "started": summary.started,
        "verified": summary.verified,
        "oracle_started": oracle.started,
        "router_total": str(summary.cost_router),
        "oracle_total": str(oracle.total),
        "sms_only_total": str(summary.cost_sms_only),
        "cost_over_oracle": ratio(float(summary.cost_router), float(oracle.total)),
        "cost_over_sms_only": ratio(float(summary.cost_router), float(summary.cost_sms_only)),
        "paid_twice": summary.paid_twice,
        "paid_twice_share": summary.paid_twice / summary.started if summary.started else None,
        "paid_twice_extra": str(summary.paid_twice_extra),
        "time_to_code_p50_s": None if p50 is None else p50 / time_scale,
        "time_to_code_p95_s": None if p95 is None else p95 / time_scale,
        "delivered": dict(summary.delivered),
        "fallbacks": dict(summary.fallbacks),
        "wall_seconds": round(summary.wall_seconds, 2),
    }


def oracle_row(shape: Shape, seed: int, oracle: Oracle, sms_only: Decimal) -> dict[str, Any]:
    """The oracle as a row of the table."""
    ttc = sorted(oracle.time_to_code)
    return {
        "shape": shape.name,
        "seed": seed,
        "policy": "oracle",
        "deadline_s": None,
        "started": oracle.started,
        "oracle_total": str(oracle.total),
        "cost_over_oracle": 1.0,
        "cost_over_sms_only": ratio(float(oracle.total), float(sms_only)),
        "paid_twice_share": 0.0,
        "telegram_within_ttl_share": oracle.on_telegram / oracle.started if oracle.started else None,
        "time_to_code_p50_s": quantile(ttc, 0.5),
        "time_to_code_p95_s": quantile(ttc, 0.95),
    }


async def run_one(
    shape: Shape, seed: int, who: Candidate, users: int, time_scale: float, arrival_window: float
) -> dict[str, Any]:
    """Replay one seeded population through the router under one policy."""
    prices = SmsPrices.load()
    population = make_population(users, seed, shape)
    policy, deadlines = who.policy, None
    if who.deadline is None:
        # auto: the deadlines the router's own rule learns from this shape's deliveries.
        deadlines = learned_deadlines(who.policy, shape, seed)
        policy = with_deadlines(who.policy, deadlines)
    summary = await run_demo(
        users=users,
        seed=seed,
        time_scale=time_scale,
        metrics=NullMetrics(),
        progress=None,
        shape=shape,
        policy=policy,
        arrival_window=arrival_window,
    )
    row = measure(shape, seed, who, summary, oracle_cost(population, prices), time_scale)
    row["learned_deadlines_s"] = deadlines
    if row["started"] != row["oracle_started"]:
        print(
            f"  warning: {shape.name} seed {seed} {who.name}: router started {row['started']}, "
            f"population has {row['oracle_started']} valid numbers",
            file=sys.stderr,
        )
    return row


async def run(
    shapes: Sequence[Shape],
    seeds: Sequence[int],
    who: Sequence[Candidate],
    users: int,
    time_scale: float,
    arrival_window: float,
    parallel: bool,
) -> list[dict[str, Any]]:
    """Every shape, seed and policy; one at a time unless ``parallel`` (smoke mode: skews timing)."""
    jobs = [(shape, seed, c) for shape in shapes for seed in seeds for c in who]
    if parallel:
        return list(
            await asyncio.gather(
                *(run_one(s, seed, c, users, time_scale, arrival_window) for s, seed, c in jobs)
            )
        )
    rows = []
    for shape, seed, c in jobs:
        row = await run_one(shape, seed, c, users, time_scale, arrival_window)
        print(
            f"  {shape.name:<9} seed {seed} {c.name:>5}: cost/oracle {row['cost_over_oracle']:.3f}, "
            f"paid twice {row['paid_twice_share']:.1%}, p50/p95 {_num(row['time_to_code_p50_s'], '.1f')}"
            f"/{_num(row['time_to_code_p95_s'], '.1f')} s  ({row['wall_seconds']:.0f} s)",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


#: Figures whose median across seeds the report gives.
MEDIAN_KEYS = (
    "cost_over_oracle",
    "cost_over_sms_only",
    "paid_twice_share",
    "time_to_code_p50_s",
    "time_to_code_p95_s",
)


def meets(med: dict[str, Any]) -> bool:
    """All three targets at once."""
    cost, p95, twice = med["cost_over_oracle"], med["time_to_code_p95_s"], med["paid_twice_share"]
    if cost is None or p95 is None or twice is None:
        return False
    return bool(cost <= TARGET_COST and p95 <= TARGET_P95 and twice <= TARGET_PAID_TWICE)


def frontier_cost(points: Sequence[tuple[float, float]], p95: float) -> float | None:
    """Cost ÷ oracle of the fixed-deadline frontier at ``p95`` (linear between its points).

    The frontier is the lower-left hull of the fixed points: for a given p95,
    the lowest cost a fixed deadline (or a mix of two neighbours) reaches.
    None left of the fastest point.
    """
    pts = sorted(points)
    if not pts or p95 < pts[0][0]:
        return None
    best = math.inf
    for i, (x1, y1) in enumerate(pts):
        if x1 <= p95:
            best = min(best, y1)
        for x2, y2 in pts[i + 1 :]:
            if x1 <= p95 <= x2 and x2 > x1:
                best = min(best, y1 + (y2 - y1) * (p95 - x1) / (x2 - x1))
    return best


def summarize(
    rows: Sequence[dict[str, Any]],
    shapes: Sequence[Shape],
    who: Sequence[Candidate],
    seeds: Sequence[int],
    arithmetic_users: int,
) -> dict[str, Any]:
    """Medians across seeds per shape and policy, the arithmetic, and the verdict for ``auto``."""
    out: dict[str, Any] = {}
    prices = SmsPrices.load()
    for shape in shapes:
        policies: dict[str, Any] = {}
        for name in ["oracle", *(c.name for c in who)]:
            mine = [r for r in rows if r["shape"] == shape.name and r["policy"] == name]
            policies[name] = {key: median([r.get(key) for r in mine]) for key in MEDIAN_KEYS}
            policies[name]["meets_targets"] = meets(policies[name])
        fixed_points = [
            (policies[c.name]["time_to_code_p95_s"], policies[c.name]["cost_over_oracle"])
            for c in who
            if c.deadline is not None and policies[c.name]["time_to_code_p95_s"] is not None
        ]
        verdict: dict[str, Any] = {}
        if "auto" in policies and policies["auto"]["time_to_code_p95_s"] is not None:
            auto = policies["auto"]
            line = frontier_cost(fixed_points, auto["time_to_code_p95_s"])
            verdict = {
                "frontier_cost_at_auto_p95": line,
                # On or beyond: no mix of fixed deadlines is cheaper at auto's p95 (1 % noise allowed).
                "on_or_beyond_frontier": line is None or auto["cost_over_oracle"] <= line + 0.01,
                "meets_targets": auto["meets_targets"],
            }
        out[shape.name] = {
            "description": shape.description,
            "seeds": list(seeds),
            "policies": policies,
            "auto": verdict,
            **shape_arithmetic(shape, seeds, arithmetic_users, prices),
        }
    return out


def shape_arithmetic(shape: Shape, seeds: Sequence[int], users: int, prices: SmsPrices) -> dict[str, Any]:
    """The arithmetic of a shape on large draws (``users`` per seed), median over seeds."""
    populations = [make_population(users, seed, shape) for seed in seeds]
    keys = ("paid_twice_share", "cost_over_oracle", "time_to_code_p95_s", "slower_than_target_share")
    rows = []
    for deadline in GRID:
        per_seed = [arithmetic(p, prices, deadline) for p in populations]
        rows.append({"deadline_s": deadline, **{k: median([r[k] for r in per_seed]) for k in keys}})
    sweep = []
    default_w = auto_policy().wait_cost_per_second
    for w in sorted({*AUTO_SWEEP, default_w}):
        policy = auto_policy(w)
        per_seed = [
            arithmetic(p, prices, learned_deadlines(policy, shape, seed))
            for p, seed in zip(populations, seeds, strict=True)
        ]
        sweep.append(
            {
                "wait_cost_per_second": w,
                "default": w == default_w,
                **{k: median([r[k] for r in per_seed]) for k in keys},
            }
        )
    best = [best_per_country(p, prices) for p in populations]
    oracles = [sorted(oracle_cost(p, prices).time_to_code) for p in populations]
    return {
        "arithmetic_users": users,
        "arithmetic": rows,
        "oracle_p95_s": median([quantile(t, 0.95) for t in oracles]),
        "oracle_slower_than_target_share": median(
            [sum(x > TARGET_P95 for x in t) / len(t) if t else None for t in oracles]
        ),
        "auto_sweep": sweep,
        "best_per_country": {
            **{k: median([b[k] for b in best]) for k in keys},
            **{
                k: median([b[k] for b in best])
                for k in ("slower_than_target_lower_bound", "slower_than_target_any_policy", "cost_slack")
            },
            "deadlines_by_seed": [b["deadlines"] for b in best],
        },
    }


# --- report --------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(r: dict[str, Any]) -> str:
    return (
        f"{_num(r['cost_over_oracle'], '.3f')} | {_num(r['cost_over_sms_only'], '.3f')} "
        f"| {_num(r['paid_twice_share'], '.1%')} | {_num(r['time_to_code_p50_s'], '.1f')} "
        f"| {_num(r['time_to_code_p95_s'], '.1f')}"
    )


def reading(data: dict[str, Any]) -> list[str]:
    """Sentences that read this run's medians, with the arithmetic where targets are out of reach."""
    lines = ["", "## Reading", ""]
    for name, info in data["shapes"].items():
        pol = info["policies"]
        winners = [p for p, med in pol.items() if p != "oracle" and med["meets_targets"]]
        lines.append(
            f"- `{name}`: policies meeting all three targets (cost ≤ {TARGET_COST} × oracle, p95 ≤ "
            f"{TARGET_P95:g} s, paid twice ≤ {TARGET_PAID_TWICE:.0%}): "
            f"{', '.join(f'`{w}`' for w in winners) or 'none'}."
        )
        if info["auto"]:
            v = info["auto"]
            where = "on or beyond" if v["on_or_beyond_frontier"] else "behind"
            line = _num(v["frontier_cost_at_auto_p95"], ".3f")
            med = pol["auto"]
            checks = [
                ("cost", med["cost_over_oracle"], TARGET_COST, ".3f", " × oracle"),
                ("paid twice", med["paid_twice_share"], TARGET_PAID_TWICE, ".1%", ""),
                ("p95", med["time_to_code_p95_s"], TARGET_P95, ".1f", " s"),
            ]
            verdicts = ", ".join(
                f"{label} {_num(value, spec)}{unit} {'≤' if value is not None and value <= target else '>'} "
                f"{format(target, spec)}{unit}"
                for label, value, target, spec, unit in checks
            )
            lines.append(
                f"  `auto`: {verdicts}; {where} the fixed-deadline frontier (within 0.01: at auto's p95 "
                f"the line between the fixed deadlines' medians costs {line} × oracle)."
            )
        lines += explain(info)
    return lines


def explain(info: dict[str, Any]) -> list[str]:
    """The arithmetic of one shape in sentences: which targets the population allows at all."""
    slow_cap = 1 - 0.95
    out = [
        f"  Arithmetic on {info['arithmetic_users']} drawn users per seed (no router): p95 ≤ "
        f"{TARGET_P95:g} s allows at most {slow_cap:.0%} of users a code slower than {TARGET_P95:g} s. "
        f"The oracle, which pays the least and so waits for every Telegram message delivered within "
        f"the ttl, leaves {_num(info['oracle_slower_than_target_share'], '.1%')} slower "
        f"(p95 {_num(info['oracle_p95_s'], '.1f')} s)."
    ]
    fixed = [m for m in info["arithmetic"] if m["time_to_code_p95_s"] is not None]
    fast = [m for m in fixed if m["time_to_code_p95_s"] <= TARGET_P95]
    if fast:
        m = max(fast, key=lambda m: m["deadline_s"])
        out.append(
            f"  One deadline for all: the longest with p95 ≤ {TARGET_P95:g} s is {m['deadline_s']:g} s "
            f"(p95 {m['time_to_code_p95_s']:.1f} s), and there {m['paid_twice_share']:.1%} of users have "
            f"a Telegram latency between it and the {TTL:g} s ttl: they pay twice, which makes the cost "
            f"{m['cost_over_oracle']:.3f} × oracle. A shorter deadline moves more users into that window."
        )
    else:
        out.append(f"  One deadline for all: none reaches p95 ≤ {TARGET_P95:g} s on these users.")
    best = info["best_per_country"]
    bound, hopeless = best["slower_than_target_lower_bound"], best["slower_than_target_any_policy"]
    out.append(
        f"  No policy at all can get {_num(hopeless, '.1%')} of users a code within {TARGET_P95:g} s: "
        "their Telegram message arrives later or not within the ttl, and an SMS sent at once would "
        "arrive later too."
        + (
            f" That is more than {slow_cap:.0%}: p95 ≤ {TARGET_P95:g} s is out of every policy's reach here."
            if hopeless is not None and hopeless > slow_cap
            else ""
        )
    )
    out.append(
        f"  Per-country deadlines (every {FINE_GRID[0]:g} s up to the ttl, each country its own): while the "
        f"cost stays ≤ {TARGET_COST} × oracle, at least {_num(bound, '.1%')} of users get their code after "
        f"{TARGET_P95:g} s (exact search; a lower bound because it rounds each country's extra cost down "
        "to the cent and does not impose the paid-twice target). The assignment that reaches it pays "
        f"{_num(best['cost_over_oracle'], '.3f')} × oracle with {_num(best['paid_twice_share'], '.1%')} "
        f"paying twice and p95 {_num(best['time_to_code_p95_s'], '.1f')} s."
    )
    if bound is not None and bound > slow_cap:
        out.append(
            f"  So no deadline policy, fixed or per country, meets cost ≤ {TARGET_COST} × oracle and "
            f"p95 ≤ {TARGET_P95:g} s together on this population. Why: a fast code for the users Telegram "
            "does not reach in time needs an early fallback, and every early fallback also sends an SMS "
            "to the users whose Telegram message arrives later but within the ttl: they pay twice."
        )
    elif best["paid_twice_share"] is not None and best["paid_twice_share"] <= TARGET_PAID_TWICE:
        out.append("  So the three targets can be met together on this population.")
    else:
        out.append(
            f"  Cost and p95 can be met together, but that assignment has more than "
            f"{TARGET_PAID_TWICE:.0%} paying twice; whether all three can is not settled by this search."
        )
    return out


def render(data: dict[str, Any]) -> str:
    """The Markdown report the README quotes."""
    cfg, mach = data["config"], data["machine"]
    lines = [
        "# Cost against time to code",
        "",
        f"Measured {data['date']} on {mach['nproc']} CPUs ({mach['cpu'] or 'unknown CPU'}), "
        f"{mach['implementation']} {mach['python']}, {mach['platform']}; "
        f"load average at start {mach['load_average_1min']}.",
        "",
        f"Seeded populations of {cfg['users']} users (seeds {', '.join(map(str, cfg['seeds']))}) from "
        "`otp_router.population`, replayed through the real router (SQLite store, webhook server) against "
        f"the Telegram and Twilio emulators; provider time ×{1 / cfg['time_scale']:.0f}. Workflow: Telegram "
        f"(ttl {TTL:g} s) with the deadline in the policy column, then SMS. Prices: the packaged table "
        "(`otp_router/data/sms-prices.toml`). Cost comes from the router's ledger; the oracle knows each "
        "user's future. Figures are medians over the seeds; every run is in `cost.json`.",
        "",
        "![cost against p95 time to code](cost.png)",
        "",
    ]
    for name, info in data["shapes"].items():
        lines += [
            f"## `{name}`",
            "",
            info["description"] + ".",
            "",
            "| policy | cost ÷ oracle | cost ÷ SMS-only | paid twice | time to code p50 (s) | p95 (s) "
            "| all three targets |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for policy, med in info["policies"].items():
            lines.append(f"| {policy} | {_cells(med)} | {'yes' if med['meets_targets'] else 'no'} |")
        learned = [
            r["learned_deadlines_s"]
            for r in data["runs"]
            if r["shape"] == name and r["policy"] == "auto" and r.get("learned_deadlines_s")
        ]
        if learned:
            lines += [
                "",
                f"`auto` learned these Telegram deadlines (seed {info['seeds'][0]}; from {TRAIN_USERS} users "
                "of another seed): " + ", ".join(f"{r} {d:.1f} s" for r, d in learned[0].items()) + ".",
            ]
        lines += [
            "",
            f"Arithmetic from {info['arithmetic_users']} drawn users per seed alone (no router, no "
            "overhead), median over seeds:",
            "",
            f"| deadline (s) | paid twice (latency in (deadline, {TTL:g} s]) | cost ÷ oracle | p95 (s) "
            f"| slower than {TARGET_P95:g} s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for m in info["arithmetic"]:
            lines.append(
                f"| {m['deadline_s']:g} | {_num(m['paid_twice_share'], '.1%')} "
                f"| {_num(m['cost_over_oracle'], '.3f')} | {_num(m['time_to_code_p95_s'], '.1f')} "
                f"| {_num(m['slower_than_target_share'], '.1%')} |"
            )
        best = info["best_per_country"]
        lines.append(
            f"| per country, fewest slow within cost | {_num(best['paid_twice_share'], '.1%')} "
            f"| {_num(best['cost_over_oracle'], '.3f')} | {_num(best['time_to_code_p95_s'], '.1f')} "
            f"| {_num(best['slower_than_target_share'], '.1%')} |"
        )
        lines.append(
            f"| oracle | 0.0% | 1.000 | {_num(info['oracle_p95_s'], '.1f')} "
            f"| {_num(info['oracle_slower_than_target_share'], '.1%')} |"
        )
        for m in info["auto_sweep"]:
            label = "default" if m["default"] else ""
            lines.append(
                f"| auto, w = {m['wait_cost_per_second']:g} {label} | {_num(m['paid_twice_share'], '.1%')} "
                f"| {_num(m['cost_over_oracle'], '.3f')} | {_num(m['time_to_code_p95_s'], '.1f')} "
                f"| {_num(m['slower_than_target_share'], '.1%')} |"
            )
        first = best["deadlines_by_seed"][0]
        lines += [
            "",
            "`auto, w = …` rows: the router's own rule (`otp_router.latency`, via "
            "`LearnedDeadlines.resolve`) with that `wait_cost_per_second`, after learning from "
            f"{TRAIN_USERS} users of the same shape (another seed), applied to these users.",
            "",
            "Per-country deadlines with the fewest slow users within the cost target (first seed; "
            "`best_per_country` in `bench/cost.py`): "
            + ", ".join(f"{r} {d:g} s" for r, d in first.items())
            + ".",
        ]
        lines.append("")
    lines += reading(data)
    lines += [
        "",
        "Columns:",
        "",
        "- cost ÷ oracle: the ledger's net cost (charges minus Telegram refunds) over the oracle's, for "
        "the same started verifications.",
        "- cost ÷ SMS-only: the same over one SMS per started verification.",
        "- paid twice: share of started verifications with a delivered (so charged) Telegram message "
        "and a charged SMS (`otp_router.accounting.paid_twice`).",
        "- time to code: from `start` to the first delivery report, in provider seconds; the oracle's "
        "is the drawn latency of the channel it picks.",
    ]
    if data["log_warnings"]:
        lines += ["", "Warnings the router logged during the runs (count, message):", ""]
        lines += [f"- {count} × `{message}`" for message, count in data["log_warnings"].items()]
    lines += ["", "Rerun: `python bench/cost.py` (see `bench/README.md`)."]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Draw cost ÷ oracle against p95 time to code, one panel per shape, as a PNG.

    Solid: what the router measured (medians over seeds; grey dots are single
    runs). Dashed: the arithmetic on large draws, for every fixed deadline and
    for ``auto``'s rule at several prices of waiting.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(data["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False)
    for ax, name in zip(axes[0], shapes, strict=True):
        info = data["shapes"][name]
        pol = info["policies"]
        ax.axvspan(0, TARGET_P95, color="0.94", zorder=0)
        ax.axhline(TARGET_COST, color="0.6", linestyle=":", linewidth=1)
        ax.axvline(TARGET_P95, color="0.6", linestyle=":", linewidth=1)
        for r in data["runs"]:
            if r["shape"] == name and r["policy"] != "oracle" and r["time_to_code_p95_s"] is not None:
                ax.plot(r["time_to_code_p95_s"], r["cost_over_oracle"], ".", color="0.75", zorder=1)
        math_fixed = [m for m in info["arithmetic"] if m["time_to_code_p95_s"] is not None]
        ax.plot(
            [m["time_to_code_p95_s"] for m in math_fixed],
            [m["cost_over_oracle"] for m in math_fixed],
            "--",
            color="tab:blue",
            alpha=0.5,
            label="fixed deadline 2-30 s (arithmetic)",
        )
        sweep = [m for m in info["auto_sweep"] if m["time_to_code_p95_s"] is not None]
        ax.plot(
            [m["time_to_code_p95_s"] for m in sweep],
            [m["cost_over_oracle"] for m in sweep],
            "--x",
            color="tab:red",
            alpha=0.5,
            label="auto's rule, several wait prices (arithmetic)",
        )
        fixed_names = [p for p in pol if p.endswith(" s") and pol[p]["time_to_code_p95_s"] is not None]
        xs = [pol[p]["time_to_code_p95_s"] for p in fixed_names]
        ys = [pol[p]["cost_over_oracle"] for p in fixed_names]
        ax.plot(xs, ys, "o-", color="tab:blue", label="fixed deadline (router, median)", zorder=2)
        for p, x, y in zip(fixed_names, xs, ys, strict=True):
            ax.annotate(p, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if "auto" in pol and pol["auto"]["time_to_code_p95_s"] is not None:
            ax.plot(
                pol["auto"]["time_to_code_p95_s"],
                pol["auto"]["cost_over_oracle"],
                "D",
                color="tab:red",
                markersize=8,
                label="auto (router, median)",
                zorder=3,
            )
        best = info["best_per_country"]
        if best["time_to_code_p95_s"] is not None:
            ax.plot(
                best["time_to_code_p95_s"],
                best["cost_over_oracle"],
                "s",
                color="tab:green",
                label="per-country deadlines, fewest slow within the cost target",
                zorder=3,
            )
        oracle = pol["oracle"]
        ax.plot(oracle["time_to_code_p95_s"], 1.0, "k*", markersize=11, label="oracle", zorder=3)
        ax.set_title(
            f"{name} (shaded: p95 ≤ {TARGET_P95:g} s; dotted: cost {TARGET_COST} × oracle)", fontsize=10
        )
        measured = [
            r["cost_over_oracle"] for r in data["runs"] if r["shape"] == name and r["cost_over_oracle"]
        ]
        ax.set_ylim(0.98, max(measured, default=1.0) + 0.05)
        ax.set_xlim(0, None)
        ax.set_xlabel("p95 time to code (provider seconds)")
        ax.set_ylabel("cost ÷ oracle")
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class LogTally(logging.Handler):
    """Counts the router's warnings instead of printing one line per user."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        """Count the message (already free of numbers and secrets by the router's rules)."""
        self.counts[f"{record.levelname} {record.name}: {record.getMessage()}"] += 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=400, help="users per run (default: %(default)s)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="population seeds (default: 1 2 3)"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=list(SHAPES),
        help="population shapes (default: all)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.1,
        help="real seconds per emulated provider second (default: %(default)s)",
    )
    parser.add_argument(
        "--arrival-window",
        type=float,
        default=20.0,
        help="real seconds over which users start (default: %(default)s; faster arrivals queue up "
        "on a busy machine and add that wait to every time to code)",
    )
    parser.add_argument(
        "--arithmetic-users",
        type=int,
        help="users per seed for the arithmetic tables (no router; default: 20000, or the previous "
        "run's with --report-only)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 20 users, one seed, 30 s and 5 s deadlines, runs in parallel (numbers meaningless)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="no router runs: rebuild the report, the arithmetic and the PNG from the runs in a previous "
        "cost.json (for instance after changing the report)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.seeds, args.time_scale, args.arrival_window = 20, [1], 0.02, 0.5
        args.arithmetic_users = args.arithmetic_users or 500
    if args.users < 1 or not 0 < args.time_scale <= 1 or args.arrival_window < 0:
        parser.error("--users must be at least 1, --time-scale in (0, 1] and --arrival-window at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or rebuild its report from a previous run) and write the results."""
    args = parse_args(argv)
    if args.report_only is not None:
        previous = json.loads(args.report_only.read_text(encoding="utf-8"))
        args.arithmetic_users = args.arithmetic_users or previous["config"].get("arithmetic_users", 20000)
        config = {**previous["config"], "arithmetic_users": args.arithmetic_users}
        shapes = [SHAPES[name] for name in config["shapes"]]
        who = [c for c in candidates() if c.name in config["policies"]]
        rows = [r for r in previous["runs"] if r["policy"] != "oracle"]
        facts = {k: previous[k] for k in ("date", "machine", "wall_seconds", "log_warnings")}
    else:
        args.arithmetic_users = args.arithmetic_users or 20000
        shapes = [SHAPES[name] for name in args.shapes]
        who = candidates()
        if args.quick:
            who = [c for c in who if c.deadline in (5.0, 30.0) or c.deadline is None]
        config = {
            "users": args.users,
            "seeds": args.seeds,
            "shapes": args.shapes,
            "policies": [c.name for c in who],
            "ttl_s": TTL,
            "time_scale": args.time_scale,
            "arrival_window": args.arrival_window,
            "arithmetic_users": args.arithmetic_users,
            "quick": args.quick,
        }
        print(f"{NAME}: {config}", file=sys.stderr)
        facts = {"date": today(), "machine": machine()}
        tally = LogTally()
        root = logging.getLogger("otp_router")
        root.addHandler(tally)
        root.propagate = False
        began = time.monotonic()
        try:
            rows = asyncio.run(
                run(
                    shapes, config["seeds"], who, args.users, args.time_scale, args.arrival_window, args.quick
                )
            )
        finally:
            root.removeHandler(tally)
            root.propagate = True
        facts |= {
            "wall_seconds": round(time.monotonic() - began, 1),
            "log_warnings": dict(tally.counts.most_common()),
        }
    prices = SmsPrices.load()
    for shape in shapes:
        for seed in config["seeds"]:
            population = make_population(config["users"], seed, shape)
            sms_only = sum((prices.sms(u.region) for u in population.users if u.valid), Decimal(0))
            rows.append(oracle_row(shape, seed, oracle_cost(population, prices), sms_only))
    data: dict[str, Any] = {
        "benchmark": NAME,
        "date": facts["date"],
        "machine": facts["machine"],
        "config": config,
        "targets": {
            "cost_over_oracle": TARGET_COST,
            "p95_s": TARGET_P95,
            "paid_twice_share": TARGET_PAID_TWICE,
        },
        "shapes": summarize(rows, shapes, who, config["seeds"], args.arithmetic_users),
        "runs": rows,
        "wall_seconds": facts["wall_seconds"],
        "log_warnings": facts["log_warnings"],
    }
    markdown = render(data)
    publish(args.out, NAME, data, markdown)
    plot(data, args.out / f"{NAME}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
