"""Cost per verified user: the router against SMS-only and an all-knowing oracle.

Run ``python bench/cost.py`` (about two minutes). It writes
``bench/results/cost.md`` and ``.json``.

Each run replays a seeded population (``otp_router.demo``) through the real
router, a SQLite store and its webhook server against the Telegram Gateway and
Twilio emulators, with emulated provider time running faster than the wall
clock. The router's cost is read from its own ledger (charges minus Telegram
refunds). Beside it, over the same started verifications:

* **SMS-only**: every started verification pays its country's SMS price
  (``SmsPrices.load().sms(region)``), the cost without otp-router.
* **oracle**: knows in advance which channel will deliver. It pays the
  Telegram price for users whose Telegram message is delivered within the ttl
  (population kinds ``telegram`` and ``flood``), the SMS price for everyone
  else who was started, nothing for malformed numbers. No router can beat it.

Two scenarios: the demo's default population (about two thirds of valid
numbers on Telegram and delivered in time) and one with a lower Telegram
share, to show how the saving depends on it. Each scenario runs several seeds;
the report gives every seed and the median.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from _results import DEFAULT_OUT, machine, median, publish, ratio, today

from otp_router.demo import DemoSummary, Population, make_population, run_demo
from otp_router.metrics import NullMetrics
from otp_router.phone import parse_phone
from otp_router.prices import SmsPrices

NAME = "cost"
#: Population kinds whose Telegram message is delivered within the ttl.
TELEGRAM_DELIVERS = frozenset({"telegram", "flood"})


@dataclass(frozen=True, slots=True)
class Scenario:
    """A population shape.

    Attributes:
        name: Short label for the report.
        telegram_share: Weight of the ``telegram`` kind; None for the demo's default.
        description: One line for the report.
    """

    name: str
    telegram_share: float | None
    description: str


SCENARIOS = (
    Scenario("default", None, "demo population: 64 of 96 valid-number weights are on Telegram"),
    Scenario("low_telegram", 0.30, "30 % of valid numbers on Telegram and delivered in time"),
)


@dataclass(frozen=True, slots=True)
class Oracle:
    """What the oracle pays for a population."""

    total: Decimal
    started: int
    reached: int
    on_telegram: int


def oracle_cost(population: Population, prices: SmsPrices) -> Oracle:
    """Price every valid user on the channel that will deliver (Telegram when it does, else SMS).

    ``reached`` counts users whose chosen channel delivers: the oracle's verified users.
    """
    total, started, reached, on_telegram = Decimal(0), 0, 0, 0
    for user in population.users:
        if user.kind == "bad_number":
            continue  # refused before any provider call: free for everyone
        started += 1
        if user.kind in TELEGRAM_DELIVERS:
            total += prices.telegram
            reached += 1
            on_telegram += 1
        else:
            total += prices.sms(parse_phone(user.phone).region)
            reached += user.behaviour.get("sms_final", "delivered") == "delivered"
    return Oracle(total, started, reached, on_telegram)


def _per(total: Decimal, count: int) -> float | None:
    return float(total / count) if count else None


def measure(
    scenario: Scenario, seed: int, summary: DemoSummary, oracle: Oracle, time_scale: float
) -> dict[str, Any]:
    """One run's numbers, JSON-ready (money as floats in USD, exact totals as strings)."""
    p50, p95 = summary.percentile(0.5), summary.percentile(0.95)
    return {
        "scenario": scenario.name,
        "seed": seed,
        "users": summary.users,
        "started": summary.started,
        "verified": summary.verified,
        "oracle_started": oracle.started,
        "oracle_reached": oracle.reached,
        "telegram_deliverable_share": oracle.on_telegram / oracle.started if oracle.started else None,
        "router_total": str(summary.cost_router),
        "sms_only_total": str(summary.cost_sms_only),
        "oracle_total": str(oracle.total),
        "router_per_verified": _per(summary.cost_router, summary.verified),
        "sms_only_per_user": _per(summary.cost_sms_only, summary.started),
        "oracle_per_verified": _per(oracle.total, oracle.reached),
        "router_over_sms_only": ratio(float(summary.cost_router), float(summary.cost_sms_only)),
        "router_over_oracle": ratio(float(summary.cost_router), float(oracle.total)),
        "paid_twice": summary.paid_twice,
        "paid_twice_share": summary.paid_twice / summary.started if summary.started else None,
        "time_to_code_p50_s": None if p50 is None else p50 / time_scale,
        "time_to_code_p95_s": None if p95 is None else p95 / time_scale,
        "delivered": dict(summary.delivered),
        "fallbacks": dict(summary.fallbacks),
        "wall_seconds": round(summary.wall_seconds, 2),
    }


