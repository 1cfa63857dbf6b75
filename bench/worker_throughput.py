"""Verifications per second of one ``otp-router worker`` draining a Redis queue, beside bare-client baselines.

Run ``python bench/worker_throughput.py`` (about two minutes on 2 cores). It
writes ``bench/results/worker_throughput.md`` and ``.json``. It needs the
Redis at 127.0.0.1:6379; every key it writes is under a fresh prefix and is
deleted afterwards.

The Telegram Gateway and Twilio emulators run in their own process
(``otp-router emulate``). Every number is scripted as a normal Telegram user,
so each verification is exactly two Gateway calls: ``checkSendAbility``, then
``sendVerificationMessage`` with the probe's ``request_id``. Three sides do
that work for the same distinct numbers, with the same number in flight (the
worker's ``settings.concurrency``):

* ``worker``: N messages are enqueued first (``XADD``), then one
  ``otp-router worker --burst`` child process drains them: Redis Streams
  consumer group, ``router.start`` (store writes with compare-and-set,
  rate-limit counters, code derivation, the lifecycle core, metrics, one log
  line per message), acknowledgement. Its window runs from the first
  ``checkSendAbility`` the emulator receives to the moment the stream is
  empty (every message acknowledged); its CPU in that window is read from
  ``/proc`` (start-up and shutdown left out; the whole child's CPU from
  ``getrusage(RUSAGE_CHILDREN)`` is reported too).
* ``worker_2p``: the same with ``otp-router worker --burst --processes 2``:
  a supervisor and two worker processes in one consumer group, each with
  ``settings.concurrency`` in flight; their CPU is the sum over the process
  tree. From its CPU per verification and the emulator's and Redis's, the
  report computes the ceiling the machine's cores allow
  (cores * 1000 / (worker + emulator + Redis CPU ms per verification)) and,
  because other programs share the machine, the ceiling after the CPU they
  used in the same window (``/proc/stat`` busy time minus ours).
* ``httpx_aiohttp``: the same two calls per number through
  ``otp_router.http.create_http_client()`` (httpx over httpx-aiohttp, the
  router's HTTP stack) in this process, with no router around them:
  baseline (a).
* ``aiohttp``: the same two calls through a bare ``aiohttp.ClientSession``:
  baseline (b).

Rounds alternate between the sides (the order rotates each round), the
emulators are reset before each round, and one untimed warm-up round of each
side comes first. Reported: medians over rounds of verifications per second
and CPU milliseconds per verification, the ratios worker/(a) and worker/(b),
and the emulator's and Redis's CPU per verification. The issue's target is
worker >= 0.5 x baseline (a); when the median falls short, a cProfile of an
in-process worker draining the same queue is added, showing where its CPU
goes per verification. Timings are noisy on a small machine: compare ratios
within one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import pstats
import re
import resource
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import httpx
import redis.asyncio as aioredis
from _results import DEFAULT_OUT, machine, median, publish, ratio, today
from _worker_harness import (
    REDIS_URL,
    Emulator,
    Sampler,
    code_version,
    emulator_process,
    machine_busy_seconds,
    process_cpu_seconds,
    redis_available,
    redis_cleanup,
    start_worker,
    stop_process,
    tree_cpu_seconds,
    unique_prefix,
)
from pydantic import SecretStr
from redis.utils import HIREDIS_AVAILABLE

from otp_router.config import FraudSettings, HttpSettings, LimitSettings, Settings
from otp_router.harness import sample_numbers
from otp_router.http import create_http_client
from otp_router.queue import QueueMessage, RedisStreamQueue
from otp_router.store.redis import RedisStore
from otp_router.worker import Worker

NAME = "worker_throughput"
SIDES = ("worker", "worker_2p", "worker_cluster", "httpx_aiohttp", "aiohttp")
#: Worker processes per worker side.
PROCESSES = {"worker": 1, "worker_2p": 2, "worker_cluster": 1}
#: The side on a local three-master Redis Cluster (run when redis-server and redis-cli are installed).
CLUSTER_SIDE = "worker_cluster"
#: Share of the cores' ceiling two processes should reach.
TARGET_OF_CEILING = 0.9
BASELINE_A, BASELINE_B = "httpx_aiohttp", "aiohttp"
#: The issue's target: the worker reaches at least this share of baseline (a).
TARGET = 0.5
#: Seconds a drained ``--burst`` worker may take to exit before the round counts as failed.
EXIT_WITHIN = 30.0
DESCRIPTIONS = {
    "worker": "`otp-router worker --burst` child process draining the Redis queue (the router's full path)",
    "worker_2p": "`otp-router worker --burst --processes 2`: a supervisor and two worker processes in one "
    "consumer group (CPU summed over the process tree)",
    "worker_cluster": "`otp-router worker --burst` with store and queue on a local three-master "
    "Redis Cluster (`cluster=1`; Redis CPU summed over the three nodes)",
    "httpx_aiohttp": "baseline (a): the two Gateway calls via `create_http_client()` "
    "(httpx over httpx-aiohttp), no router",
    "aiohttp": "baseline (b): the two Gateway calls via a bare `aiohttp.ClientSession`, no router",
}
#: Rate limits high enough never to refuse, low enough that the limiter's code path runs as in production.
LIMITS = LimitSettings(per_phone=1000, per_prefix=10_000_000, per_country=10_000_000)
#: The same for the conversion guard: nobody enters a code here, so a real threshold would block.
FRAUD = FraudSettings(prefix_min_started=10_000_000, country_min_started=10_000_000)

Post = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class Round:
    """One timed round of one side."""

    side: str
    index: int
    verifications: int
    errors: int
    wall_s: float
    cpu_s: float | None
    emulator_cpu_s: float | None
    redis_cpu_s: float | None = None
    #: Worker only: the child's whole life (start-up, draining, shutdown).
    process_wall_s: float | None = None
    process_cpu_s: float | None = None
    #: Worker only: Redis commands the server counted while the child ran (INFO commandstats).
    redis_commands: dict[str, int] = field(default_factory=dict)
    #: Worker only: busy CPU seconds of the whole machine, and of this process, in the window.
    machine_busy_s: float | None = None
    own_cpu_s: float | None = None
    #: Worker only: bytes the run left in Redis by kind of key (``rec``, ``ledger``, ``idem``...), estimated.
    redis_bytes: dict[str, int] = field(default_factory=dict)
    #: Cluster side only: each node's CPU seconds in the window.
    redis_node_cpu_s: list[float] = field(default_factory=list)
    error_types: dict[str, int] = field(default_factory=dict)

    def per_verification_ms(self, seconds: float | None) -> float | None:
        """``seconds`` per verification, in milliseconds."""
        if seconds is None or not self.verifications:
            return None
        return round(1000 * seconds / self.verifications, 4)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived per-verification figures."""
        data = asdict(self)
        for key in ("wall_s", "cpu_s", "emulator_cpu_s", "redis_cpu_s", "process_wall_s", "process_cpu_s"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        data["verifications_per_s"] = round(self.verifications / self.wall_s, 1) if self.wall_s > 0 else 0.0
        data["cpu_ms_per_verification"] = self.per_verification_ms(self.cpu_s)
        data["emulator_cpu_ms_per_verification"] = self.per_verification_ms(self.emulator_cpu_s)
        data["redis_cpu_ms_per_verification"] = self.per_verification_ms(self.redis_cpu_s)
        data["others_cores"] = self.others_cores()
        nodes = [self.per_verification_ms(cpu) for cpu in self.redis_node_cpu_s]
        data["redis_node_cpu_ms_per_verification"] = nodes
        data["redis_busiest_node_cpu_ms_per_verification"] = max(
            (n for n in nodes if n is not None), default=None
        )
        total = sum(self.redis_bytes.values())
        data["redis_bytes_per_verification"] = (
            round(total / self.verifications) if total and self.verifications else None
        )
        return data

    def others_cores(self) -> float | None:
        """Cores other programs kept busy during the window (machine busy time minus ours)."""
        parts = (self.machine_busy_s, self.cpu_s, self.emulator_cpu_s, self.redis_cpu_s, self.own_cpu_s)
        if any(part is None for part in parts) or self.wall_s <= 0:
            return None
        machine_s, worker_s, emulator_s, redis_s, own_s = (float(part or 0.0) for part in parts)
        return round(max(0.0, machine_s - worker_s - emulator_s - redis_s - own_s) / self.wall_s, 3)


# --------------------------------------------------------------------------- sides


def _code(i: int) -> str:
    return f"{(i * 7919) % 1_000_000:06d}"


async def verify_numbers(post: Post, phones: Sequence[str], concurrency: int) -> Counter[str]:
    """``checkSendAbility`` then ``sendVerificationMessage`` (with the ``request_id``) per number.

    Returns:
        Failures by kind (empty when every number got its two calls).
    """
    work = iter(enumerate(phones))
    errors: Counter[str] = Counter()

    async def one_at_a_time() -> None:
        for i, phone in work:
            try:
                probe = await post("checkSendAbility", {"phone_number": phone})
                if not probe.get("ok"):
                    raise RuntimeError(probe.get("error"))
                body = {
                    "phone_number": phone,
                    "request_id": probe["result"]["request_id"],
                    "code": _code(i),
                    "payload": "v_" + secrets.token_hex(16),
                    "ttl": 30,
                }
                sent = await post("sendVerificationMessage", body)
                if not sent.get("ok"):
                    raise RuntimeError(sent.get("error"))
            except Exception as exc:  # counted and reported, never hidden
                errors[type(exc).__name__] += 1

    await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    return errors


@contextlib.asynccontextmanager
async def baseline_client(side: str, emulator: Emulator, pool: int) -> AsyncIterator[Post]:
    """A ``post(method, body) -> envelope`` for one baseline side; connections close on exit."""
    headers = {"Authorization": f"Bearer {emulator.token}"}
    if side == "aiohttp":
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool)) as session:

            async def post_aiohttp(method: str, body: dict[str, Any]) -> dict[str, Any]:
                url = f"{emulator.telegram_url}/{method}"
                async with session.post(url, json=body, headers=headers) as response:
                    envelope: dict[str, Any] = await response.json()
                return envelope

            yield post_aiohttp
        return
    if side != "httpx_aiohttp":
        raise ValueError(f"unknown side {side!r}")
    client: httpx.AsyncClient = create_http_client(HttpSettings(max_connections=pool))
    try:

        async def post_httpx(method: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await client.post(f"{emulator.telegram_url}/{method}", json=body, headers=headers)
            envelope: dict[str, Any] = response.json()
            return envelope

        yield post_httpx
    finally:
        await client.aclose()


async def baseline_round(
    side: str, index: int, post: Post, phones: Sequence[str], concurrency: int, emulator_pid: int
) -> Round:
    """Time the two calls per number through one baseline client."""
    emu_before = process_cpu_seconds(emulator_pid)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    errors = await verify_numbers(post, phones, concurrency)
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    emu_after = process_cpu_seconds(emulator_pid)
    emu = None if emu_before is None or emu_after is None else emu_after - emu_before
    failed = sum(errors.values())
    return Round(side, index, len(phones) - failed, failed, wall, cpu, emu, error_types=dict(errors))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def enqueue(url: str, phones: Sequence[str], tag: str) -> None:
    """``XADD`` one message per number (distinct idempotency keys)."""
    queue = RedisStreamQueue(url)
    try:
        for i, phone in enumerate(phones):
            await queue.enqueue(QueueMessage(phone=phone, idempotency_key=f"{tag}-{i}"))
    finally:
        await queue.aclose()


async def _command_counts(client: aioredis.Redis) -> Counter[str]:
    """Server-wide calls per command so far (``INFO commandstats``)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


#: Keys per kind whose ``MEMORY USAGE`` is read to estimate what a run left in Redis.
MEMORY_SAMPLE = 50


async def stored_bytes(client: aioredis.Redis, prefix: str) -> dict[str, int]:
    """Bytes the run's keys take in Redis: per kind of key, their count times a sample's ``MEMORY USAGE``.

    Read from the keys themselves, so other clients of the same Redis do not
    change it (``used_memory`` is server-wide).
    """
    kinds: dict[str, list[bytes]] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = key.decode(errors="replace").removeprefix(f"{prefix}:").split(":", 1)[0]
        kinds.setdefault(kind, []).append(key)
    out: dict[str, int] = {}
    for kind, keys in sorted(kinds.items()):
        sample = keys[:: max(1, len(keys) // MEMORY_SAMPLE)][:MEMORY_SAMPLE]
        sizes = [int(await client.memory_usage(key) or 0) for key in sample]
        out[kind] = round(len(keys) * sum(sizes) / len(sizes))
    return out


async def _redis_pid(url: str = REDIS_URL) -> int | None:
    client = aioredis.Redis.from_url(url)
    try:
        info: dict[str, Any] = await client.info("server")
        return int(info["process_id"])
    except (KeyError, ValueError):
        return None
    finally:
        await client.aclose()


@dataclass(frozen=True, slots=True)
class Cluster:
    """The local three-master Redis Cluster of the ``worker_cluster`` side."""

    ports: list[int]
    pids: list[int]

    @property
    def seed(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"


def _cluster_starter(folder: Path) -> Any:
    """``running_cluster(folder)`` from the tests' ``redis_cluster.py``, the folder made first."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from redis_cluster import running_cluster

    folder.mkdir(parents=True, exist_ok=True)
    return running_cluster(folder)


@contextlib.asynccontextmanager
async def local_cluster(folder: Path) -> AsyncIterator[Cluster]:
    """Start a local three-master cluster for this run; stopped afterwards."""
    with _cluster_starter(folder) as ports:
        pids = []
        for port in ports:
            pid = await _redis_pid(f"redis://127.0.0.1:{port}/0")
            if pid is not None:
                pids.append(pid)
        yield Cluster(ports, pids)


def _node_cpu(pid: int) -> Callable[[int], float | None]:
    return lambda _ignored: process_cpu_seconds(pid)


async def worker_round(
    index: int,
    settings: Settings,
    phones: Sequence[str],
    emulator: Emulator,
    admin: aiohttp.ClientSession,
    workdir: Path,
    side: str = "worker",
    cluster: Cluster | None = None,
) -> Round:
    """Enqueue one message per number, then time an ``otp-router worker --burst`` child draining them."""
    processes = PROCESSES[side]
    prefix = unique_prefix("throughput")
    if side != CLUSTER_SIDE:
        cluster = None  # the other sides use the one Redis
    watcher: aioredis.Redis
    if side == CLUSTER_SIDE:
        assert cluster is not None
        from redis.asyncio.cluster import RedisCluster

        url = f"{cluster.seed}?cluster=1&prefix={prefix}"
        watcher = cast("aioredis.Redis", RedisCluster.from_url(cluster.seed))
        redis_pids = list(cluster.pids)
        stream = f"{prefix}:{{queue}}:stream"
    else:
        url = f"{REDIS_URL}?prefix={prefix}"
        watcher = aioredis.Redis.from_url(REDIS_URL)
        redis_pid = await _redis_pid()
        redis_pids = [redis_pid] if redis_pid else []
        stream = f"{prefix}:queue"
    round_settings = settings.model_copy(update={"store_url": url})
    try:
        await enqueue(url, phones, f"r{index}")
        # INFO commandstats of a cluster client would mix every node's counts: single Redis only.
        commands_before = await _command_counts(watcher) if cluster is None else Counter()
        children_before = _children_cpu()
        emu_before = process_cpu_seconds(emulator.process.pid)
        spawned = time.time()
        process = await start_worker(
            round_settings,
            "--burst",
            "--name",
            f"bench-{index}",
            *(("--processes", str(processes)) if processes > 1 else ()),
            workdir=workdir,
            log_file=workdir / "worker.log",
        )
        node_samples = [Sampler(pid, read=_node_cpu(pid)) for pid in redis_pids]
        read = tree_cpu_seconds if processes > 1 else process_cpu_seconds
        async with (
            Sampler(process.pid, read=read) as sampler,
            Sampler(process.pid, read=lambda _pid: machine_busy_seconds()) as busy,
            Sampler(os.getpid()) as own,
            contextlib.AsyncExitStack() as nodes,
        ):
            for node in node_samples:
                await nodes.enter_async_context(node)
            drained: float | None = None
            polls = 0
            hung = False
            # Generous: a worker that stops draining, or does not exit once drained, is a failure to report.
            give_up = spawned + 60 + len(phones) / 20
            while process.returncode is None:
                polls += drained is None
                if drained is None and int(await watcher.xlen(stream)) == 0:
                    drained = time.time()
                    give_up = drained + EXIT_WITHIN
                if time.time() > give_up:
                    hung = True
                    await stop_process(process, grace=5.0)
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=0.01)
            exited = time.time()
        if drained is None:
            drained = exited
        children_cpu = _children_cpu() - children_before
        # Leave out this process's own commands: the drain polls and the INFO that reads the counts.
        commands = (
            await _command_counts(watcher) - commands_before - Counter(xlen=polls, info=1)
            if cluster is None
            else Counter()
        )
        emu_after = process_cpu_seconds(emulator.process.pid)
        log = await emulator.telegram_log(admin)
        left = int(await watcher.xlen(stream))
        redis_bytes = await stored_bytes(watcher, prefix)
    finally:
        if cluster is None:
            await redis_cleanup(prefix)
        else:
            async for key in watcher.scan_iter(match=f"{prefix}:*", count=1000):
                await watcher.delete(key)
        await watcher.aclose()
    probes = [e for e in log if e["method"] == "checkSendAbility" and e["outcome"] == "ok"]
    sends = [e for e in log if e["method"] == "sendVerificationMessage" and e["outcome"] == "ok"]
    # A number counts as verified when it got exactly one accepted probe and one accepted send.
    per_phone = Counter(e["phone_number"] for e in probes) + Counter(e["phone_number"] for e in sends)
    done = sum(1 for phone in phones if per_phone[phone] == 2)
    errors: Counter[str] = Counter()
    if done < len(phones):
        errors["not_verified"] = len(phones) - done
    if left:
        errors["left_in_queue"] = left
    if hung:
        errors["drained_but_no_exit" if drained < exited else "stalled"] += 1
    elif process.returncode != 0:
        errors[f"exit_{process.returncode}"] += 1
    first = min((e["time"] for e in probes), default=spawned)
    node_cpu = [node.cpu_between(first, drained) for node in node_samples]
    emu = None if emu_before is None or emu_after is None else emu_after - emu_before
    return Round(
        side,
        index,
        done,
        sum(errors.values()),
        max(1e-9, drained - first),
        sampler.cpu_between(first, drained),
        emu,
        None if not node_cpu or None in node_cpu else sum(c or 0.0 for c in node_cpu),
        process_wall_s=exited - spawned,
        process_cpu_s=children_cpu,
        redis_commands=dict(commands),
        machine_busy_s=busy.cpu_between(first, drained),
        own_cpu_s=own.cpu_between(first, drained),
        redis_bytes=redis_bytes,
        redis_node_cpu_s=[c for c in node_cpu if c is not None] if cluster is not None else [],
        error_types=dict(errors),
    )


