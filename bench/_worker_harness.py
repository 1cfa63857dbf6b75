"""Process plumbing shared by the worker benchmarks (``worker_throughput``, ``deadline_lag``).

Not a public module: the benchmark scripts import it as a sibling
(``python bench/<name>.py`` puts ``bench/`` first on ``sys.path``).

It runs ``otp-router emulate`` and ``otp-router worker`` as child processes in
an empty working folder (no stray ``.env``), configured only through
``OTP_ROUTER_*`` variables, reads their CPU time and memory from ``/proc``,
and removes a benchmark's Redis keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from pydantic import SecretStr

from otp_router.config import Settings, TelegramSettings, TwilioSettings
from otp_router.harness import provider_environ

__all__ = [
    "REDIS_URL",
    "Emulator",
    "Sampler",
    "code_version",
    "emulator_process",
    "machine_busy_seconds",
    "process_cpu_seconds",
    "process_memory_kib",
    "process_tree",
    "redis_available",
    "redis_cleanup",
    "settings_env",
    "start_worker",
    "stop_process",
    "tree_cpu_seconds",
    "tree_peak_rss_kib",
    "unique_prefix",
]

#: The Redis every benchmark uses (the machine and CI run one here).
#: The benchmark Redis. OTP_ROUTER_BENCH_REDIS_URL names another one, e.g. a private
#: ``redis-server --port 0``-style instance whose command counts no other client adds to.
REDIS_URL = os.environ.get("OTP_ROUTER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
#: A Twilio "magic" test sender; the emulator accepts any E.164 sender.
FROM_NUMBER = "+15005550006"


def unique_prefix(name: str) -> str:
    """A Redis key prefix no other run (or test) uses."""
    return f"otp-bench-{name}-{uuid.uuid4().hex[:8]}"


def code_version() -> str | None:
    """The checkout's commit, with ``+dirty`` when ``otp_router/`` has uncommitted changes (None: no git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--", "otp_router"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if changes else commit