#: Figures whose median across seeds the report gives.
MEDIAN_KEYS = (
    "users",
    "verified",
    "telegram_deliverable_share",
    "router_per_verified",
    "sms_only_per_user",
    "oracle_per_verified",
    "router_over_sms_only",
    "router_over_oracle",
    "paid_twice_share",
    "time_to_code_p50_s",
    "time_to_code_p95_s",
)


async def run_one(
    scenario: Scenario, seed: int, users: int, time_scale: float, arrival_window: float
) -> dict[str, Any]:
    """Replay one seeded population through the router and price it three ways."""
    prices = SmsPrices.load()
    population = make_population(users, seed, telegram_share=scenario.telegram_share)
    summary = await run_demo(
        users=users,
        seed=seed,
        time_scale=time_scale,
        metrics=NullMetrics(),
        progress=None,
        telegram_share=scenario.telegram_share,
        arrival_window=arrival_window,
    )
    row = measure(scenario, seed, summary, oracle_cost(population, prices), time_scale)
    if row["started"] != row["oracle_started"]:
        # The router refused a valid number (a rate limit?): the comparison would be skewed.
        print(
            f"  warning: {scenario.name} seed {seed}: router started {row['started']}, "
            f"population has {row['oracle_started']} valid numbers",
            file=sys.stderr,
        )
    return row


async def run(
    scenarios: Sequence[Scenario],
    seeds: Sequence[int],
    users: int,
    time_scale: float,
    arrival_window: float,
    parallel: bool,
) -> list[dict[str, Any]]:
    """Every scenario and seed; one at a time unless ``parallel`` (smoke mode only: it skews timing)."""
    jobs = [(scenario, seed) for scenario in scenarios for seed in seeds]
    if parallel:
        return list(
            await asyncio.gather(*(run_one(s, seed, users, time_scale, arrival_window) for s, seed in jobs))
        )
    rows = []
    for scenario, seed in jobs:
        row = await run_one(scenario, seed, users, time_scale, arrival_window)
        print(
            f"  {scenario.name:<13} seed {seed}: router ${row['router_per_verified']:.4f}/verified, "
            f"SMS-only ${row['sms_only_per_user']:.4f}/user, oracle ${row['oracle_per_verified']:.4f}"
            f"/verified  ({row['wall_seconds']:.0f} s)",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]], scenarios: Sequence[Scenario]) -> dict[str, Any]:
    """Medians across seeds per scenario."""
    out: dict[str, Any] = {}
    for scenario in scenarios:
        mine = [r for r in rows if r["scenario"] == scenario.name]
        out[scenario.name] = {
            "telegram_share": scenario.telegram_share,
            "description": scenario.description,
            "seeds": [r["seed"] for r in mine],
            "median": {key: median([r[key] for r in mine]) for key in MEDIAN_KEYS},
        }
    return out


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(label: str, users: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {users} | {_money(r['router_per_verified'])} | {_money(r['sms_only_per_user'])} "
        f"| {_money(r['oracle_per_verified'])} | {_num(r['router_over_sms_only'], '.3f')} "
        f"| {_num(r['router_over_oracle'], '.3f')} | {_num(r['paid_twice_share'], '.1%')} "
        f"| {_num(r['time_to_code_p50_s'], '.1f')} | {_num(r['time_to_code_p95_s'], '.1f')} |"
    )


def reading(data: dict[str, Any]) -> list[str]:
    """A few sentences that read this run's medians."""
    lines = ["", "Reading:", ""]
    for name, info in data["scenarios"].items():
        med = info["median"]
        if med["router_over_sms_only"] is None:
            continue
        lines.append(
            f"- `{name}`: the router pays {med['router_over_sms_only']:.1%} of SMS-only "
            f"(saves {1 - med['router_over_sms_only']:.1%}) with "
            f"{_num(med['telegram_deliverable_share'], '.0%')} of users reachable on Telegram in time."
        )
    ratios = [r["router_over_oracle"] for r in data["runs"] if r["router_over_oracle"] is not None]
    if ratios and max(abs(r - 1) for r in ratios) < 1e-9:
        lines += [
            "",
            "The router pays exactly what the oracle pays in every run. With the emulators, a probe "
            "of a number that is not on Telegram is free, and a Telegram code not delivered within "
            "its ttl is refunded; the Telegram step's deadline equals that ttl, so no user keeps a "
            "Telegram charge and pays for an SMS too. What the router pays for not knowing is time: "
            "users whose Telegram message is slow or never arrives wait for the Telegram deadline "
            "(30 s) before their SMS is sent, which is what the p95 time to code shows. Real "
            "providers can differ: a refund the Gateway does not grant, or a charge for a send that "
            "failed ambiguously, would show up here as router/oracle above 1.",
        ]
    elif ratios:
        lines += [
            "",
            f"router/oracle ranges {min(ratios):.3f}–{max(ratios):.3f}: what not knowing in advance costs.",
        ]
    return lines