async def store_read_cpu_ms(reads: int, concurrency: int) -> float:
    """CPU milliseconds this process spends on one ``RedisStore.get`` (an HMGET round trip).

    The price of one store round trip through the router's own Redis client,
    to break the worker's CPU down: reads of a record the size of a stored state.
    """
    prefix = unique_prefix("reads")
    store = RedisStore(f"{REDIS_URL}?prefix={prefix}")
    try:
        await store.create("v_read", json.dumps({"pad": "x" * 1500}))
        work = iter(range(reads))

        async def reader() -> None:
            for _ in work:
                await store.get("v_read")

        before = time.process_time()
        await asyncio.gather(*(reader() for _ in range(concurrency)))
        return 1000 * (time.process_time() - before) / reads
    finally:
        await store.aclose()
        await redis_cleanup(prefix)


# --------------------------------------------------------------------------- profile


def _area(filename: str, function: str) -> str:
    """Which package a profiled function belongs to, for the per-area totals."""
    if filename == "~":
        # C functions: "<method 'send' of '_socket.socket' objects>", "<built-in method builtins.len>".
        owner = re.search(r"of '([^']+)'", function) or re.search(r"built-in method ([\w.]+)", function)
        name = owner.group(1) if owner else function
        return "C: " + (name.split(".")[0] if "." in name else name)
    if "/otp_router/" in filename:
        return "otp_router." + filename.rsplit("/otp_router/", 1)[1].removesuffix(".py").replace("/", ".")
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    stem = filename.rsplit("/lib/python", 1)[-1]
    parts = stem.split("/")
    return "stdlib " + (parts[1] if len(parts) > 1 else stem).removesuffix(".py")


