"""Lag between a Telegram step's deadline and its SMS fallback, for 10,000 open verifications.

Run ``python bench/deadline_lag.py`` (about three minutes on 2 cores). It
writes ``bench/results/deadline_lag.md`` and ``.json``. It needs the Redis at
127.0.0.1:6379 for the Redis run; every key it writes is under a fresh prefix
and is deleted afterwards.

The routing policy is ``telegram(deliver_within=D)`` then ``sms``, and every
number is scripted so that its Telegram message is never delivered
(``telegram_never``). So each verification's one pending deadline is its
Telegram step deadline, ``sent_at + D``, and when it fires the router polls
``checkVerificationStatus`` (no delivery report: there is no public URL),
finds the message still undelivered and falls back to SMS.

Setting up (not timed): this process starts N verifications through the real
router (``OtpRouter.start``: probe, send, store writes) against the emulators.
Creating 10,000 takes far longer than the 10 s their deadlines must spread
over, so the creating router runs on an injected clock that records each
verification's Telegram send at ``T_i - D``: its stored deadline is then
``T_i``, with ``T_i`` spread evenly over the spread window, which starts after
creation and the worker's start-up are over. Every stored deadline is read
back from the store and checked before the worker starts. The creating router
has no deadline loop.

Measured: one ``otp-router worker`` child process (its deadline loop; HTTP
served on a free port; empty queue) fires the deadlines with the real clock,
or ``otp-router worker --processes N`` (a run ``STORE:SPREAD:N``): N worker
processes whose deadline loops claim from the one store, each claim atomic.
For each verification, the lag is the Twilio emulator's log time of its SMS
create minus its stored deadline (``time.time()`` on one machine on both
sides), split into *deadline → status poll* (the Telegram emulator's log time
of ``checkVerificationStatus``: claiming the deadline and loading the state)
and *status poll → SMS create* (the poll's round trip, applying it, the
fallback's store write and the Twilio SDK call). Also reported: the worker's
peak resident memory (``VmHWM`` from ``/proc/<pid>/status``; with several
processes the largest), its CPU per deadline (summed over its processes), and
the emulator's and Redis's CPU per deadline, from which the report derives
the cores the deadline rate needs. The run repeats on the Redis store and on
the SQLite store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from _results import DEFAULT_OUT, machine, publish, today
from _worker_harness import (
    REDIS_URL,
    Emulator,
    Sampler,
    code_version,
    emulator_process,
    process_cpu_seconds,
    redis_available,
    redis_cleanup,
    start_worker,
    stop_process,
    tree_cpu_seconds,
    tree_peak_rss_kib,
    unique_prefix,
)
from pydantic import SecretStr

from otp_router.config import FraudSettings, LimitSettings, Settings
from otp_router.core import AttemptPhase, VerificationState
from otp_router.harness import sample_numbers
from otp_router.metrics import NullMetrics
from otp_router.providers.base import ChannelName
from otp_router.router import OtpRouter

NAME = "deadline_lag"
#: Targets from the issue.
TARGET_P99_MS = 100.0
TARGET_RSS_MIB = 200.0
#: Regions the numbers are drawn from (``sample_numbers`` gives at most a few thousand per region).
REGIONS = ("GB", "DE", "FR", "NL", "ES", "IT", "SE", "PL")

#: The creating router's clock: a verification's fixed "now", or the real time when unset.
_FROZEN: contextvars.ContextVar[float | None] = contextvars.ContextVar("frozen_now", default=None)


def creation_clock() -> float:
    """``time.time()``, unless the current task pinned its verification's moment in ``_FROZEN``."""
    pinned = _FROZEN.get()
    return time.time() if pinned is None else pinned


def numbers(count: int) -> list[str]:
    """``count`` distinct valid mobile numbers, a share from each of several regions."""
    per = math.ceil(count / len(REGIONS))
    out: list[str] = []
    for region in REGIONS:
        out += sample_numbers(region, min(per, count - len(out)))
        if len(out) >= count:
            break
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of seconds, in milliseconds."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "p50": ms(percentile(values, 50)),
        "p90": ms(percentile(values, 90)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values, default=None)),
        "mean": ms(sum(values) / len(values) if values else None),
    }


