"""``otp-router demo``: a simulated population through the real router, on this machine.

It starts the Telegram Gateway and Twilio emulators, a SQLite store in a
temporary folder and the router's webhook server, then sends a few hundred
simulated users through ``start`` → read the code on their "phone" →
``check``. Most users are on Telegram; some are not, some receive slowly or
never, some numbers are bad. Emulated provider time runs faster than the
wall clock (``--time-scale``) so Telegram's 30 s minimum ttl does not make
you wait; the router's step deadlines are scaled to match.

The summary's costs come from the router's own ledger; the SMS-only figure
prices every started verification at the same table the router estimates
SMS with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from otp_router.config import RetrySettings, Settings
from otp_router.core import Status, VerificationState
from otp_router.emulators import EmulatorPair, Script, serve_emulators
from otp_router.errors import InputError
from otp_router.harness import emulated_settings, read_code, sample_numbers
from otp_router.metrics import Metrics, NullMetrics
from otp_router.policy import Policy, Step
from otp_router.prices import SmsPrices
from otp_router.providers.base import ChannelName
from otp_router.router import OtpRouter

__all__ = ["DemoSummary", "Population", "User", "make_population", "run_demo"]

#: Countries of the simulated users and their shares.
COUNTRIES = {"GB": 15, "DE": 12, "FR": 10, "IN": 15, "BR": 10, "ID": 10, "NG": 8, "US": 10, "IT": 5, "ES": 5}
BAD_NUMBERS = ["+44 12", "12345", "+1 999 000 0000", "call me", "+49 0000", "+33 1"]


@dataclass(frozen=True, slots=True)
class User:
    """One simulated person: a number, how the providers treat it, how they type."""

    phone: str
    kind: str
    behaviour: dict[str, Any]
    typo_first: bool


@dataclass(frozen=True, slots=True)
class Population:
    """The seeded population."""

    users: tuple[User, ...]

    def script(self, time_scale: float) -> Script:
        """The emulator script that makes the providers treat each user as drawn."""
        script = Script(time_scale=time_scale)
        script.update_from_json({u.phone: u.behaviour for u in self.users if u.behaviour})
        return script


def make_population(size: int, seed: int, *, telegram_share: float | None = None) -> Population:
    """Draw ``size`` users reproducibly from ``seed``.

    Shares (of valid numbers): 64 % on Telegram and delivered within the ttl,
    15 % not on Telegram, 2 % unavailable, 8 % slow (past the ttl: refunded),
    4 % never delivered, 2 % Telegram 5xx, 1 % flood-waited; 4 % of SMS end
    undelivered. About 4 % of all numbers are malformed.

    Args:
        size: Number of users.
        seed: Makes the draw reproducible.
        telegram_share: Weight of the ``telegram`` kind (0..1) instead of the
            default; the other kinds share the rest in their default proportions.
            None keeps the default shares (and the exact same draw).

    Raises:
        ValueError: ``telegram_share`` is outside 0..1.
    """
    rng = random.Random(seed)
    regions = rng.choices(list(COUNTRIES), weights=list(COUNTRIES.values()), k=size)
    pools = {r: iter(sample_numbers(r, regions.count(r), offset=rng.randrange(5000))) for r in set(regions)}
    kinds: list[tuple[str, float]] = [
        ("telegram", 64),
        ("absent", 15),
        ("unavailable", 2),
        ("slow", 8),
        ("never", 4),
        ("telegram_5xx", 2),
        ("flood", 1),
    ]
    if telegram_share is not None:
        if not 0 <= telegram_share <= 1:
            raise ValueError("telegram_share must be between 0 and 1")
        others = sum(w for k, w in kinds if k != "telegram")
        kinds = [
            (k, telegram_share if k == "telegram" else (1 - telegram_share) * w / others) for k, w in kinds
        ]
    users: list[User] = []
    for region in regions:
        if rng.random() < 0.04:
            users.append(User(rng.choice(BAD_NUMBERS), "bad_number", {}, False))
            continue
        kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        behaviour: dict[str, Any] = {}
        if kind == "telegram":
            behaviour["telegram_delay"] = round(rng.uniform(1.0, 20.0), 2)
        elif kind == "absent":
            behaviour["telegram"] = "absent"
        elif kind == "unavailable":
            behaviour["telegram"] = "unavailable"
        elif kind == "slow":
            behaviour["telegram_delay"] = round(rng.uniform(40.0, 90.0), 2)
        elif kind == "never":
            behaviour["telegram_never"] = True
        elif kind == "telegram_5xx":
            behaviour["telegram_5xx"] = 1
        elif kind == "flood":
            behaviour["telegram_flood_wait"] = 1
            behaviour["telegram_delay"] = 3.0
        if rng.random() < 0.04:
            behaviour["sms_final"] = "undelivered"
            behaviour["sms_error_code"] = 30003
        behaviour["sms_delay"] = round(rng.uniform(2.0, 15.0), 2)
        users.append(User(next(pools[region]), kind, behaviour, rng.random() < 0.08))
    return Population(tuple(users))


@dataclass(slots=True)
class DemoSummary:
    """What the demo measured; every cost comes from the router's ledger."""

    users: int = 0
    refused_input: int = 0
    started: int = 0
    verified: int = 0
    not_verified: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    cost_router: Decimal = Decimal(0)
    cost_refunded: Decimal = Decimal(0)
    cost_sms_only: Decimal = Decimal(0)
    paid_twice: int = 0
    time_to_code: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0

    def percentile(self, q: float) -> float | None:
        """Quantile ``q`` of time to code, in seconds."""
        if not self.time_to_code:
            return None
        if len(self.time_to_code) == 1:
            return self.time_to_code[0]
        return statistics.quantiles(self.time_to_code, n=100, method="inclusive")[round(q * 100) - 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (costs as strings, exact)."""
        return {
            "users": self.users,
            "refused_input": self.refused_input,
            "started": self.started,
            "verified": self.verified,
            "not_verified": self.not_verified,
            "delivered": dict(self.delivered),
            "finished": dict(self.finished),
            "fallbacks": dict(self.fallbacks),
            "cost_router": str(self.cost_router),
            "cost_refunded": str(self.cost_refunded),
            "cost_sms_only": str(self.cost_sms_only),
            "paid_twice": self.paid_twice,
            "time_to_code_p50": self.percentile(0.5),
            "time_to_code_p95": self.percentile(0.95),
            "wall_seconds": round(self.wall_seconds, 2),
        }

    def render(self, time_scale: float) -> str:
        """The summary table printed at the end of the demo."""

        def money(value: Decimal) -> str:
            return f"${value:.4f}"

        per_user = self.cost_router / self.verified if self.verified else Decimal(0)
        sms_per_user = self.cost_sms_only / self.started if self.started else Decimal(0)
        saving = 1 - self.cost_router / self.cost_sms_only if self.cost_sms_only else Decimal(0)
        p50, p95 = self.percentile(0.5), self.percentile(0.95)
        unscale = 1 / time_scale

        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value * unscale:.1f} s"

        rows = [
            ("users simulated", f"{self.users}"),
            ("refused before any provider call", f"{self.refused_input}  (malformed numbers)"),
            ("verifications started", f"{self.started}"),
            ("verified", f"{self.verified}  ({self.verified / max(self.started, 1):.1%})"),
            ("not verified", f"{self.not_verified}"),
            ("delivered via telegram", f"{self.delivered.get('telegram', 0)}"),
            ("delivered via sms", f"{self.delivered.get('sms', 0)}"),
            ("fallbacks by reason", ", ".join(f"{k} {v}" for k, v in self.fallbacks.most_common()) or "-"),
            ("cost with otp-router", f"{money(self.cost_router)}  ({money(per_user)} per verified user)"),
            ("  of which refunds", f"{money(-self.cost_refunded)}  (Telegram codes not delivered in time)"),
            ("cost on SMS only", f"{money(self.cost_sms_only)}  ({money(sms_per_user)} per user)"),
            ("saving", f"{saving:.1%}"),
            ("users who paid twice", f"{self.paid_twice}  (a kept Telegram charge and an SMS)"),
            ("time to code p50 / p95", f"{seconds(p50)} / {seconds(p95)}  (provider time)"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(["", "otp-router demo summary", "=" * 23, *lines, ""])


class _Progress:
    """A one-line progress bar; redrawn in place on a terminal, every 10 % elsewhere."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total, self.done, self.out = total, 0, out
        self.tty = out is not None and out.isatty()
        self.shown = -1

    def tick(self) -> None:
        self.done += 1
        if self.out is None:
            return
        width = 40
        filled = width * self.done // max(self.total, 1)
        step = filled if self.tty else filled // 4
        if step == self.shown and self.done != self.total:
            return
        self.shown = step
        bar = f"  [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} users"
        self.out.write(f"\r{bar}" if self.tty else f"{bar}\n")
        if self.tty and self.done == self.total:
            self.out.write("\n")
        self.out.flush()


@contextlib.asynccontextmanager
async def _webhook_server(router: OtpRouter) -> AsyncIterator[str | None]:
    """Serve the router's webhooks on a free loopback port and set the router's public URL to it.

    Without the ``server`` extra the router polls providers at deadlines instead.
    """
    try:
        import uvicorn

        from otp_router.webapp import create_app
    except ImportError:
        yield None
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # The router builds callback URLs from its public URL; the app checks Twilio signatures against it.
    router.settings.public_url = url
    app = create_app(router, public_url=url)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        await task
        sock.close()


async def run_demo(
    *,
    users: int = 300,
    seed: int = 7,
    time_scale: float = 0.05,
    workdir: Path | None = None,
    metrics: Metrics | NullMetrics | None = None,
    progress: TextIO | None = sys.stderr,
    concurrency: int = 60,
    telegram_share: float | None = None,
    arrival_window: float = 5.0,
) -> DemoSummary:
    """Run the simulated population and return the summary.

    Args:
        users: Population size.
        seed: Makes the population and typing reproducible.
        time_scale: Emulated seconds per real second (0.05: 20x faster).
        workdir: Where the SQLite file goes (default: a temporary folder).
        metrics: Metrics sink (tests pass a private registry).
        progress: Where to draw the progress bar (None: nowhere).
        concurrency: Users in flight at once.
        telegram_share: Share of the ``telegram`` kind (see :func:`make_population`).
        arrival_window: Real seconds over which the users' starts are spread.
    """
    population = make_population(users, seed, telegram_share=telegram_share)
    script = population.script(time_scale)
    prices = SmsPrices.load()
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        folder = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otp-router-demo-")))
        pair = await serve_emulators(
            Settings.model_construct(), host="127.0.0.1", telegram_port=0, twilio_port=0, script=script
        )
        try:
            summary = await _simulate(
                pair, population, folder, time_scale, metrics, progress, concurrency, prices, arrival_window
            )
        finally:
            await pair.aclose()
    summary.wall_seconds = time.monotonic() - began
    return summary


async def _simulate(
    pair: EmulatorPair,
    population: Population,
    folder: Path,
    time_scale: float,
    metrics: Metrics | NullMetrics | None,
    progress: TextIO | None,
    concurrency: int,
    prices: SmsPrices,
    arrival_window: float = 5.0,
) -> DemoSummary:
    # Provider time is scaled, so the router's deadlines are too: 30 s for Telegram
    # (= its ttl, so an undelivered code is refunded), 120 s for SMS.
    policy = Policy(
        steps=(
            Step(ChannelName.TELEGRAM, 30 * time_scale, probe=True),
            Step(ChannelName.SMS, 120 * time_scale),
        )
    )
    settings = emulated_settings(
        pair,
        store_url=f"sqlite:///{folder / 'otp-router-demo.db'}",
        retry=RetrySettings(initial_backoff=0.05, max_backoff=0.5, max_retry_after=2.0),
        settle_delay=max(0.2, 15 * time_scale),
        code_secret=secrets.token_hex(32),
    )
    summary = DemoSummary(users=len(population.users))
    bar = _Progress(len(population.users), progress)
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(len(population.users))
    router = OtpRouter.from_settings(settings, policy=policy, metrics=metrics)
    async with router:
        async with _webhook_server(router):
            started: list[str] = []

            async def one(user: User, delay: float) -> None:
                await asyncio.sleep(delay)
                async with gate:
                    await _one_user(router, pair, user, summary, started, time_scale)
                bar.tick()

            arrivals = sorted(rng.uniform(0, arrival_window) for _ in population.users)
            await asyncio.gather(*(one(u, d) for u, d in zip(population.users, arrivals, strict=True)))
            await _wait_settled(router, started, within=60 * time_scale + 30)
        await router.wait_idle()
        await _tally(router, started, summary, prices)
    return summary


async def _one_user(
    router: OtpRouter, pair: EmulatorPair, user: User, summary: DemoSummary, started: list[str], scale: float
) -> None:
    try:
        verification = await router.start(user.phone)
    except InputError:
        summary.refused_input += 1
        return
    started.append(verification.id)
    code = await read_code(pair, user.phone, wait=200 * scale + 2)
    if code is None:
        return
    if user.typo_first:
        await router.check(verification.id, f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}")
    await router.check(verification.id, code)


async def _wait_settled(router: OtpRouter, ids: list[str], within: float) -> None:
    """Wait until no verification has a pending deadline (costs final, fallbacks done)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while loop.time() < until:
        records = [await router.store.get(vid) for vid in ids]
        states = [VerificationState.model_validate_json(r.data) for r in records if r is not None]
        if all(s.status.is_final and s.deadline is None for s in states):
            return
        # Users who never got a code: end them so their costs settle too.
        for s in states:
            cur = s.current
            if s.status is Status.PENDING and cur is not None and cur.phase.value == "timed_out":
                await router.cancel(s.id)
        await asyncio.sleep(0.1)


async def _tally(router: OtpRouter, ids: list[str], summary: DemoSummary, prices: SmsPrices) -> None:
    for vid in ids:
        record = await router.store.get(vid)
        if record is None:
            continue
        state = VerificationState.model_validate_json(record.data)
        summary.started += 1
        summary.finished[state.status.value] += 1
        if state.status is Status.VERIFIED:
            summary.verified += 1
        else:
            summary.not_verified += 1
        summary.cost_sms_only += prices.sms(state.region)
        for f in state.fallbacks:
            summary.fallbacks[f.reason.value] += 1
        delivered = [a for a in state.attempts if a.delivered_at is not None]
        for attempt in delivered:
            summary.delivered[attempt.channel.value] += 1
        if delivered and delivered[0].delivered_at is not None:
            summary.time_to_code.append(delivered[0].delivered_at - state.created_at)
        charged = [a for a in state.attempts if a.cost > 0]
        if len({a.channel for a in charged}) > 1:
            summary.paid_twice += 1
    for entry in await router.store.ledger():
        summary.cost_router += entry.amount
        if entry.amount < 0 and entry.channel == "telegram":
            summary.cost_refunded += entry.amount


def main(users: int, seed: int, time_scale: float, json_out: Path | None) -> int:
    """Entry point of ``otp-router demo``."""
    print(
        f"otp-router demo: {users} simulated users (seed {seed}), emulated providers, "
        f"SQLite store in a temporary folder; provider time x{1 / time_scale:.0f}",
        file=sys.stderr,
    )
    summary = asyncio.run(run_demo(users=users, seed=seed, time_scale=time_scale))
    print(summary.render(time_scale))
    if json_out is not None:
        json_out.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