def render(data: dict[str, Any]) -> str:
    """The Markdown report the README quotes."""
    cfg, mach = data["config"], data["machine"]
    lines = [
        "# Cost per verified user",
        "",
        f"Measured {data['date']} on {mach['nproc']} CPUs ({mach['cpu'] or 'unknown CPU'}), "
        f"{mach['implementation']} {mach['python']}, {mach['platform']}; "
        f"load average at start {mach['load_average_1min']}.",
        "",
        f"Seeded populations of {cfg['users']} users (seeds {', '.join(map(str, cfg['seeds']))}) "
        "replayed through the real router (SQLite store, webhook server) against the Telegram and "
        f"Twilio emulators; provider time ×{1 / cfg['time_scale']:.0f}; workflow: Telegram with a 30 s "
        "deadline (= its ttl, so an undelivered code is refunded), then SMS. Prices: the packaged "
        "table (`otp_router/data/sms-prices.toml`). Router cost comes from its ledger.",
        "",
        "| scenario | users | router $/verified user | SMS-only $/user | oracle $/verified user "
        "| router/SMS-only | router/oracle | paid twice | time to code p50 (s) | p95 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, info in data["scenarios"].items():
        for r in (r for r in data["runs"] if r["scenario"] == name):
            lines.append(_row(f"{name} (seed {r['seed']})", str(r["users"]), r))
        lines.append(_row(f"**{name} (median)**", str(cfg["users"]), info["median"]))
    lines += ["", "Scenarios:", ""]
    for name, info in data["scenarios"].items():
        share = info["median"]["telegram_deliverable_share"]
        lines.append(
            f"- `{name}`: {info['description']}; median share of started users whose Telegram "
            f"message is delivered in time: {_num(share, '.1%')}."
        )
    lines += reading(data)
    lines += [
        "",
        "Columns:",
        "",
        "- router $/verified user: the ledger's net cost (charges minus Telegram refunds) divided by "
        "verifications that ended verified.",
        "- SMS-only $/user: one SMS at the country's price per started verification, divided by "
        "started verifications.",
        "- oracle $/verified user: Telegram price for users whose Telegram message is delivered "
        "within the ttl, the SMS price for the other started users, nothing for malformed numbers; "
        "divided by the users the oracle's channel reaches.",
        "- router/SMS-only and router/oracle: ratios of total costs over the same started "
        "verifications (so the denominators above do not enter).",
        "- paid twice: share of started verifications with a kept (not refunded) Telegram charge "
        "and an SMS charge.",
        "- time to code: from `start` to the router recording the code as delivered, in emulated "
        "provider seconds (wall seconds divided by the time scale).",
    ]
    if data["log_warnings"]:
        lines += ["", "Warnings the router logged during the runs (count, message):", ""]
        lines += [f"- {count} × `{message}`" for message, count in data["log_warnings"].items()]
    lines += ["", "Rerun: `python bench/cost.py` (see `bench/README.md`)."]
    return "\n".join(lines)


class LogTally(logging.Handler):
    """Counts the router's warnings instead of printing one line per user.

    The counts go into the results, so a run that logged problems says so.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        """Count the message (already free of numbers and secrets by the router's rules)."""
        self.counts[f"{record.levelname} {record.name}: {record.getMessage()}"] += 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=500, help="users per run (default: %(default)s)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="population seeds (default: 1 2 3)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.05,
        help="real seconds per emulated provider second (default: %(default)s)",
    )
    parser.add_argument(
        "--arrival-window",
        type=float,
        default=5.0,
        help="real seconds over which users start, as in the demo (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 20 users, one seed, scenarios in parallel, fast arrivals (numbers meaningless)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.seeds, args.time_scale, args.arrival_window = 20, [1], 0.02, 0.5
    if args.users < 1 or not 0 < args.time_scale <= 1 or args.arrival_window < 0:
        parser.error("--users must be at least 1, --time-scale in (0, 1] and --arrival-window at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    args = parse_args(argv)
    config = {
        "users": args.users,
        "seeds": args.seeds,
        "time_scale": args.time_scale,
        "arrival_window": args.arrival_window,
        "quick": args.quick,
    }
    print(f"{NAME}: {config}", file=sys.stderr)
    tally = LogTally()
    root = logging.getLogger("otp_router")
    root.addHandler(tally)
    root.propagate = False
    began = time.monotonic()
    try:
        rows = asyncio.run(
            run(SCENARIOS, args.seeds, args.users, args.time_scale, args.arrival_window, parallel=args.quick)
        )
    finally:
        root.removeHandler(tally)
        root.propagate = True
    data: dict[str, Any] = {
        "benchmark": NAME,
        "date": today(),
        "machine": machine(),
        "config": config,
        "scenarios": summarize(rows, SCENARIOS),
        "runs": rows,
        "wall_seconds": round(time.monotonic() - began, 1),
        "log_warnings": dict(tally.counts.most_common()),
    }
    markdown = render(data)
    publish(args.out, NAME, data, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