# --------------------------------------------------------------------------- /proc


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from ``/proc`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # The command name (field 2) may contain spaces: split after its closing parenthesis.
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of the file, i.e. 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak resident set) of ``pid`` in KiB; empty once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
    except OSError:
        return {}
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (``/proc/<pid>/task/<tid>/children``), parents first."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children", encoding="ascii") as children:
                    todo += [int(child) for child in children.read().split()]
            except (OSError, ValueError):
                continue
    return out


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants (a supervisor and its worker processes).

    None once ``pid`` is gone. A descendant that has exited is no longer
    counted, so read it over a window in which they all run.
    """
    total = process_cpu_seconds(pid)
    if total is None:
        return None
    for child in process_tree(pid)[1:]:
        total += process_cpu_seconds(child) or 0.0
    return total


def tree_peak_rss_kib(pid: int) -> dict[str, int]:
    """Memory of ``pid`` and its live descendants: the largest ``VmHWM`` and ``VmRSS`` of any one of
    them (a per-process budget), ``VmRSS_total`` over all, and ``processes``."""
    peaks, now = [], []
    for member in process_tree(pid):
        memory = process_memory_kib(member)
        if memory:
            peaks.append(memory.get("VmHWM", 0))
            now.append(memory.get("VmRSS", 0))
    if not peaks:
        return {}
    return {"VmHWM": max(peaks), "VmRSS": max(now), "VmRSS_total": sum(now), "processes": len(peaks)}


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy (``/proc/stat``: all but idle and iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Samples a process's CPU seconds every ``interval`` seconds, in the background.

    The worker's CPU during a window (first to last provider call) is then
    read off the samples, leaving out its start-up (imports) and shutdown.

    Args:
        pid: The process.
        interval: Seconds between samples.
        read: What to sample instead of the process's own CPU seconds, e.g.
            :func:`tree_cpu_seconds` for a supervisor and its children or
            :func:`machine_busy_seconds`; sampling ends when it returns None.
    """

    def __init__(
        self, pid: int, interval: float = 0.01, read: Callable[[int], float | None] | None = None
    ) -> None:
        self.pid = pid
        self.interval = interval
        self._read = read or process_cpu_seconds
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            cpu = self._read(self.pid)
            if cpu is None:
                return
            self.samples.append((time.time(), cpu))
            await asyncio.sleep(self.interval)

    def cpu_at(self, when: float) -> float | None:
        """CPU seconds at wall time ``when``, interpolated between the nearest samples."""
        if not self.samples:
            return None
        before = [s for s in self.samples if s[0] <= when]
        after = [s for s in self.samples if s[0] >= when]
        if not before:
            return after[0][1]
        if not after:
            return before[-1][1]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def cpu_between(self, start: float, end: float) -> float | None:
        """CPU seconds the process used between wall times ``start`` and ``end``."""
        a, b = self.cpu_at(start), self.cpu_at(end)
        return None if a is None or b is None else b - a


# --------------------------------------------------------------------------- emulators


@dataclass(slots=True)
class Emulator:
    """The ``otp-router emulate`` child process and how to reach it.

    Attributes:
        process: The child.
        telegram_url: Telegram Gateway emulator base URL.
        twilio_url: Twilio emulator base URL.
        token: Telegram token both sides use.
        account_sid: Twilio Account SID.
        auth_token: Twilio Auth Token.
    """

    process: asyncio.subprocess.Process
    telegram_url: str
    twilio_url: str
    token: str
    account_sid: str
    auth_token: str

    def settings(self, **overrides: Any) -> Settings:
        """Router settings pointed at these emulators (built-in defaults, not the environment)."""
        base = Settings.model_construct()
        telegram = TelegramSettings(token=SecretStr(self.token), base_url=self.telegram_url)
        twilio = TwilioSettings(
            account_sid=self.account_sid,
            auth_token=SecretStr(self.auth_token),
            base_url=self.twilio_url,
            from_number=FROM_NUMBER,
        )
        return Settings(**{**base.model_dump(), "telegram": telegram, "twilio": twilio, **overrides})

    async def reset(self, session: aiohttp.ClientSession) -> None:
        """Forget both emulators' requests, messages and logs (the script is kept)."""
        for url in (self.telegram_url, self.twilio_url):
            async with session.post(f"{url}/_emulator/reset") as response:
                response.raise_for_status()

    async def script(self, session: aiohttp.ClientSession, numbers: Mapping[str, Mapping[str, Any]]) -> None:
        """Script numbers' behaviour (both emulators share one script)."""
        async with session.post(f"{self.telegram_url}/_emulator/script", json=dict(numbers)) as response:
            response.raise_for_status()

    async def telegram_log(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every Telegram API request the emulator received, oldest first."""
        async with session.get(f"{self.telegram_url}/_emulator/log") as response:
            response.raise_for_status()
            data: list[dict[str, Any]] = await response.json()
        return data

    async def twilio_log(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every Twilio message create attempt the emulator received, oldest first."""
        async with session.get(f"{self.twilio_url}/_emulator/log") as response:
            response.raise_for_status()
            data: list[dict[str, Any]] = await response.json()
        return data


async def stop_process(process: asyncio.subprocess.Process, grace: float = 15.0) -> int:
    """SIGTERM ``process`` (SIGKILL after ``grace`` seconds); return its exit status."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=grace)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


@contextlib.asynccontextmanager
async def emulator_process(workdir: Path, *extra_args: str) -> AsyncIterator[Emulator]:
    """Run ``otp-router emulate`` on free ports with fresh credentials; stop it on exit.

    Args:
        workdir: An empty folder to run in (no ``.env`` can leak in).
        extra_args: More ``otp-router emulate`` options (``--time-scale 0.1``).
    """
    token = secrets.token_urlsafe(24)
    sid = "AC" + secrets.token_hex(16)
    auth = secrets.token_hex(16)
    env = {
        **_clean_environ(),
        "OTP_ROUTER_TELEGRAM__TOKEN": token,
        "OTP_ROUTER_TWILIO__ACCOUNT_SID": sid,
        "OTP_ROUTER_TWILIO__AUTH_TOKEN": auth,
    }
    command = ["-m", "otp_router", "emulate", "--host", "127.0.0.1", "--telegram-port", "0"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        "--twilio-port",
        "0",
        # Every port free: a fixed one collides with any other run on the machine.
        "--vonage-port",
        "0",
        *extra_args,
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        if not line:
            raise RuntimeError(f"otp-router emulate exited ({await process.wait()}) before printing URLs")
        urls = json.loads(line)
        yield Emulator(process, urls["telegram_url"], urls["twilio_url"], token, sid, auth)
    finally:
        await stop_process(process)


# --------------------------------------------------------------------------- worker


def _clean_environ() -> dict[str, str]:
    """This process's environment without any ``OTP_ROUTER_*`` or ``TWILIO_*`` variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))}


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``OTP_ROUTER_*`` variables that give an ``otp-router`` child the same settings.

    Covers what the benchmarks set: providers, store, secret, policy, limits, fraud guard,
    concurrency, queue visibility timeout, settle delay, HTTP port and log level.
    """
    env = {
        **provider_environ(settings),
        "OTP_ROUTER_CONCURRENCY": str(settings.concurrency),
        "OTP_ROUTER_QUEUE_VISIBILITY_TIMEOUT": str(settings.queue_visibility_timeout),
        "OTP_ROUTER_SETTLE_DELAY": str(settings.settle_delay),
        "OTP_ROUTER_LIMITS__PER_PHONE": str(settings.limits.per_phone),
        "OTP_ROUTER_LIMITS__PER_PREFIX": str(settings.limits.per_prefix),
        "OTP_ROUTER_LIMITS__PER_COUNTRY": str(settings.limits.per_country),
        "OTP_ROUTER_FRAUD__MIN_CONVERSION": str(settings.fraud.min_conversion),
        "OTP_ROUTER_FRAUD__PREFIX_MIN_STARTED": str(settings.fraud.prefix_min_started),
        "OTP_ROUTER_FRAUD__COUNTRY_MIN_STARTED": str(settings.fraud.country_min_started),
        "OTP_ROUTER_HTTP_PORT": str(settings.http_port),
        "OTP_ROUTER_LOG_LEVEL": settings.log_level,
    }
    if settings.queue_url:
        env["OTP_ROUTER_QUEUE_URL"] = settings.queue_url
    if settings.policy_file is not None:
        env["OTP_ROUTER_POLICY_FILE"] = str(settings.policy_file)
    return env


def _append(path: Path) -> BinaryIO:
    # The child inherits the descriptor; ours closes once the child has started.
    return open(path, "ab")


async def start_worker(
    settings: Settings,
    *args: str,
    workdir: Path,
    log_file: Path,
    extra_env: Mapping[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``otp-router worker ARGS`` configured like ``settings``; its log goes to ``log_file``.

    The log goes to a file, not a pipe: an undrained pipe would block the
    worker once full, and reading it would cost this process CPU mid-run.
    ``extra_env`` adds ``OTP_ROUTER_*`` variables :func:`settings_env` does not cover.
    """
    env = {**_clean_environ(), **settings_env(settings), **(extra_env or {})}
    with _append(log_file) as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "otp_router",
            "worker",
            *args,
            cwd=workdir,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )


# --------------------------------------------------------------------------- Redis


def redis_available() -> bool:
    """Whether the benchmark Redis (:data:`REDIS_URL`) answers."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=0.5):
            return True
    except OSError:
        return False


async def redis_cleanup(prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many were deleted."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        deleted = 0
        for i in range(0, len(keys), 1000):
            deleted += int(await client.delete(*keys[i : i + 1000]))
        return deleted
    finally:
        await client.aclose()