def _short(filename: str, line: int, function: str) -> str:
    if filename == "~":
        return function
    for marker in ("/otp_router/", "site-packages/", "/lib/python3.11/"):
        if marker in filename:
            filename = filename.rsplit(marker, 1)[1]
            if marker == "/otp_router/":
                filename = "otp_router/" + filename
            break
    return f"{filename}:{line}({function})"


async def profile_worker(
    settings: Settings, phones: Sequence[str], emulator: Emulator, admin: aiohttp.ClientSession, workdir: Path
) -> dict[str, Any]:
    """cProfile an in-process worker (same settings, logging to a file) draining one queue of ``phones``."""
    prefix = unique_prefix("profile")
    url = f"{REDIS_URL}?prefix={prefix}"
    profiled_settings = settings.model_copy(update={"store_url": url})
    await emulator.reset(admin)
    handler = logging.FileHandler(workdir / "profile-worker.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    # Log exactly as the child does (INFO to a file): logging is part of the worker's cost.
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    profiler = cProfile.Profile()
    try:
        await enqueue(url, phones, "profile")
        worker = Worker(profiled_settings, name="bench-profile", burst=True, serve_http=False)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        profiler.enable()
        try:
            status = await worker.run()
        finally:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        await redis_cleanup(prefix)
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    n = len(phones)
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    rows = []
    areas: Counter[str] = Counter()
    for (filename, line, function), (_cc, ncalls, tt, ct, _callers) in raw.items():
        areas[_area(filename, function)] += tt
        rows.append((_short(filename, line, function), ncalls, tt, ct, filename))

    def us(seconds: float) -> float:
        return round(1e6 * seconds / n, 1)

    top_self = sorted(rows, key=lambda r: r[2], reverse=True)[:25]
    ours = sorted((r for r in rows if "/otp_router/" in r[4]), key=lambda r: r[3], reverse=True)[:25]
    return {
        "verifications": n,
        "exit_status": status,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "profiled_cpu_us_per_verification": us(total),
        "note": "cProfile slows Python code down (roughly 2x here); read the shares, not the absolute µs. "
        "It counts every resumption of a coroutine as a call, so calls/verif. of async functions is "
        "inflated; for C functions and plain functions it is exact.",
        "by_area": [
            {"area": area, "self_us_per_verification": us(tt), "share": round(tt / total, 4)}
            for area, tt in areas.most_common(20)
        ],
        "top_self": [
            {
                "function": name,
                "calls_per_verification": round(nc / n, 2),
                "self_us_per_verification": us(tt),
                "cumulative_us_per_verification": us(ct),
                "share": round(tt / total, 4),
            }
            for name, nc, tt, ct, _f in top_self
        ],
        "otp_router_cumulative": [
            {
                "function": name,
                "calls_per_verification": round(nc / n, 2),
                "cumulative_us_per_verification": us(ct),
                "self_us_per_verification": us(tt),
            }
            for name, nc, tt, ct, _f in ours
        ],
    }


# --------------------------------------------------------------------------- run and report


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round of every side against one emulator process; the profile if short of target."""
    phones = sample_numbers("GB", args.verifications)
    warm = sample_numbers("DE", args.warmup)
    results: list[Round] = []
    profile: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as outer:
            emulator = await outer.enter_async_context(emulator_process(workdir))
            admin = await outer.enter_async_context(aiohttp.ClientSession())
            cluster = (
                await outer.enter_async_context(local_cluster(workdir / "cluster")) if args.cluster else None
            )
            sides = [side for side in SIDES if side != CLUSTER_SIDE or cluster is not None]
            # Every number a normal Telegram user: on Telegram, delivered after about a second.
            await emulator.script(admin, {p: {"telegram": "ok"} for p in (*phones, *warm)})
            settings = emulator.settings(
                code_secret=SecretStr(secrets.token_hex(16)),
                concurrency=args.concurrency,
                limits=LIMITS,
                fraud=FRAUD,
                http_port=0,
            )
            pool = settings.http.max_connections
            async with contextlib.AsyncExitStack() as stack:
                posts = {
                    side: await stack.enter_async_context(baseline_client(side, emulator, pool))
                    for side in (BASELINE_A, BASELINE_B)
                }

                async def one(side: str, index: int, numbers: Sequence[str]) -> Round:
                    await emulator.reset(admin)
                    if side in PROCESSES:
                        return await worker_round(
                            index, settings, numbers, emulator, admin, workdir, side, cluster
                        )
                    return await baseline_round(
                        side, index, posts[side], numbers, args.concurrency, emulator.process.pid
                    )

                for side in sides:  # warm-up: connections, imports, caches
                    await one(side, -1, warm)
                for index in range(args.rounds):
                    for k in range(len(sides)):
                        side = sides[(index + k) % len(sides)]
                        result = await one(side, index, phones)
                        results.append(result)
                        row = result.to_dict()
                        print(
                            f"  round {index + 1}/{args.rounds} {side:<14} "
                            f"{row['verifications_per_s']:8.0f} verifications/s  "
                            f"{row['cpu_ms_per_verification'] or 0:6.3f} ms CPU/verification"
                            + (f"  errors {result.error_types}" if result.errors else ""),
                            file=sys.stderr,
                        )
            read_ms = await store_read_cpu_ms(args.store_reads, args.concurrency)
            summary = summarize(results)
            summary["breakdown"] = breakdown(summary, read_ms)
            short = (summary["ratios"]["worker/httpx_aiohttp"]["verifications_per_s"] or 0) < TARGET
            if args.profile == "always" or (args.profile == "auto" and short):
                print("  profiling an in-process worker ...", file=sys.stderr)
                profile = await profile_worker(settings, phones, emulator, admin, workdir)
    return {"rounds": results, "summary": summary, "profile": profile}


KEYS = (
    "verifications_per_s",
    "cpu_ms_per_verification",
    "emulator_cpu_ms_per_verification",
    "redis_cpu_ms_per_verification",
    "others_cores",
    "redis_bytes_per_verification",
    "redis_busiest_node_cpu_ms_per_verification",
)


def summarize(results: Sequence[Round]) -> dict[str, Any]:
    """Medians per side, ratios of the worker to each baseline."""
    sides: dict[str, Any] = {}
    for side in (s for s in SIDES if any(r.side == s for r in results)):
        rows = [r.to_dict() for r in results if r.side == side]
        med = {key: median([row[key] for row in rows]) for key in KEYS}
        if side in PROCESSES:
            med["process_cpu_ms_per_verification"] = median(
                [1000 * r["process_cpu_s"] / r["verifications"] if r["verifications"] else None for r in rows]
            )
        sides[side] = {"description": DESCRIPTIONS[side], "rounds": rows, "median": med}
        if side == "worker":
            sides[side]["redis_commands_per_verification"] = _commands_per_verification(rows)
    worker = sides["worker"]["median"]
    ratios = {
        f"worker/{base}": {
            "verifications_per_s": ratio(
                worker["verifications_per_s"], sides[base]["median"]["verifications_per_s"]
            ),
            "cpu_ms_per_verification": ratio(
                worker["cpu_ms_per_verification"], sides[base]["median"]["cpu_ms_per_verification"]
            ),
        }
        for base in (BASELINE_A, BASELINE_B)
    }
    return {"sides": sides, "ratios": ratios, "scaling": scaling(sides)}


def _ceiling(row: dict[str, Any], cores: int) -> dict[str, float | None]:
    """One round's ceiling: what ``cores`` allow at its CPU per verification, then after others' use."""
    parts = [
        row.get(k)
        for k in (
            "cpu_ms_per_verification",
            "emulator_cpu_ms_per_verification",
            "redis_cpu_ms_per_verification",
        )
    ]
    if any(p is None for p in parts) or not sum(float(p or 0) for p in parts):
        return {"all_cpu_ms": None, "ceiling": None, "ceiling_after_others": None}
    total = sum(float(p or 0) for p in parts)
    others = row.get("others_cores")
    free = None if others is None else max(0.0, cores - float(others))
    return {
        "all_cpu_ms": round(total, 4),
        "ceiling": round(cores * 1000 / total, 1),
        "ceiling_after_others": None if free is None else round(free * 1000 / total, 1),
    }


def scaling(sides: dict[str, Any]) -> dict[str, Any]:
    """Two processes against one, and against the ceiling the machine's cores allow (per round, medians)."""
    cores = os.cpu_count() or 1
    one, two = sides["worker"]["median"], sides["worker_2p"]["median"]
    rows = sides["worker_2p"]["rounds"]
    ceilings = [_ceiling(row, cores) for row in rows]
    of_ceiling = [
        ratio(row["verifications_per_s"], c["ceiling"]) if c["ceiling"] else None
        for row, c in zip(rows, ceilings, strict=True)
    ]
    of_free = [
        ratio(row["verifications_per_s"], c["ceiling_after_others"]) if c["ceiling_after_others"] else None
        for row, c in zip(rows, ceilings, strict=True)
    ]
    speedup = ratio(two["verifications_per_s"], one["verifications_per_s"])
    med_of_ceiling = median(of_ceiling)
    return {
        "cores": cores,
        "one_process_vps": one["verifications_per_s"],
        "two_process_vps": two["verifications_per_s"],
        "speedup": speedup,
        "scaling_efficiency": None if speedup is None else round(speedup / 2, 3),
        "all_cpu_ms_per_verification": median([c["all_cpu_ms"] for c in ceilings]),
        "ceiling_vps": median([c["ceiling"] for c in ceilings]),
        "ceiling_after_others_vps": median([c["ceiling_after_others"] for c in ceilings]),
        "others_cores": two["others_cores"],
        "of_ceiling": med_of_ceiling,
        "of_ceiling_after_others": median(of_free),
        "target_of_ceiling": TARGET_OF_CEILING,
        "target_met": med_of_ceiling is not None and med_of_ceiling >= TARGET_OF_CEILING,
    }


#: Commands the worker sends as their own round trip (the rest run inside scripts or MULTI blocks).
ROUND_TRIP_COMMANDS = ("evalsha", "hmget", "exec", "xreadgroup", "xautoclaim", "xclaim")


def breakdown(summary: dict[str, Any], read_ms: float) -> dict[str, Any]:
    """Split the worker's CPU per verification into HTTP, Redis client and the rest.

    HTTP: baseline (a)'s CPU per verification (the same two calls through the
    same client). Redis client: round trips per verification times the CPU of
    one store read. The rest: the router, the queue consumer, metrics,
    logging, asyncio tasks. Also the CPU per verification the worker would
    need to reach the target if it stays bound by one core.
    """
    sides = summary["sides"]
    worker_ms = sides["worker"]["median"]["cpu_ms_per_verification"]
    http_ms = sides[BASELINE_A]["median"]["cpu_ms_per_verification"]
    commands = sides["worker"].get("redis_commands_per_verification", {})
    trips = sum(commands.get(name, 0.0) for name in ROUND_TRIP_COMMANDS)
    redis_ms = trips * read_ms
    vs_a = summary["ratios"][f"worker/{BASELINE_A}"]["verifications_per_s"]
    out: dict[str, Any] = {
        "worker_cpu_ms": worker_ms,
        "http_cpu_ms": http_ms,
        "redis_round_trips": round(trips, 2),
        "redis_round_trip_cpu_ms": round(read_ms, 4),
        "redis_client_cpu_ms": round(redis_ms, 4),
        "rest_cpu_ms": None,
        "record_reads": commands.get("hmget"),
        "cpu_ms_for_target": None,
        "worker_cores_busy": None,
        "b_over_a_cpu": ratio(sides[BASELINE_B]["median"]["cpu_ms_per_verification"], http_ms),
    }
    vps = sides["worker"]["median"]["verifications_per_s"]
    if worker_ms is not None and vps:
        out["worker_cores_busy"] = round(worker_ms * vps / 1000, 2)
    if worker_ms is not None and http_ms is not None:
        out["rest_cpu_ms"] = round(worker_ms - http_ms - redis_ms, 4)
    if worker_ms is not None and vs_a:
        # Bound by one core, throughput is inversely proportional to CPU per verification.
        out["cpu_ms_for_target"] = round(worker_ms * vs_a / TARGET, 4)
    return out


def _commands_per_verification(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Redis commands per verification, the smallest count over rounds for each command.

    ``INFO commandstats`` is server-wide: another client of the same Redis can
    only add to a round's counts, so the minimum is the closest to the worker's own.
    """
    out: dict[str, float] = {}
    names = {name for row in rows for name in row["redis_commands"]}
    for name in names:
        per = [
            row["redis_commands"].get(name, 0) / row["verifications"] for row in rows if row["verifications"]
        ]
        if per and min(per) >= 0.005:
            out[name] = round(min(per), 2)
    return dict(sorted(out.items(), key=lambda item: item[1], reverse=True))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(data: dict[str, Any]) -> str:
    """The Markdown report."""
    cfg, mach = data["config"], data["machine"]
    sides, ratios = data["sides"], data["ratios"]
    vs_a = ratios["worker/httpx_aiohttp"]["verifications_per_s"]
    met = vs_a is not None and vs_a >= TARGET
    lines = [
        "# Worker throughput",
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
        f"{cfg['verifications']} distinct numbers per round, every one scripted as a normal Telegram user, "
        f"so each verification is `checkSendAbility` + `sendVerificationMessage` (with the `request_id`) "
        f"to the emulators running in a separate process; {cfg['concurrency']} in flight "
        f"(`settings.concurrency`); Redis store and queue at {cfg.get('redis', '127.0.0.1:6379')} "
        f"({cfg.get('redis_parser', 'python')} reply parser); {cfg['rounds']} timed "
        "round(s) per side after one warm-up round each, sides alternating, emulators reset before "
        "every round. Medians over rounds.",
        "",
        "| side | verifications/s (median) | range | CPU ms/verification | emulator CPU ms/verif. "
        "| Redis CPU ms/verif. | worker ÷ side (verifications/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, info in sides.items():
        med = info["median"]
        vps = [r["verifications_per_s"] for r in info["rounds"]]
        rng = f"{min(vps):.0f}–{max(vps):.0f}" if vps else "-"
        if side in PROCESSES:
            rat = _fmt(
                ratio(sides["worker"]["median"]["verifications_per_s"], med["verifications_per_s"]), ".2f"
            )
        else:
            rat = _fmt(ratios[f"worker/{side}"]["verifications_per_s"], ".2f")
        lines.append(
            f"| `{side}` | {_fmt(med['verifications_per_s'], '.0f')} | {rng} "
            f"| {_fmt(med['cpu_ms_per_verification'], '.3f')} "
            f"| {_fmt(med['emulator_cpu_ms_per_verification'], '.3f')} "
            f"| {_fmt(med['redis_cpu_ms_per_verification'], '.3f')} | {rat} |"
        )
    worker_med = sides["worker"]["median"]
    lines += [
        "",
        f"**worker / baseline (a) = {_fmt(vs_a, '.2f')}** (target ≥ {TARGET}: "
        f"{'met' if met else 'not met'}); worker / baseline (b) = "
        f"{_fmt(ratios['worker/aiohttp']['verifications_per_s'], '.2f')}. "
        f"CPU per verification, worker ÷ (a): "
        f"{_fmt(ratios['worker/httpx_aiohttp']['cpu_ms_per_verification'], '.1f')}×, "
        f"worker ÷ (b): {_fmt(ratios['worker/aiohttp']['cpu_ms_per_verification'], '.1f')}×.",
        "",
        "Sides:",
        "",
    ]
    lines += [f"- `{side}`: {info['description']}" for side, info in sides.items()]
    lines += [
        "",
        "How the worker is timed: its window runs from the first `checkSendAbility` the emulator logged "
        "to the first moment the stream is empty (polled every 10 ms; every message acknowledged), so "
        "Python start-up and shutdown are left out; its CPU in that window comes from `/proc/<pid>/stat` "
        "sampled every 10 ms. Including start-up and shutdown, the child used a median "
        f"{_fmt(worker_med.get('process_cpu_ms_per_verification'), '.3f')} ms CPU per verification "
        "(`getrusage(RUSAGE_CHILDREN)`). The baselines run in this process and are timed with "
        "`time.perf_counter` and `time.process_time`. Redis CPU (from `/proc`) is shown for the worker, "
        "which needs a store; the baselines do not.",
        "",
        "Verifications/s is the throughput of the whole system (client, emulator and Redis share two "
        "cores), so it is bounded by whichever process saturates a core first; CPU per verification "
        "is the more stable figure.",
        "",
        f"Failed verifications: {data['errors']}. What one verification leaves in Redis once its message is "
        "acknowledged (record, ledger entry and indexes, idempotency key, rate-limit events; `MEMORY USAGE` "
        "of the round's keys, sampled by kind): "
        f"{_fmt(worker_med.get('redis_bytes_per_verification'), '.0f')} bytes "
        f"(median over one-process rounds){_bytes_by_kind(sides['worker']['rounds'])}.",
        "",
        "Redis commands the server counted per verification while the worker ran (`INFO commandstats`, "
        "smallest over rounds; commands run inside Lua scripts and `MULTI` blocks are counted too, "
        "so this is more than the number of round trips):",
        "",
        "| command | per verification |",
        "|---|---:|",
        *(
            f"| `{name}` | {count:.2f} |"
            for name, count in sides["worker"].get("redis_commands_per_verification", {}).items()
        ),
    ]
    lines += ["", *render_scaling(data["scaling"], sides)]
    if CLUSTER_SIDE in sides:
        lines += ["", *render_cluster(sides)]
    if data.get("before"):
        lines += ["", *render_before(data["before"], data)]
    lines += ["", *render_breakdown(data["breakdown"], met)]
    if data.get("profile"):
        lines += ["", *render_profile(data["profile"])]
    lines += ["", "Rerun: `python bench/worker_throughput.py` (see `bench/README.md`)."]
    return "\n".join(lines)


def _bytes_by_kind(rounds: Sequence[dict[str, Any]]) -> str:
    """``; by kind of key: rec 1568, ...`` bytes per verification, from the median round."""
    known = sorted(
        (r for r in rounds if r.get("redis_bytes_per_verification")),
        key=lambda r: r["redis_bytes_per_verification"],
    )
    if not known:
        return ""
    row = known[len(known) // 2]
    parts = sorted(row["redis_bytes"].items(), key=lambda item: -item[1])
    return "; by kind of key in the median round: " + ", ".join(
        f"`{kind}` {size / row['verifications']:.0f}" for kind, size in parts if size >= row["verifications"]
    )


def render_cluster(sides: dict[str, Any]) -> list[str]:
    """The cluster side: Redis CPU per verification per node, and what one shard's core allows."""
    single = sides["worker"]["median"]
    med = sides[CLUSTER_SIDE]["median"]
    rows = sides[CLUSTER_SIDE]["rounds"]
    per_node = [
        r["redis_node_cpu_ms_per_verification"] for r in rows if r["redis_node_cpu_ms_per_verification"]
    ]
    nodes = [median([node[i] for node in per_node]) for i in range(len(per_node[0]))] if per_node else []
    busiest = med.get("redis_busiest_node_cpu_ms_per_verification")
    lines = [
        "## On a three-master Redis Cluster",
        "",
        "The same one-process worker with its store and queue on a local three-master Redis Cluster "
        "(`cluster=1`, the store's 16 shards spread over the three masters by hash tag, the queue's stream "
        "on one of them), started by this script on the same two cores. Redis CPU per verification, "
        f"all three nodes: {_fmt(med['redis_cpu_ms_per_verification'], '.3f')} ms against "
        f"{_fmt(single['redis_cpu_ms_per_verification'], '.3f')} ms on one Redis; per node (median): "
        + ", ".join(f"{_fmt(n, '.3f')} ms" for n in nodes)
        + f". The busiest node carries {_fmt(busiest, '.3f')} ms per verification, so this three-master "
        f"cluster is full at about {_fmt(ratio(1000, busiest), '.0f')} verifications/s, when that node's "
        "core is. Spread as evenly over N masters, a cluster serves about "
        f"N × {_fmt(ratio(1000, med['redis_cpu_ms_per_verification']), '.0f')} verifications/s "
        f"({_fmt(med['redis_cpu_ms_per_verification'], '.2f')} ms of Redis CPU per verification in all; "
        "the node holding the queue's stream carries its few commands more).",
        "",
        "The worker's own CPU on the cluster is "
        f"{_fmt(med['cpu_ms_per_verification'], '.3f')} ms per verification against "
        f"{_fmt(single['cpu_ms_per_verification'], '.3f')} ms on one Redis: a start is one script per "
        "slot it touches there (idempotency reservation, each rate limit, the conversion guard, the "
        "record), so more round trips.",
    ]
    return lines


def render_scaling(sc: dict[str, Any], sides: dict[str, Any]) -> list[str]:
    """Two processes: speed-up over one, and the share of the ceiling the cores allow."""
    two = sides["worker_2p"]["median"]
    lines = [
        "## Two processes, and the ceiling of this machine's cores",
        "",
        f"`--processes 2` drained the queue at {_fmt(sc['two_process_vps'], '.0f')} verifications/s against "
        f"{_fmt(sc['one_process_vps'], '.0f')} for one process: **{_fmt(sc['speedup'], '.2f')}×, a scaling "
        f"efficiency of {_fmt(sc['scaling_efficiency'], '.2f')}** (speed-up ÷ 2).",
        "",
        "Two processes cannot go faster than the cores allow. Per verification, in the two-process rounds "
        f"(medians): worker processes {_fmt(two['cpu_ms_per_verification'], '.3f')} ms, emulator "
        f"{_fmt(two['emulator_cpu_ms_per_verification'], '.3f')} ms, Redis "
        f"{_fmt(two['redis_cpu_ms_per_verification'], '.3f')} ms of CPU: "
        f"{_fmt(sc['all_cpu_ms_per_verification'], '.3f')} ms in all, so {sc['cores']} cores allow at most "
        f"**{_fmt(sc['ceiling_vps'], '.0f')} verifications/s**. Two processes reached "
        f"**{_fmt(sc['of_ceiling'], '.2f')} of that ceiling** (target ≥ {sc['target_of_ceiling']}: "
        f"{'met' if sc['target_met'] else 'not met'}; each round against its own ceiling, median).",
        "",
        "Other programs shared the machine: in the same windows they kept a median "
        f"{_fmt(sc['others_cores'], '.2f')} cores busy (`/proc/stat` busy time minus the worker, emulator, "
        "Redis and this script). The ceiling on what was left is "
        f"{_fmt(sc['ceiling_after_others_vps'], '.0f')} verifications/s, of which two processes reached "
        f"{_fmt(sc['of_ceiling_after_others'], '.2f')}. The two-process rows above also include this "
        "script's own polling and the supervisor process; the ceiling leaves them out.",
    ]
    return lines


#: Commands the store sends per state change in one Lua script: their count is the writes' round trips.
SCRIPT_COMMANDS = ("evalsha", "eval")


def before_summary(path: Path) -> dict[str, Any]:
    """The Redis figures of an earlier run (its JSON results), to compare with this one."""
    old = json.loads(path.read_text(encoding="utf-8"))
    return {
        "file": path.name,
        "commit": old["config"].get("commit"),
        "date": old["date"],
        "size": f"{old['config']['verifications']} verifications × {old['config']['rounds']} rounds",
        "redis_parser": old["config"].get("redis_parser", "python"),
        "redis_round_trips": old["breakdown"]["redis_round_trips"],
        "commands": old["sides"]["worker"].get("redis_commands_per_verification", {}),
    }


def render_before(before: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Redis commands and round trips per verification: an earlier run beside this one."""
    after = data["sides"]["worker"].get("redis_commands_per_verification", {})
    names = sorted(
        set(before["commands"]) | set(after),
        key=lambda n: -max(before["commands"].get(n, 0), after.get(n, 0)),
    )

    def total(counts: dict[str, float]) -> float:
        return sum(counts.values())

    lines = [
        "## Redis per verification: before and after",
        "",
        f"Before: commit {before['commit']} ({before['date']}, {before.get('size', '')}, "
        f"{before['redis_parser']} reply parser); "
        f"after: this run (commit {data['config']['commit']}, "
        f"{data['config']['redis_parser']} reply parser). "
        "Both counted by this script the same way (`INFO commandstats`, smallest over rounds); "
        "commands per verification do not depend on the run's size.",
        "",
        "| per verification | before | after |",
        "|---|---:|---:|",
        f"| round trips (EVALSHA, HMGET, MULTI/EXEC, stream reads) | {before['redis_round_trips']:.2f} "
        f"| {data['breakdown']['redis_round_trips']:.2f} |",
        f"| Lua script calls | {sum(before['commands'].get(n, 0) for n in SCRIPT_COMMANDS):.2f} "
        f"| {sum(after.get(n, 0) for n in SCRIPT_COMMANDS):.2f} |",
        f"| commands the server ran (scripts' inner commands included) | {total(before['commands']):.2f} "
        f"| {total(after):.2f} |",
        *(f"| `{n}` | {before['commands'].get(n, 0):.2f} | {after.get(n, 0):.2f} |" for n in names),
    ]
    return lines


def render_breakdown(b: dict[str, Any], met: bool) -> list[str]:
    """Where the worker's CPU per verification goes, in unprofiled milliseconds."""
    lines = [
        "## The worker's CPU per verification, broken down",
        "",
        "| part | ms/verification | how it is estimated |",
        "|---|---:|---|",
        f"| all | {_fmt(b['worker_cpu_ms'], '.3f')} | the worker's median above |",
        f"| provider HTTP | {_fmt(b['http_cpu_ms'], '.3f')} "
        "| baseline (a): the same two calls through the same client |",
        f"| Redis client | {_fmt(b['redis_client_cpu_ms'], '.3f')} | {b['redis_round_trips']} round trips "
        f"(EVALSHA, HMGET, MULTI/EXEC, stream reads) × {b['redis_round_trip_cpu_ms']:.3f} ms, the CPU of "
        "one `RedisStore.get` timed in this process |",
        f"| the rest | {_fmt(b['rest_cpu_ms'], '.3f')} | router and lifecycle, pydantic, queue consumer, "
        "metrics, logging, phone parsing, asyncio tasks |",
        "",
    ]
    if met:
        return lines
    gap = None
    if b["worker_cpu_ms"] is not None and b["cpu_ms_for_target"] is not None:
        gap = b["worker_cpu_ms"] - b["cpu_ms_for_target"]
    size = (
        ""
        if gap is None
        else f": {gap:.2f} ms less, "
        + (
            "more than the whole Redis client part"
            if gap > b["redis_client_cpu_ms"]
            else "within the Redis part"
        )
    )
    bound = (
        ": it is bound by its one core, so its throughput scales with 1 / CPU per verification."
        if (b["worker_cores_busy"] or 0) >= 0.9
        else ": it also waits on I/O, so the estimate below assumes a CPU-bound worker."
    )
    lines.append(
        f"While draining, the worker kept {_fmt(b['worker_cores_busy'], '.2f')} cores busy (CPU per "
        f"verification × verifications/s){bound} Reaching {TARGET} × baseline (a) in one process then "
        "means about "
        f"{_fmt(b['cpu_ms_for_target'], '.2f')} ms of CPU per verification instead of "
        f"{_fmt(b['worker_cpu_ms'], '.2f')}{size}. Fewer store round trips close part of it"
        + (
            f" (of the {b['record_reads']:g} record reads per verification, one is the idempotency lookup; "
            "the others re-read a record this process has just written, and compare-and-set already "
            "returns the new record)"
            if (b["record_reads"] or 0) >= 2
            else ""
        )
        + f"; the rest needs a cheaper HTTP stack (baseline (b) spends {_fmt(b['b_over_a_cpu'], '.2f')} × "
        "(a)'s CPU per verification), a leaner path through the router, or more than one worker process "
        "(the consumer group and the atomic deadline claims allow it)."
    )
    return lines


def render_profile(profile: dict[str, Any]) -> list[str]:
    """The profile section: CPU by area and the top functions, per verification."""
    lines = [
        "## Profile: where the worker's CPU goes",
        "",
        f"cProfile of an in-process `Worker(burst=True)` with the same settings (INFO logging to a file) "
        f"draining {profile['verifications']} queued verifications: {profile['cpu_s']} s CPU, "
        f"{profile['wall_s']} s wall, {profile['profiled_cpu_us_per_verification']} µs of profiled "
        f"time per verification. {profile['note']}",
        "",
        "By package (self time):",
        "",
        "| area | µs/verification | share |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {row['area']} | {row['self_us_per_verification']:.1f} | {100 * row['share']:.1f}% |"
        for row in profile["by_area"]
    ]
    lines += [
        "",
        "Top functions by self time:",
        "",
        "| function | calls/verif. | self µs/verif. | cumulative µs/verif. | share |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| `{row['function']}` | {row['calls_per_verification']} | {row['self_us_per_verification']:.1f} "
        f"| {row['cumulative_us_per_verification']:.1f} | {100 * row['share']:.1f}% |"
        for row in profile["top_self"]
    ]
    lines += [
        "",
        "otp_router functions by cumulative time (includes what they call):",
        "",
        "| function | calls/verif. | cumulative µs/verif. | self µs/verif. |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{row['function']}` | {row['calls_per_verification']} "
        f"| {row['cumulative_us_per_verification']:.1f} | {row['self_us_per_verification']:.1f} |"
        for row in profile["otp_router_cumulative"]
    ]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    default_concurrency = Settings.model_fields["concurrency"].default
    parser.add_argument(
        "--verifications",
        type=int,
        default=2000,
        help="queued verifications per round (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=default_concurrency,
        help="in flight, worker and baselines alike (default: settings.concurrency, %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="verifications in each side's warm-up (default: %(default)s)"
    )
    parser.add_argument(
        "--store-reads",
        type=int,
        default=10_000,
        help="store reads timed to price one Redis round trip (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="cProfile an in-process worker: when short of target (auto), always or never",
    )
    parser.add_argument(
        "--cluster",
        choices=("auto", "on", "off"),
        default="auto",
        help="also run the worker on a local three-master Redis Cluster (auto: when redis-server and "
        "redis-cli are installed)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 40 verifications, 1 round (numbers meaningless)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="JSON results of an earlier run: its Redis commands and round trips go beside this run's",
    )
    args = parser.parse_args(argv)
    tools = all(shutil.which(tool) for tool in ("redis-server", "redis-cli"))
    if args.cluster == "on" and not tools:
        parser.error("--cluster on needs redis-server and redis-cli on PATH")
    args.cluster = args.cluster == "on" or (args.cluster == "auto" and tools)
    if args.quick:
        args.verifications, args.rounds, args.warmup, args.concurrency = 40, 1, 10, 8
        args.store_reads = 200
    if min(args.verifications, args.rounds, args.warmup, args.concurrency, args.store_reads) < 1:
        parser.error(
            "--verifications, --rounds, --warmup, --concurrency and --store-reads must be at least 1"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results; exit status 1 if a verification failed."""
    args = parse_args(argv)
    if not redis_available():
        print(f"{NAME}: needs Redis at 127.0.0.1:6379", file=sys.stderr)
        return 2
    config = {
        "verifications": args.verifications,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "quick": args.quick,
        "commit": code_version(),
        "store": "redis",
        "redis": f"{urlsplit(REDIS_URL).hostname}:{urlsplit(REDIS_URL).port or 6379}",
        # redis-py parses replies in C when hiredis is installed (the 'hiredis' extra).
        "redis_parser": "hiredis" if HIREDIS_AVAILABLE else "python",
        "target_worker_over_a": TARGET,
    }
    print(f"{NAME}: {config}", file=sys.stderr)
    # Before the run: the load average should say how busy the machine was before we added to it.
    started, mach = today(), machine()
    outcome = asyncio.run(run(args))
    errors = sum(r.errors for r in outcome["rounds"])
    data: dict[str, Any] = {
        "benchmark": NAME,
        "date": started,
        "machine": mach,
        "config": config,
        "errors": errors,
        **outcome["summary"],
        "target_met": (outcome["summary"]["ratios"]["worker/httpx_aiohttp"]["verifications_per_s"] or 0)
        >= TARGET,
        "profile": outcome["profile"],
    }
    if args.before is not None:
        data["before"] = before_summary(args.before)
    if code_version() != config["commit"]:
        # Another change landed mid-run: child processes started later may have run other code.
        data["code_changed_during_run"] = code_version()
    markdown = render(data)
    publish(args.out, NAME, data, markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
