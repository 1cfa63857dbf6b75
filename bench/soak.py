"""Soak: verifications at a fixed rate through real worker processes, with scripted faults and SIGKILLs.

Run ``python bench/soak.py`` (50,000 verifications at 25/s: about 40 minutes on
2 cores). It writes ``bench/results/soak.md`` and ``.json``. It needs the
Redis at 127.0.0.1:6379; every key it writes is under a fresh prefix and is
deleted afterwards.

What runs:

* ``otp-router emulate`` (Telegram Gateway and Twilio emulators) in its own
  process, ten times faster than real time (``--time-scale 0.1``).
* Two ``otp-router worker`` processes sharing the Redis store, queue and
  consumer group: ``steady`` runs from start to end (its memory is the one
  sampled for "RSS flat"); ``victim`` is killed with SIGKILL at random
  moments and started again at once, as a crashed pod would be.
* This process enqueues one verification (``XADD``, a distinct number and
  idempotency key) at a fixed rate, and plays each user: it looks for the
  code in the emulators' inboxes (what reached the phone) at growing
  intervals, then enters it through the library (``OtpRouter.check``).

Each number is scripted with one behaviour, most of them normal and the rest
faults: Telegram absent, unavailable, never delivered, 5xx, flood wait,
hanging past the client timeout; Twilio 5xx and 429 before creating,
answer lost after creating (503 or a hang), and a failing message lookup.
Every one of them can still reach the user with exactly one code.

Checked at the end, from the emulators' own logs and the store:

* **lost**: verifications not ``verified`` at the end (the user never got a
  code, or it was refused);
* **duplicated sends**: numbers with more than one accepted Telegram send or
  more than one created SMS, and users who saw two different codes;
* **RSS flat**: the steady worker's resident set, sampled every few seconds:
  start, end, peak and the least-squares slope after a warm-up; flat means the
  fitted growth over the run is at most 10 % of the starting RSS.

Also reported: users who paid twice (a delivered, kept Telegram message and an
SMS), kills, sends re-issued after a kill, dead letters, and error lines in the
workers' logs. The script exits 1 when anything is lost or duplicated or the
RSS is not flat. ``--quick`` is the small version the test suite runs (a few
hundred verifications, one kill, RSS not judged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _results import DEFAULT_OUT, machine, publish, today
from _worker_harness import (
    REDIS_URL,
    Emulator,
    code_version,
    emulator_process,
    process_memory_kib,
    redis_available,
    redis_cleanup,
    start_worker,
    stop_process,
    unique_prefix,
)
from pydantic import SecretStr

from otp_router.config import LimitSettings
from otp_router.errors import OtpRouterError
from otp_router.harness import sample_numbers
from otp_router.metrics import NullMetrics
from otp_router.queue import QueueMessage, RedisStreamQueue
from otp_router.router import OtpRouter

NAME = "soak"
#: The issue's size for the full run.
TARGET_VERIFICATIONS = 50_000
#: Emulated provider time runs this much faster than the wall clock.
TIME_SCALE = 0.1
#: Distinct numbers come from these regions (``sample_numbers`` gives up to 10,000 per region).
REGIONS = ("GB", "DE", "FR", "ES", "IT", "NL", "SE", "PL")
#: Seconds after enqueueing at which a user looks for the code (what a patient user does).
LOOKS = (0.5, 1.5, 3, 6, 9, 14, 20, 30, 45, 65, 90, 120, 160, 200, 240, 300)
#: Flat RSS: the fitted growth after warm-up is at most this share of the starting RSS.
RSS_FLAT_SHARE = 0.10
SEND = "sendVerificationMessage"

#: Behaviour kinds: weight (per 100) and the emulator script for the number. Delays and
#: latencies are emulated seconds (x TIME_SCALE in real time); the client timeouts are 1.5 s.
FAULTS: dict[str, tuple[int, dict[str, Any]]] = {
    "normal": (70, {}),
    "telegram_absent": (3, {"telegram": "absent"}),
    "telegram_unavailable": (2, {"telegram": "unavailable"}),
    "telegram_never_delivered": (3, {"telegram_never": True}),
    "telegram_5xx": (3, {"telegram_5xx": 1}),
    "telegram_flood_wait": (2, {"telegram_flood_wait": 1}),
    "telegram_hang": (2, {"telegram_latency": 30.0}),
    "sms_5xx_nothing_created": (3, {"telegram": "absent", "sms_5xx": 1}),
    "sms_429": (3, {"telegram": "absent", "sms_429": 1}),
    "sms_5xx_after_create": (3, {"telegram": "absent", "sms_5xx_after_create": 1}),
    "sms_hang_after_create": (3, {"telegram": "absent", "sms_latency_after_create": 30.0}),
    "sms_lookup_5xx": (3, {"telegram": "absent", "sms_5xx_after_create": 1, "sms_list_5xx": 1}),
}
#: Worker settings the harness's ``settings_env`` does not carry.
WORKER_ENV = {
    "OTP_ROUTER_TELEGRAM__TIMEOUT": "1.5",
    "OTP_ROUTER_TWILIO__TIMEOUT": "1.5",
    "OTP_ROUTER_RETRY__TIMEOUT": "8",
}


@dataclass(slots=True)
class User:
    """One verification as its user lives it."""

    index: int
    phone: str
    kind: str
    key: str
    vid: str
    enqueued_at: float = 0.0
    code_at: float | None = None
    via: str | None = None
    looks: int = 0
    outcome: str = "not_started"
    saw_codes: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Sample:
    """One memory reading of a worker."""

    time: float
    worker: str
    life: int
    enqueued: int
    rss_kib: int


def population(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` distinct numbers with a behaviour kind each, the same for the same seed."""
    per_region = -(-count // len(REGIONS))
    if per_region > 9000:
        raise ValueError(f"at most {9000 * len(REGIONS)} verifications")
    phones: list[str] = []
    for region in REGIONS:
        phones += sample_numbers(region, min(per_region, count - len(phones)))
        if len(phones) >= count:
            break
    rng = random.Random(seed)
    kinds = list(FAULTS)
    weights = [FAULTS[k][0] for k in kinds]
    chosen = rng.choices(kinds, weights=weights, k=count)
    order = list(range(count))
    rng.shuffle(order)
    return [(phones[i], chosen[n]) for n, i in enumerate(order)]


def write_policy(path: Path, deliver_within: float) -> Path:
    """Telegram (probe first, deadline D) then SMS."""
    path.write_text(
        "[[steps]]\n"
        'channel = "telegram"\n'
        f"deliver_within = {deliver_within}\n"
        "probe = true\n\n"
        "[[steps]]\n"
        'channel = "sms"\n'
        "deliver_within = 120\n",
        encoding="utf-8",
    )
    return path


_DIGITS = re.compile(r"\d{4,8}")


class Soak:
    """One soak run: emulators, workers, producer, users, killer and memory sampler."""

    def __init__(self, args: argparse.Namespace, emulator: Emulator, workdir: Path) -> None:
        self.args = args
        self.emulator = emulator
        self.workdir = workdir
        self.prefix = unique_prefix("soak") if args.redis_url is None else None
        base_url = args.redis_url or f"{REDIS_URL}?prefix={self.prefix}"
        self.settings = emulator.settings(
            store_url=base_url,
            code_secret=SecretStr(secrets.token_urlsafe(24)),
            policy_file=write_policy(workdir / "policy.toml", args.deliver_within),
            # The run's numbers share a few prefixes and arrive faster than any velocity limit
            # allows; the conversion guard stays at its defaults (every user verifies).
            limits=LimitSettings(per_phone=0, per_prefix=0, per_country=0),
            queue_visibility_timeout=5.0,
            concurrency=50,
            http_port=0,
            log_level="INFO",
        )
        # Only this process's router: it computes ids, reads states and checks codes.
        self.router = OtpRouter.from_settings(self.settings, metrics=NullMetrics(), run_deadlines=False)
        self.users = [
            User(n, phone, kind, f"soak-{n}", self.router._new_id(f"soak-{n}"))
            for n, (phone, kind) in enumerate(population(args.verifications, args.seed))
        ]
        self.enqueued = 0
        self.lost_reasons: Counter[str] = Counter()
        self.behind_max = 0.0
        self.samples: list[Sample] = []
        self.kills: list[float] = []
        self.victim_life = 0
        self.steady: asyncio.subprocess.Process | None = None
        self.victim: asyncio.subprocess.Process | None = None
        self.victim_exits: list[int] = []
        self.producing = True
        self.started = self.producer_done = 0.0

    # ------------------------------------------------------------------ workers

    async def _worker(self, name: str, log: str) -> asyncio.subprocess.Process:
        return await start_worker(
            self.settings,
            "--no-http",
            "--name",
            name,
            workdir=self.workdir,
            log_file=self.workdir / log,
            extra_env=WORKER_ENV,
        )

    async def killer(self, rng: random.Random) -> None:
        """SIGKILL the victim at random moments while verifications are being enqueued; restart it."""
        if self.args.kills_at is not None:
            plan = [self.started + f * self.duration for f in self.args.kills_at]
        else:
            plan, at = [], self.started
            while True:
                at += rng.uniform(self.args.kill_min, self.args.kill_max)
                if at >= self.started + self.duration:
                    break
                plan.append(at)
        for at in plan:
            await asyncio.sleep(max(0.0, at - time.time()))
            victim = self.victim
            assert victim is not None
            if victim.returncode is None:
                victim.kill()
            self.victim_exits.append(await victim.wait())
            self.kills.append(time.time())
            self.victim_life += 1
            self.victim = await self._worker(f"victim-{self.victim_life}", "victim.log")

    @property
    def duration(self) -> float:
        """Seconds the producer needs for every verification at the fixed rate."""
        return float(self.args.verifications / self.args.rate)

    # ------------------------------------------------------------------ producer and users

    async def produce(self, users_done: list[asyncio.Task[None]], session: aiohttp.ClientSession) -> None:
        """Enqueue one verification per ``1 / rate`` seconds, and start its user."""
        queue = RedisStreamQueue(self.settings.store_url)
        try:
            for user in self.users:
                due = self.started + user.index / self.args.rate
                now = time.time()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    self.behind_max = max(self.behind_max, now - due)
                user.enqueued_at = time.time()
                await queue.enqueue(QueueMessage(phone=user.phone, idempotency_key=user.key))
                self.enqueued += 1
                users_done.append(asyncio.create_task(self.live(user, session)))
        finally:
            await queue.aclose()
            self.producer_done = time.time()
            self.producing = False

    async def inbox(self, session: aiohttp.ClientSession, phone: str) -> list[tuple[str, str]]:
        """Codes that reached ``phone``: (code, channel), Telegram first."""
        out: list[tuple[str, str]] = []
        params = {"phone": phone}
        async with session.get(f"{self.emulator.telegram_url}/_emulator/inbox", params=params) as resp:
            resp.raise_for_status()
            out += [(code, "telegram") for code in (await resp.json())["codes"]]
        async with session.get(f"{self.emulator.twilio_url}/_emulator/inbox", params=params) as resp:
            resp.raise_for_status()
            for body in (await resp.json())["messages"]:
                found = _DIGITS.search(body)
                out.append((found.group(0) if found else body, "sms"))
        return out

    async def live(self, user: User, session: aiohttp.ClientSession) -> None:
        """Wait for the code the way a user does, then enter it."""
        code: str | None = None
        for offset in (o for o in LOOKS if o <= self.args.give_up):
            await asyncio.sleep(max(0.0, user.enqueued_at + offset - time.time()))
            user.looks += 1
            try:
                seen = await self.inbox(session, user.phone)
            except (aiohttp.ClientError, TimeoutError):
                continue
            user.saw_codes.update(c for c, _ in seen)
            if seen:
                code, user.via = seen[0]
                user.code_at = time.time()
                break
        if code is None:
            user.outcome = "no_code"
            return
        try:
            result = await self.router.check(user.vid, code)
        except OtpRouterError as exc:
            user.outcome = f"error {type(exc).__name__}"
            return
        user.outcome = str(result.status)

    # ------------------------------------------------------------------ memory

    async def sample(self) -> None:
        """Read both workers' VmRSS every ``--rss-interval`` seconds until stopped."""
        while True:
            now = time.time()
            for name, proc, life in (("steady", self.steady, 0), ("victim", self.victim, self.victim_life)):
                if proc is not None and proc.returncode is None:
                    rss = process_memory_kib(proc.pid).get("VmRSS")
                    if rss is not None:
                        self.samples.append(Sample(now, name, life, self.enqueued, rss))
            await asyncio.sleep(self.args.rss_interval)

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        """Run the soak and return every figure (JSON-ready); no worker outlives it."""
        try:
            return await self._run()
        finally:
            for proc in (self.steady, self.victim):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def _run(self) -> dict[str, Any]:
        args = self.args
        rng = random.Random(args.seed + 1)
        async with self.router, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            scripted = {u.phone: FAULTS[u.kind][1] for u in self.users if FAULTS[u.kind][1]}
            items = list(scripted.items())
            for i in range(0, len(items), 2000):
                await self.emulator.script(session, dict(items[i : i + 2000]))
            self.steady = await self._worker("steady", "steady.log")
            self.victim = await self._worker("victim-0", "victim.log")
            await asyncio.sleep(args.warmup)  # both workers up (imports, group created)
            users: list[asyncio.Task[None]] = []
            self.started = time.time()
            sampler = asyncio.create_task(self.sample())
            killer = asyncio.create_task(self.killer(rng))
            try:
                await self.produce(users, session)
                await killer
                await asyncio.gather(*users)
                users_done = time.time()
                drained = await self.wait_drained()
            finally:
                sampler.cancel()
                killer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                with contextlib.suppress(asyncio.CancelledError):
                    await killer
            statuses = await self.final_statuses()
            exits = {}
            for name, proc in (("steady", self.steady), ("victim", self.victim)):
                if proc is not None:
                    exits[name] = await stop_process(proc, grace=30.0)
            telegram_log = await self.emulator.telegram_log(session)
            twilio_log = await self.emulator.twilio_log(session)
            async with session.get(f"{self.emulator.telegram_url}/_emulator/state") as resp:
                telegram_state = (await resp.json())["requests"]
            dead = await self.dead_letters()
        return self.figures(
            statuses=statuses,
            exits=exits,
            telegram_log=telegram_log,
            twilio_log=twilio_log,
            telegram_state=telegram_state,
            dead=dead,
            drained=drained,
            users_done=users_done,
        )

    async def wait_drained(self, within: float = 120.0) -> bool:
        """Wait until no message is waiting or pending in the queue."""
        queue = RedisStreamQueue(self.settings.store_url)
        try:
            until = time.time() + within
            while time.time() < until:
                if await queue.depth() == 0 and await queue.pending() == 0:
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            await queue.aclose()

    async def dead_letters(self) -> list[str]:
        """Reasons of the dead letters (there should be none)."""
        queue = RedisStreamQueue(self.settings.store_url)
        try:
            return [d.reason for d in await queue.dead_letters(count=1000)]
        finally:
            await queue.aclose()

    async def final_statuses(self) -> dict[str, tuple[str, bool]]:
        """Each verification's final status and paid-twice flag, from the store (id -> ...)."""
        out: dict[str, tuple[str, bool]] = {}
        sem = asyncio.Semaphore(20)

        async def one(user: User) -> None:
            async with sem:
                try:
                    v = await self.router.get(user.vid)
                except OtpRouterError as exc:
                    out[user.vid] = (f"error {type(exc).__name__}", False)
                else:
                    out[user.vid] = (str(v.status), v.paid_twice)
                    if str(v.status) != "verified":
                        self.lost_reasons.update(
                            f"{f.from_channel}->{f.to_channel}:{f.reason}" for f in v.fallbacks
                        )

        for i in range(0, len(self.users), 2000):
            await asyncio.gather(*(one(u) for u in self.users[i : i + 2000]))
        return out

    # ------------------------------------------------------------------ figures

    def figures(
        self,
        *,
        statuses: dict[str, tuple[str, bool]],
        exits: dict[str, int],
        telegram_log: list[dict[str, Any]],
        twilio_log: list[dict[str, Any]],
        telegram_state: list[dict[str, Any]],
        dead: list[str],
        drained: bool,
        users_done: float,
    ) -> dict[str, Any]:
        """Count what the emulators saw and what the store holds."""
        ours = {u.phone for u in self.users}
        telegram_sends = Counter(
            e["phone_number"] for e in telegram_log if e["method"] == SEND and e["outcome"] == "ok"
        )
        sms_created = Counter(e["to"] for e in twilio_log if e.get("sid"))
        kept_telegram = {
            r["phone_number"]
            for r in telegram_state
            if r.get("delivery_status", {}).get("status") in ("delivered", "read")
            and not r.get("is_refunded")
        }
        lost = [u for u in self.users if statuses.get(u.vid, ("missing", False))[0] != "verified"]
        per_kind: dict[str, Counter[str]] = {}
        for u in self.users:
            c = per_kind.setdefault(u.kind, Counter())
            c["verifications"] += 1
            c["verified"] += statuses.get(u.vid, ("missing", False))[0] == "verified"
            c[f"via_{u.via}"] += u.via is not None
            c["sms_created"] += sms_created[u.phone] > 0
        resumed = sum(
            1 for e in telegram_log if e["method"] == SEND and e["outcome"] == "MESSAGE_ALREADY_SENT"
        )
        to_code = sorted(u.code_at - u.enqueued_at for u in self.users if u.code_at is not None)
        logs = {name: _log_problems(self.workdir / f"{name}.log") for name in ("steady", "victim")}
        reclaimed = sum(log.pop("reclaimed", 0) for log in logs.values())
        counts = {
            "verifications": len(self.users),
            "enqueued": self.enqueued,
            "verified": len(self.users) - len(lost),
            "lost": len(lost),
            "lost_by_outcome": dict(Counter(u.outcome for u in lost)),
            "final_status": dict(Counter(s for s, _ in statuses.values())),
            "check_outcome": dict(Counter(u.outcome for u in self.users)),
            "duplicated_telegram_sends": sum(1 for p, n in telegram_sends.items() if n > 1),
            "duplicated_sms": sum(1 for p, n in sms_created.items() if n > 1),
            "users_who_saw_two_codes": sum(1 for u in self.users if len(u.saw_codes) > 1),
            "telegram_sends": sum(telegram_sends.values()),
            "sms_created": sum(sms_created.values()),
            "sends_to_unknown_numbers": sum(1 for p in {*telegram_sends, *sms_created} if p not in ours),
            "paid_twice_emulators": len(kept_telegram & set(sms_created)),
            "paid_twice_router": sum(1 for _, twice in statuses.values() if twice),
            "resumed_sends_already_sent": resumed,
            "kills": len(self.kills),
            "victim_exit_statuses": dict(Counter(str(c) for c in self.victim_exits)),
            "final_exit_statuses": exits,
            "dead_letters": dict(Counter(dead)),
            "queue_drained": drained,
            "worker_log_problems": logs,
            "lost_fallback_reasons": dict(self.lost_reasons.most_common()),
            "reclaimed_messages": reclaimed,
        }
        counts["duplicated"] = (
            counts["duplicated_telegram_sends"] + counts["duplicated_sms"] + counts["users_who_saw_two_codes"]
        )
        timing = {
            "enqueue_s": round(self.producer_done - self.started, 1),
            "rate_configured": self.args.rate,
            "rate_achieved": round(self.enqueued / max(1e-9, self.producer_done - self.started), 2),
            "producer_behind_max_s": round(self.behind_max, 3),
            "until_last_user_s": round(users_done - self.started, 1),
            "code_seen_after_s": {
                "p50": _pct(to_code, 0.5),
                "p99": _pct(to_code, 0.99),
                "max": round(to_code[-1], 1) if to_code else None,
            },
            "kills_at_s": [round(k - self.started, 1) for k in self.kills],
        }
        return {
            "counts": counts,
            "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
            "timing": timing,
            "rss": rss_report(self.samples, self.started, self.producer_done, judge=not self.args.quick),
        }


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


def _log_problems(path: Path) -> dict[str, int]:
    """Lines in a worker log that say something went wrong (tracebacks, ERROR, CRITICAL), and
    messages the worker took over from a dead one (``event=reclaimed``: the kills' witness)."""
    out = Counter[str]()
    if not path.exists():
        return {}
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in log:
            if "event=reclaimed " in line:
                out["reclaimed"] += 1
            elif line.startswith("Traceback"):
                out["traceback"] += 1
            elif "level=ERROR" in line or " ERROR " in line:
                out["error"] += 1
            elif "level=CRITICAL" in line or " CRITICAL " in line:
                out["critical"] += 1
    return dict(out)


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in points) / den


