"""``otp-router demo``: a simulated population through the real router, on this machine.

It starts the Telegram Gateway and Twilio emulators, a SQLite store in a
temporary folder and the router's webhook server, then sends a few hundred
simulated users through ``start`` → read the code on their "phone" →
``check``. The users come from :mod:`otp_router.population`: most are on
Telegram and receive within seconds, some come online later or never, some
are not on Telegram, some SMS are slow or undelivered, some numbers are bad.
Emulated provider time runs faster than the wall clock (``--time-scale``) so
Telegram's 30 s minimum ttl does not make you wait; the router's step
deadlines are scaled to match.

The summary's costs come from the router's own ledger; the SMS-only figure
prices every started verification at the same table the router estimates
SMS with.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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

from otp_router.accounting import paid_twice, time_to_code
from otp_router.config import RetrySettings, Settings
from otp_router.core import Status, VerificationState
from otp_router.emulators import EmulatorPair, serve_emulators
from otp_router.errors import AllProvidersFailed, InputError
from otp_router.harness import emulated_settings, read_code
from otp_router.metrics import Metrics, NullMetrics
from otp_router.policy import AutoDeadline, Policy, Step
from otp_router.population import Population, Shape, User, make_population
from otp_router.prices import SmsPrices
from otp_router.router import OtpRouter

__all__ = ["DemoSummary", "Population", "User", "make_population", "run_demo", "scaled_policy"]


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
    paid_twice_extra: Decimal = Decimal(0)
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
            "paid_twice_share": self.paid_twice / self.started if self.started else None,
            "paid_twice_extra": str(self.paid_twice_extra),
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
            (
                "users who paid twice",
                f"{self.paid_twice}  ({self.paid_twice / max(self.started, 1):.1%} of started; "
                f"a delivered Telegram message and an SMS)",
            ),
            ("  extra cost of paying twice", f"{money(self.paid_twice_extra)}  (the SMS on top)"),
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
    shape: Shape | str = "mixed",
    policy: Policy | None = None,
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
        shape: The population's shape (see :mod:`otp_router.population`).
        policy: Routing policy in provider seconds (default: the built-in
            policy); its deadlines are scaled by ``time_scale``.
        arrival_window: Real seconds over which the users' starts are spread.
    """
    population = make_population(users, seed, shape)
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
                pair,
                population,
                folder,
                scaled_policy(policy or Policy(), time_scale),
                time_scale,
                metrics,
                progress,
                concurrency,
                prices,
                arrival_window,
            )
        finally:
            await pair.aclose()
    summary.wall_seconds = time.monotonic() - began
    return summary


def scaled_policy(policy: Policy, time_scale: float) -> Policy:
    """``policy`` with its step deadlines in wall-clock seconds of a run at ``time_scale``.

    The emulators scale the ttl they receive themselves, so a Telegram step
    keeps its ttl in provider seconds (30 s stays 30 s: refunded after 30
    provider seconds); only the router's own deadlines are scaled. For an
    ``auto`` step so are its bounds, the SMS latency it assumes, and the price
    of waiting (per wall-clock second, so ``1 / time_scale`` times dearer);
    the router learns latencies in wall-clock seconds, so its choice is the
    provider-time choice, scaled. Its ttl cap stays in provider seconds,
    above every scaled bound.
    """

    def scale(step: Step) -> Step:
        auto = step.auto
        if auto is not None:
            auto = AutoDeadline(auto.minimum * time_scale, auto.maximum * time_scale)
        return dataclasses.replace(step, deliver_within=step.deliver_within * time_scale, auto=auto)

    countries = {
        region: dataclasses.replace(rule, steps={c: scale(s) for c, s in rule.steps.items()})
        for region, rule in policy.countries.items()
    }
    return dataclasses.replace(
        policy,
        steps=tuple(scale(s) for s in policy.steps),
        countries=countries,
        wait_cost_per_second=policy.wait_cost_per_second / time_scale,
        sms_latency=policy.sms_latency * time_scale,
    )


async def _simulate(
    pair: EmulatorPair,
    population: Population,
    folder: Path,
    policy: Policy,
    time_scale: float,
    metrics: Metrics | NullMetrics | None,
    progress: TextIO | None,
    concurrency: int,
    prices: SmsPrices,
    arrival_window: float = 5.0,
) -> DemoSummary:
    settings = emulated_settings(
        pair,
        store_url=f"sqlite:///{folder / 'otp-router-demo.db'}",
        retry=RetrySettings(initial_backoff=0.05, max_backoff=0.5, max_retry_after=2.0),
        settle_delay=max(0.2, 15 * time_scale),
        # The learned deadlines' refresh runs on provider time too (60 s by default).
        latency_refresh=max(0.5, 60 * time_scale),
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
    except AllProvidersFailed as exc:
        # Stored as failed: tallied with the rest, but no code to read.
        if exc.verification_id is not None:
            started.append(exc.verification_id)
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
        for attempt in state.attempts:
            if attempt.delivered_at is not None:
                summary.delivered[str(attempt.channel)] += 1
        seconds = time_to_code(state)
        if seconds is not None:
            summary.time_to_code.append(seconds)
        twice = paid_twice(state)
        if twice is not None:
            summary.paid_twice += 1
            summary.paid_twice_extra += twice.extra
    for entry in await router.store.ledger():
        summary.cost_router += entry.amount
        if entry.amount < 0 and entry.channel == "telegram":
            summary.cost_refunded += entry.amount


def main(users: int, seed: int, time_scale: float, json_out: Path | None, shape: str = "mixed") -> int:
    """Entry point of ``otp-router demo``."""
    print(
        f"otp-router demo: {users} simulated users (seed {seed}, population {shape!r}), emulated "
        f"providers, SQLite store in a temporary folder; provider time x{1 / time_scale:.0f}",
        file=sys.stderr,
    )
    summary = asyncio.run(run_demo(users=users, seed=seed, time_scale=time_scale, shape=shape))
    print(summary.render(time_scale))
    if json_out is not None:
        json_out.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