# --------------------------------------------------------------------------- setting up


def write_policy(path: Path, deliver_within: float) -> Path:
    """``telegram(deliver_within=D, probe)`` then ``sms``, as a TOML policy file."""
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


async def create_verifications(
    settings: Settings,
    phones: Sequence[str],
    deadlines: Sequence[float],
    deliver_within: float,
    in_flight: int,
) -> list[str]:
    """Start one verification per number, its Telegram send recorded at ``deadline - D``.

    Returns:
        The verification ids, in the order of ``phones``.
    """
    router = OtpRouter.from_settings(
        settings, clock=creation_clock, run_deadlines=False, metrics=NullMetrics()
    )
    ids: list[str] = [""] * len(phones)
    work = iter(range(len(phones)))

    async def creator() -> None:
        for i in work:
            token = _FROZEN.set(deadlines[i] - deliver_within)
            try:
                verification = await router.start(phones[i], idempotency_key=f"deadline-{i}")
            finally:
                _FROZEN.reset(token)
            ids[i] = verification.id

    async with router:
        await asyncio.gather(*(creator() for _ in range(in_flight)))
    return ids


async def stored_deadlines(settings: Settings, ids: Sequence[str]) -> tuple[dict[str, float], int]:
    """Each verification's deadline as stored, by phone; and how many are not awaiting Telegram."""
    router = OtpRouter.from_settings(settings, run_deadlines=False, metrics=NullMetrics())
    out: dict[str, float] = {}
    wrong = 0
    try:
        for vid in ids:
            record = await router.store.get(vid)
            if record is None:
                wrong += 1
                continue
            state = VerificationState.model_validate_json(record.data)
            cur = state.current
            awaiting = (
                cur is not None and cur.channel is ChannelName.TELEGRAM and cur.phase is AttemptPhase.AWAITING
            )
            if state.deadline is None or not awaiting:
                wrong += 1
                continue
            out[state.phone] = state.deadline
    finally:
        await router.aclose()
    return out, wrong


def _count(path: Path, text: str) -> int:
    # A small log file read a few times at start-up: blocking for it is harmless.
    return path.read_text(encoding="utf-8", errors="replace").count(text) if path.exists() else 0


async def _redis_pid() -> int | None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        info: dict[str, Any] = await client.info("server")
        return int(info["process_id"])
    except (KeyError, ValueError):
        return None
    finally:
        await client.aclose()