def _lives(samples: Sequence[Sample]) -> Iterator[tuple[int, list[Sample]]]:
    by_life: dict[int, list[Sample]] = {}
    for s in samples:
        by_life.setdefault(s.life, []).append(s)
    yield from sorted(by_life.items())


def rss_report(samples: Sequence[Sample], start: float, end: float, *, judge: bool) -> dict[str, Any]:
    """The steady worker's memory over the run, and each victim life's.

    Warm-up: the first 10 % of the enqueueing window (at least 30 s) is left out of
    the fit, since caches, pools and the allocator's arenas fill then. The fit runs
    over the rest of the enqueueing window, while the load is steady.
    """
    steady = [s for s in samples if s.worker == "steady"]
    warm_end = start + max(30.0, 0.1 * (end - start))
    window = [s for s in steady if warm_end <= s.time <= end]
    slope = _slope([(s.time, float(s.rss_kib)) for s in window])
    out: dict[str, Any] = {"samples": len(steady), "interval_s": None}
    if len(steady) >= 2:
        out["interval_s"] = round((steady[-1].time - steady[0].time) / (len(steady) - 1), 2)
    if steady:
        out["steady"] = {
            "first_kib": steady[0].rss_kib,
            "after_warmup_kib": window[0].rss_kib if window else None,
            "end_kib": steady[-1].rss_kib,
            "max_kib": max(s.rss_kib for s in steady),
            "min_after_warmup_kib": min((s.rss_kib for s in window), default=None),
        }
    span = (window[-1].time - window[0].time) if len(window) >= 2 else 0.0
    growth = None if slope is None else slope * span
    base = window[0].rss_kib if window else None
    out["slope_kib_per_hour"] = None if slope is None else round(slope * 3600, 1)
    out["fitted_growth_kib"] = None if growth is None else round(growth, 1)
    out["fit_window_s"] = round(span, 1)
    if judge and growth is not None and base:
        out["flat"] = growth <= RSS_FLAT_SHARE * base
    else:
        out["flat"] = None
    out["victim_lives"] = [
        {
            "life": life,
            "samples": len(ss),
            "first_kib": ss[0].rss_kib,
            "max_kib": max(s.rss_kib for s in ss),
            "last_kib": ss[-1].rss_kib,
        }
        for life, ss in _lives([s for s in samples if s.worker == "victim"])
    ]
    # A coarse series for the report: the steady worker every ~5 % of the run.
    step = max(1, len(steady) // 20)
    out["steady_series"] = [
        {"t_s": round(s.time - start, 1), "enqueued": s.enqueued, "rss_kib": s.rss_kib}
        for s in steady[::step]
    ]
    return out


# --------------------------------------------------------------------------- report


def _mib(kib: int | float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def render(data: dict[str, Any]) -> str:
    """The Markdown report."""
    cfg, c, t, rss = data["config"], data["counts"], data["timing"], data["rss"]
    m = data["machine"]
    lines = [
        "# Soak: verifications through killed and restarted workers, with faults",
        "",
        f"Measured {data['date']} on {m['nproc']} CPUs ({m['cpu']}), {m['implementation']} {m['python']}, "
        f"{m['platform']}; load average at start {m['load_average_1min']}; otp-router at commit "
        f"{cfg['commit']}. The machine was shared with other work during the run.",
        "",
    ]
    if cfg["verifications"] < TARGET_VERIFICATIONS and not cfg["quick"]:
        lines += [
            f"**This run has {cfg['verifications']:,} verifications, not the {TARGET_VERIFICATIONS:,} "
            f"the soak is meant for.** {cfg['note'] or ''}".rstrip(),
            "",
        ]
    elif cfg["note"]:
        lines += [cfg["note"], ""]
    verdict = data["passed"]
    lines += [
        f"{c['verifications']:,} verifications enqueued at {cfg['rate']}/s (achieved "
        f"{t['rate_achieved']}/s over {t['enqueue_s']} s), each a distinct number; two "
        "`otp-router worker` processes on one Redis store and queue; the `victim` worker was killed "
        f"with SIGKILL {c['kills']} time(s) and restarted at once; emulated providers "
        f"{1 / cfg['time_scale']:.0f}x faster than real time; Telegram deadline {cfg['deliver_within']} s, "
        "then SMS.",
        "",
        f"**Result: {'passed' if verdict else 'FAILED'}.**",
        "",
        "| check | value |",
        "|---|---:|",
        f"| verified at the end | {c['verified']:,} of {c['verifications']:,} |",
        f"| **lost** (not verified) | **{c['lost']}** |",
        f"| **duplicated sends** (numbers with 2+ accepted Telegram sends / 2+ SMS created) "
        f"| **{c['duplicated_telegram_sends']} / {c['duplicated_sms']}** |",
        f"| fallbacks of the lost verifications | {_reasons(c.get('lost_fallback_reasons', {}))} |",
        f"| users who saw two different codes | {c['users_who_saw_two_codes']} |",
        f"| users who paid twice (Telegram delivered and kept, and an SMS; emulators / router) "
        f"| {c['paid_twice_emulators']} / {c['paid_twice_router']} |",
        f"| Telegram messages sent / SMS created | {c['telegram_sends']:,} / {c['sms_created']:,} |",
        "| sends re-issued after a kill, answered `MESSAGE_ALREADY_SENT` "
        f"| {c['resumed_sends_already_sent']} |",
        f"| kills (SIGKILL) | {c['kills']} at {', '.join(f'{k:g}' for k in t['kills_at_s']) or '-'} s |",
        f"| dead letters | {sum(c['dead_letters'].values())} |",
        f"| queue drained at the end | {'yes' if c['queue_drained'] else 'no'} |",
        f"| queue messages taken over from a killed worker | {c['reclaimed_messages']} |",
        f"| worker log problems (steady / victim) | {_problems(c['worker_log_problems'])} |",
        f"| code reached the user after (p50 / p99 / max) | {t['code_seen_after_s']['p50']} / "
        f"{t['code_seen_after_s']['p99']} / {t['code_seen_after_s']['max']} s |",
        "",
    ]
    steady = rss.get("steady", {})
    flat = {True: "flat", False: "**NOT flat**", None: "not judged (run too short)"}[rss["flat"]]
    lines += [
        "## Memory (RSS) of the steady worker",
        "",
        f"{rss['samples']} samples of `VmRSS` every {rss['interval_s']} s. Fit: least squares over "
        f"{rss['fit_window_s']} s of steady load after warm-up.",
        "",
        "| first | after warm-up | end | max | slope | fitted growth | verdict |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {_mib(steady.get('first_kib'))} MiB | {_mib(steady.get('after_warmup_kib'))} MiB "
        f"| {_mib(steady.get('end_kib'))} MiB | {_mib(steady.get('max_kib'))} MiB "
        f"| {_mib(rss['slope_kib_per_hour'])} MiB/h | {_mib(rss['fitted_growth_kib'])} MiB | {flat} |",
        "",
        f"Flat means a fitted growth of at most {RSS_FLAT_SHARE:.0%} of the RSS after warm-up.",
        "",
        "| t (s) | enqueued | RSS (MiB) |",
        "|---:|---:|---:|",
        *(f"| {p['t_s']} | {p['enqueued']:,} | {_mib(p['rss_kib'])} |" for p in rss["steady_series"]),
        "",
    ]
    if rss["victim_lives"]:
        lines += [
            "Victim worker, per life (killed at the end of each but the last):",
            "",
            "| life | samples | first | max | last |",
            "|---:|---:|---:|---:|---:|",
            *(
                f"| {v['life']} | {v['samples']} | {_mib(v['first_kib'])} | {_mib(v['max_kib'])} "
                f"| {_mib(v['last_kib'])} |"
                for v in rss["victim_lives"]
            ),
            "",
        ]
    lines += [
        "## Per behaviour",
        "",
        "| behaviour | script | verifications | verified | code via Telegram | via SMS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, k in data["per_kind"].items():
        script = ", ".join(f"`{a}={b}`" for a, b in FAULTS[kind][1].items()) or "-"
        lines.append(
            f"| {kind} | {script} | {k.get('verifications', 0):,} | {k.get('verified', 0):,} "
            f"| {k.get('via_telegram', 0):,} | {k.get('via_sms', 0):,} |"
        )
    lines += [
        "",
        "How it is counted: *lost* is read from the store (`OtpRouter.get`) after the last user is done; "
        "a user enters the first code that reached the phone (the emulators' inboxes), looking "
        f"{len(LOOKS)} times at most, until {cfg['give_up']} s after enqueueing. Duplicated sends are "
        "counted from the emulators' own request logs, not from anything the router reports.",
        "",
        f"Rerun: `python bench/soak.py --verifications {cfg['verifications']} --rate {cfg['rate']}` "
        "(see `bench/README.md`).",
    ]
    return "\n".join(lines)


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"`{k}` {n:,}" for k, n in reasons.items()) or "-"


def _problems(logs: dict[str, dict[str, int]]) -> str:
    def one(p: dict[str, int]) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(p.items())) or "none"

    return f"{one(logs.get('steady', {}))} / {one(logs.get('victim', {}))}"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--verifications", type=int, default=TARGET_VERIFICATIONS)
    parser.add_argument("--rate", type=float, default=25.0, help="verifications enqueued per second")
    parser.add_argument("--deliver-within", type=float, default=5.0, help="Telegram step deadline, s")
    parser.add_argument("--kill-min", type=float, default=60.0, help="shortest victim life, s")
    parser.add_argument("--kill-max", type=float, default=240.0, help="longest victim life, s")
    parser.add_argument(
        "--kills-at",
        type=float,
        nargs="*",
        help="kill at these fractions of the enqueueing window instead of at random",
    )
    parser.add_argument("--give-up", type=float, default=300.0, help="a user waits this long for a code, s")
    parser.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds to let the workers start")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--redis-url", help="Redis URL with a ?prefix= (default: 127.0.0.1:6379, fresh prefix)"
    )
    parser.add_argument("--note", default="", help="a sentence for the report (why the run is smaller...)")
    parser.add_argument(
        "--quick", action="store_true", help="the test suite's version: 500 verifications, one kill"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.verifications, args.rate, args.kills_at = 500, 25.0, [0.25]
        args.give_up, args.rss_interval, args.warmup = 150.0, 1.0, 2.0
    if args.verifications < 1 or args.rate <= 0 or args.kill_min <= 0 or args.kill_max < args.kill_min:
        parser.error("--verifications and --rate must be positive, 0 < --kill-min <= --kill-max")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="otp-soak-") as tmp:
        workdir = Path(tmp)
        async with emulator_process(workdir, "--time-scale", str(TIME_SCALE)) as emulator:
            soak = Soak(args, emulator, workdir)
            try:
                return await soak.run()
            finally:
                if soak.prefix is not None:
                    await redis_cleanup(soak.prefix)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, write the results; exit status 1 when something was lost, duplicated or grew."""
    args = parse_args(argv)
    if args.redis_url is None and not redis_available():
        print(f"{NAME}: needs Redis at 127.0.0.1:6379", file=sys.stderr)
        return 2
    config = {
        "verifications": args.verifications,
        "rate": args.rate,
        "deliver_within": args.deliver_within,
        "kill_min": args.kill_min,
        "kill_max": args.kill_max,
        "kills_at": args.kills_at,
        "give_up": args.give_up,
        "rss_interval": args.rss_interval,
        "seed": args.seed,
        "time_scale": TIME_SCALE,
        "faults": {k: {"weight": w, "script": s} for k, (w, s) in FAULTS.items()},
        "worker_env": WORKER_ENV,
        "quick": args.quick,
        "note": args.note,
        "commit": code_version(),
    }
    print(f"{NAME}: {args.verifications} verifications at {args.rate}/s", file=sys.stderr)
    started, mach = today(), machine()
    outcome = asyncio.run(_main(args))
    c = outcome["counts"]
    passed = (
        c["lost"] == 0
        and c["duplicated"] == 0
        and c["sends_to_unknown_numbers"] == 0
        and c["queue_drained"]
        and not c["dead_letters"]
        and outcome["rss"]["flat"] is not False
    )
    data = {
        "benchmark": NAME,
        "date": started,
        "machine": mach,
        "config": config,
        "passed": passed,
        **outcome,
    }
    if code_version() != config["commit"]:
        data["code_changed_during_run"] = code_version()
    publish(args.out, NAME, data, render(data))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