async def wait_for_line(
    path: Path, text: str, process: asyncio.subprocess.Process, within: float, count: int = 1
) -> float:
    """Wait until ``text`` appears ``count`` times in the log file ``path``; return when it was seen."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        if process.returncode is not None:
            raise RuntimeError(f"the worker exited ({process.returncode}); see {path}")
        if _count(path, text) >= count:
            return time.time()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the worker did not log {text!r} within {within} s")


# --------------------------------------------------------------------------- one store


async def run_store(
    store: str,
    spread: float,
    processes: int,
    args: argparse.Namespace,
    emulator: Emulator,
    admin: aiohttp.ClientSession,
    phones: Sequence[str],
    workdir: Path,
) -> dict[str, Any]:
    """Create, fire and measure deadlines spread over ``spread`` s on one store kind (redis or sqlite)."""
    await emulator.reset(admin)
    prefixes: list[str] = []

    def store_url(tag: str) -> str:
        if store == "redis":
            prefixes.append(unique_prefix(f"deadline-{tag}"))
            return f"{REDIS_URL}?prefix={prefixes[-1]}"
        return f"sqlite:///{workdir / f'{store}-{tag}-{secrets.token_hex(4)}.db'}"

    base = emulator.settings(
        code_secret=SecretStr(secrets.token_hex(16)),
        policy_file=write_policy(workdir / "policy.toml", args.deliver_within),
        # Rate limits off: 10,000 starts from one process in seconds would (rightly) be refused.
        limits=LimitSettings(per_phone=0, per_prefix=0, per_country=0),
        fraud=FraudSettings(min_conversion=0),
        # Settling costs later than any deadline here, so the Telegram step deadline is the one that fires.
        settle_delay=max(3600.0, 10 * args.deliver_within),
        http_port=0,
    )
    try:
        # Calibrate: how fast does this process create verifications on this store?
        calibration = base.model_copy(update={"store_url": store_url("calibration")})
        sample = sample_numbers("BE", args.calibration)
        began = time.time()
        far = [began + 10 * 86400.0] * len(sample)
        await create_verifications(calibration, sample, far, args.deliver_within, args.in_flight)
        rate = len(sample) / (time.time() - began)
        await emulator.reset(admin)

        settings = base.model_copy(update={"store_url": store_url("run")})
        n = len(phones)
        began = time.time()
        first = began + 1.3 * n / rate + args.start_margin
        deadlines = [first + spread * i / n for i in range(n)]
        print(
            f"  {store}: creating {n} verifications (~{n / rate:.0f} s at {rate:.0f}/s); "
            f"deadlines from +{first - began:.0f} s over {spread:g} s",
            file=sys.stderr,
        )
        ids = await create_verifications(settings, phones, deadlines, args.deliver_within, args.in_flight)
        created = time.time()
        stored, wrong = await stored_deadlines(settings, ids)
        expected = dict(zip(phones, deadlines, strict=True))
        mismatched = sum(1 for p, d in stored.items() if abs(d - expected[p]) > 1e-3)

        log_file = workdir / f"worker-{store}-{processes}.log"
        spawned = time.time()
        process = await start_worker(
            settings,
            "--name",
            f"bench-deadlines-{store}",
            *(("--processes", str(processes)) if processes > 1 else ()),
            workdir=workdir,
            log_file=log_file,
        )
        redis_pid = await _redis_pid() if store == "redis" else None
        try:
            ready = await wait_for_line(log_file, "event=worker_started", process, within=60, count=processes)
            rss_ready = tree_peak_rss_kib(process.pid)
            if ready > first:
                print(f"  {store}: WARNING the worker was ready {ready - first:.1f} s late", file=sys.stderr)
            async with (
                Sampler(process.pid, interval=0.05, read=tree_cpu_seconds) as sampler,
                Sampler(emulator.process.pid, interval=0.05) as emulator_samples,
                Sampler(
                    redis_pid or 0, interval=0.05, read=process_cpu_seconds if redis_pid else _none
                ) as redis,
            ):
                await asyncio.sleep(max(0.0, first + spread - time.time()))
                sms_log: list[dict[str, Any]] = []
                wanted = set(stored)
                until = time.time() + args.drain_timeout
                while True:
                    sms_log = await emulator.twilio_log(admin)
                    if (
                        len({e["to"] for e in sms_log if e["sid"]} & wanted) >= len(wanted)
                        or time.time() > until
                    ):
                        break
                    await asyncio.sleep(args.check_every)
                finished = time.time()
            memory = tree_peak_rss_kib(process.pid)
            worker_cpu = sampler.cpu_between(first, finished)
            emulator_cpu = emulator_samples.cpu_between(first, finished)
            redis_cpu = redis.cpu_between(first, finished)
        finally:
            status = await stop_process(process)
        telegram_log = await emulator.telegram_log(admin)
    finally:
        for prefix in prefixes:
            await redis_cleanup(prefix)
    return measure(
        store=store,
        spread=spread,
        processes=processes,
        stored=stored,
        wrong=wrong,
        mismatched=mismatched,
        sms_log=sms_log,
        telegram_log=telegram_log,
        timing={
            "rate_created_per_s": round(n / (created - began), 1),
            "creation_s": round(created - began, 2),
            "worker_ready_before_first_deadline_s": round(first - ready, 2),
            "worker_startup_s": round(ready - spawned, 2),
            "first_deadline": first,
            "spread_s": spread,
        },
        memory={"ready": rss_ready, "end": memory},
        worker_cpu_s=worker_cpu,
        emulator_cpu_s=emulator_cpu,
        redis_cpu_s=redis_cpu,
        worker_exit=status,
    )


def _none(_pid: int) -> float | None:
    return None


def measure(
    *,
    store: str,
    spread: float,
    processes: int,
    stored: dict[str, float],
    wrong: int,
    mismatched: int,
    sms_log: Sequence[dict[str, Any]],
    telegram_log: Sequence[dict[str, Any]],
    timing: dict[str, Any],
    memory: dict[str, dict[str, int]],
    worker_cpu_s: float | None,
    emulator_cpu_s: float | None,
    redis_cpu_s: float | None,
    worker_exit: int,
) -> dict[str, Any]:
    """Lags from the emulators' logs against the stored deadlines."""
    sms_at: dict[str, float] = {}
    sms_count: dict[str, int] = {}
    for entry in sms_log:
        if entry["sid"]:
            sms_count[entry["to"]] = sms_count.get(entry["to"], 0) + 1
            sms_at.setdefault(entry["to"], entry["time"])
    poll_at: dict[str, float] = {}
    for entry in telegram_log:
        if entry["method"] == "checkVerificationStatus" and entry["phone_number"]:
            poll_at.setdefault(entry["phone_number"], entry["time"])
    lags, to_poll, poll_to_sms = [], [], []
    for phone, deadline in stored.items():
        if phone not in sms_at:
            continue
        lags.append(sms_at[phone] - deadline)
        if phone in poll_at:
            to_poll.append(poll_at[phone] - deadline)
            poll_to_sms.append(sms_at[phone] - poll_at[phone])
    fired = sorted(sms_at[p] for p in stored if p in sms_at)
    firing_s = fired[-1] - fired[0] if len(fired) > 1 else None
    end, ready = memory["end"], memory["ready"]
    peak_mib = end["VmHWM"] / 1024 if "VmHWM" in end else None
    p99 = percentile(lags, 99)

    def per_deadline(seconds: float | None) -> float | None:
        return round(1000 * seconds / len(lags), 3) if seconds is not None and lags else None

    rate = (len(stored) + wrong) / spread
    parts = [per_deadline(worker_cpu_s), per_deadline(emulator_cpu_s)]
    if store == "redis":
        parts.append(per_deadline(redis_cpu_s))
    all_ms = None if any(p is None for p in parts) else sum(p or 0.0 for p in parts)
    return {
        "store": store,
        "spread_s": spread,
        "processes": processes,
        "deadlines_per_s": round((len(stored) + wrong) / spread, 1),
        "verifications": len(stored) + wrong,
        "deadlines_checked": len(stored),
        "not_awaiting_telegram": wrong,
        "deadline_mismatches": mismatched,
        "sms_sent": len(lags),
        "sms_missing": len(stored) - len(lags),
        "sms_duplicates": sum(1 for c in sms_count.values() if c > 1),
        "sms_before_deadline": sum(1 for lag in lags if lag < 0),
        "status_polls": len(poll_at),
        "lag_ms": distribution_ms(lags),
        "deadline_to_poll_ms": distribution_ms(to_poll),
        "poll_to_sms_ms": distribution_ms(poll_to_sms),
        "sms_per_s_while_firing": round(len(fired) / firing_s, 1) if firing_s else None,
        "worker_cpu_s": None if worker_cpu_s is None else round(worker_cpu_s, 2),
        "worker_cpu_ms_per_deadline": per_deadline(worker_cpu_s),
        "emulator_cpu_ms_per_deadline": per_deadline(emulator_cpu_s),
        "redis_cpu_ms_per_deadline": per_deadline(redis_cpu_s) if store == "redis" else None,
        # CPU of worker + emulator (+ Redis) per deadline, and the cores the run's deadline rate needs.
        "all_cpu_ms_per_deadline": None if all_ms is None else round(all_ms, 3),
        "cores_needed": None if all_ms is None else round(rate * all_ms / 1000, 2),
        "worker_rss_ready_mib": round(ready["VmRSS"] / 1024, 1) if "VmRSS" in ready else None,
        "worker_peak_rss_mib": None if peak_mib is None else round(peak_mib, 1),
        "worker_exit": worker_exit,
        "timing": timing,
        "target_p99_met": p99 is not None and 1000 * p99 <= TARGET_P99_MS,
        "target_rss_met": peak_mib is not None and peak_mib <= TARGET_RSS_MIB,
    }


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(data: dict[str, Any]) -> str:
    """The Markdown report."""
    cfg, mach = data["config"], data["machine"]
    lines = [
        "# Deadline lag: Telegram step deadline to SMS fallback",
        "",
        f"Measured {data['date']} on {mach['nproc']} CPUs ({mach['cpu'] or 'unknown CPU'}), "
        f"{mach['implementation']} {mach['python']}, {mach['platform']}; "
        f"load average at start {mach['load_average_1min']}; otp-router at commit {cfg['commit']}"
        + (
            f" (**changed to {data['code_changed_during_run']} during the run**)."
            if data.get("code_changed_during_run")
            else "."
        ),
        "",
        f"Each run: {cfg['verifications']} open verifications whose Telegram step deadlines are spread "
        "evenly over the run's spread, policy "
        f"`telegram(deliver_within={cfg['deliver_within_s']:g}s)` then `sms`, every number scripted so "
        "Telegram never delivers; one `otp-router worker` child process fires them (`--processes N` for the "
        "runs with several). Emulators in a separate "
        f"process. Targets: p99 lag ≤ {TARGET_P99_MS:g} ms, worker peak RSS ≤ {TARGET_RSS_MIB:g} MiB "
        "(the issue's load is the 10 s spread, 1,000 deadlines/s; a longer spread, if present, is a "
        "lighter load for comparison).",
        "",
        "| store | worker processes | spread (deadlines/s) | SMS sent "
        "| lag p50 | lag p90 | lag p99 | lag max "
        "| deadline → poll p50 / p99 | poll → SMS p50 / p99 | SMS/s while firing "
        "| worker CPU ms/deadline | worker peak RSS | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in data["runs"]:
        lag, a, b = run["lag_ms"], run["deadline_to_poll_ms"], run["poll_to_sms_ms"]
        met = [
            f"p99 {'met' if run['target_p99_met'] else 'not met'}",
            f"RSS {'met' if run['target_rss_met'] else 'not met'}",
        ]
        lines.append(
            f"| {run['store']} | {run.get('processes', 1)} "
            f"| {run['spread_s']:g} s ({run['deadlines_per_s']:.0f}/s) "
            f"| {run['sms_sent']}/{run['verifications']} | {_fmt(lag['p50'], '.0f')} ms "
            f"| {_fmt(lag['p90'], '.0f')} ms | {_fmt(lag['p99'], '.0f')} ms | {_fmt(lag['max'], '.0f')} ms "
            f"| {_fmt(a['p50'], '.0f')} / {_fmt(a['p99'], '.0f')} ms | {_fmt(b['p50'], '.0f')} / "
            f"{_fmt(b['p99'], '.0f')} ms | {_fmt(run['sms_per_s_while_firing'], '.0f')} "
            f"| {_fmt(run['worker_cpu_ms_per_deadline'], '.2f')} "
            f"| {_fmt(run['worker_peak_rss_mib'], '.0f')} MiB "
            f"| {', '.join(met)} |"
        )
    lines += [
        "",
        "Lag = the Twilio emulator's log time of the verification's SMS create minus the deadline "
        "stored for it (both `time.time()` on this machine). It is made of *deadline → poll*: the "
        "deadline loop claiming the deadline (`claim_due`, up to 200 at a time) and loading the state, "
        "until the Telegram emulator receives `checkVerificationStatus` (no delivery report arrives "
        "without a public URL, so the router polls before falling back); and *poll → SMS*: the poll's "
        "answer, applying it, the fallback's compare-and-set write and the Twilio SDK call until the "
        "Twilio emulator receives the create. When the worker fires fewer SMS per second than deadlines "
        "come due, the backlog, not the per-deadline work, makes the lag: compare *SMS/s while firing* "
        "with the deadline rate above.",
        "",
        "What the deadline rate costs in CPU (per deadline, from `/proc` in the firing window; the worker's "
        "summed over its processes), and the cores that rate needs on this machine's 2, where the "
        "worker, the emulator and Redis all run:",
        "",
        "| store | worker processes | deadlines/s | worker | emulator | Redis | all | cores needed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {run['store']} | {run.get('processes', 1)} | {run['deadlines_per_s']:.0f} "
            f"| {_fmt(run['worker_cpu_ms_per_deadline'], '.2f')} ms "
            f"| {_fmt(run.get('emulator_cpu_ms_per_deadline'), '.2f')} ms "
            f"| {_fmt(run.get('redis_cpu_ms_per_deadline'), '.2f')} ms "
            f"| {_fmt(run.get('all_cpu_ms_per_deadline'), '.2f')} ms "
            f"| {_fmt(run.get('cores_needed'), '.2f')} |"
            for run in data["runs"]
        ),
        "",
        "When *cores needed* is near or above the cores the machine has (less what other programs use: "
        f"load average {mach['load_average_1min']} at the start), the deadlines come due faster than "
        "this machine can fire them, however many worker processes share the work, and the backlog "
        "makes the lag.",
        "",
        "Checks per run:",
        "",
    ]
    for run in data["runs"]:
        t = run["timing"]
        lines.append(
            f"- {run['store']}, {run['spread_s']:g} s, {run.get('processes', 1)} process(es): "
            f"{run['deadlines_checked']} deadlines read back "
            "from the store "
            f"({run['deadline_mismatches']} off the planned time, "
            f"{run['not_awaiting_telegram']} not awaiting Telegram); {run['status_polls']} status polls; "
            f"{run['sms_missing']} SMS missing, "
            f"{run['sms_duplicates']} numbers with two SMS, {run['sms_before_deadline']} SMS before the "
            f"deadline; creation {t['creation_s']} s ({t['rate_created_per_s']}/s, not timed); worker "
            f"start-up {t['worker_startup_s']} s, ready {t['worker_ready_before_first_deadline_s']} s before "
            f"the first deadline; RSS {_fmt(run['worker_rss_ready_mib'], '.0f')} MiB when ready, peak "
            f"{_fmt(run['worker_peak_rss_mib'], '.0f')} MiB (`VmHWM`, the largest process); "
            f"worker CPU {run['worker_cpu_s']} s "
            f"from the first deadline until all SMS were seen (checked every {cfg['check_every_s']:g} s, so "
            f"it includes up to that much idle time); exit status {run['worker_exit']}."
        )
    lines += [
        "",
        "How the deadlines were spread: this process created the verifications through the real router "
        "(probe, send, store writes) with an injected clock that records each Telegram send at "
        "`T_i - D`, so the stored deadline is `T_i`, evenly spaced after creation and the worker's "
        "start-up (creating 10,000 takes longer than 10 s). The worker uses the real clock.",
        "",
        "Rerun: `python bench/deadline_lag.py` (see `bench/README.md`).",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One emulator process; one measured run per store."""
    phones = numbers(args.verifications)
    runs = []
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as tmp:
        workdir = Path(tmp)
        async with emulator_process(workdir) as emulator, aiohttp.ClientSession() as admin:
            never = {"telegram_never": True}
            await emulator.script(
                admin, {p: never for p in (*phones, *sample_numbers("BE", args.calibration))}
            )
            for store, spread, processes in args.runs:
                result = await run_store(store, spread, processes, args, emulator, admin, phones, workdir)
                lag = result["lag_ms"]
                print(
                    f"  {store} over {spread:g} s, {processes} process(es): "
                    f"lag p50 {lag['p50']} ms, p99 {lag['p99']} ms, "
                    f"max {lag['max']} ms; "
                    f"peak RSS {result['worker_peak_rss_mib']} MiB; SMS {result['sms_sent']}",
                    file=sys.stderr,
                )
                runs.append(result)
    return runs


def _run_spec(text: str) -> tuple[str, float, int]:
    """``STORE:SECONDS[:PROCESSES]`` as a tuple (one process unless given)."""
    store, spread, *rest = text.split(":")
    if len(rest) > 1:
        raise ValueError(text)
    return store.strip(), float(spread), int(rest[0]) if rest else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--verifications", type=int, default=10_000, help="open verifications (default: %(default)s)"
    )
    parser.add_argument(
        "--deliver-within",
        type=float,
        default=300.0,
        help="the Telegram step's deliver_within D, seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--runs",
        default="redis:10,redis:10:2,sqlite:10,redis:40",
        help="comma-separated STORE:SPREAD[:PROCESSES] runs, STORE redis or sqlite, SPREAD the seconds the "
        "deadlines spread over, PROCESSES the worker processes (--processes; default 1) (default: "
        "%(default)s; the last one is a lighter load, for comparison)",
    )
    parser.add_argument(
        "--in-flight", type=int, default=100, help="concurrent starts while creating (default: %(default)s)"
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=300,
        help="verifications created first to time creation (default: %(default)s)",
    )
    parser.add_argument(
        "--start-margin",
        type=float,
        default=8.0,
        help="seconds left for the worker's start-up before the first deadline (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds after the last deadline to wait for the SMS (default: %(default)s)",
    )
    parser.add_argument(
        "--check-every",
        type=float,
        default=1.0,
        help="seconds between reads of the SMS log after the last deadline (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 100 verifications over 1 s (numbers meaningless)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.verifications, args.calibration, args.drain_timeout, args.start_margin = 100, 30, 20.0, 1.5
        args.runs, args.check_every = "redis:1,redis:1:2,sqlite:1", 0.2
    try:
        args.runs = [_run_spec(r) for r in args.runs.split(",")]
    except ValueError:
        parser.error("--runs takes STORE:SECONDS[:PROCESSES], e.g. redis:10,redis:10:2,sqlite:10")
    if not args.runs or any(
        store not in ("redis", "sqlite") or spread <= 0 or processes < 1
        for store, spread, processes in args.runs
    ):
        parser.error("--runs: STORE is redis or sqlite, SECONDS is positive, PROCESSES at least 1")
    if min(args.verifications, args.in_flight, args.calibration) < 1:
        parser.error("--verifications, --in-flight and --calibration must be positive")
    if args.deliver_within < 30:
        parser.error("--deliver-within must be at least 30 (Telegram's smallest ttl)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results; exit status 1 if an SMS was missing or early."""
    args = parse_args(argv)
    if any(store == "redis" for store, _, _ in args.runs) and not redis_available():
        print(
            f"{NAME}: a redis run needs Redis at 127.0.0.1:6379 (or pass --runs sqlite:10)", file=sys.stderr
        )
        return 2
    config = {
        "verifications": args.verifications,
        "runs": [{"store": s, "spread_s": spread, "processes": n} for s, spread, n in args.runs],
        "deliver_within_s": args.deliver_within,
        "check_every_s": args.check_every,
        "in_flight_while_creating": args.in_flight,
        "quick": args.quick,
        "commit": code_version(),
        "target_p99_ms": TARGET_P99_MS,
        "target_peak_rss_mib": TARGET_RSS_MIB,
    }
    print(f"{NAME}: {config}", file=sys.stderr)
    # Before the run: the load average should say how busy the machine was before we added to it.
    started, mach = today(), machine()
    runs = asyncio.run(run(args))
    errors = sum(r["sms_missing"] + r["sms_before_deadline"] + r["sms_duplicates"] for r in runs)
    errors += sum(r["deadline_mismatches"] + r["not_awaiting_telegram"] for r in runs)
    data: dict[str, Any] = {
        "benchmark": NAME,
        "date": started,
        "machine": mach,
        "config": config,
        "errors": errors,
        "runs": runs,
    }
    if code_version() != config["commit"]:
        # Another change landed mid-run: child processes started later may have run other code.
        data["code_changed_during_run"] = code_version()
    markdown = render(data)
    publish(args.out, NAME, data, markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
