"""``otp-router worker --processes N``: a supervisor and N worker processes in one consumer group.

Real processes, a real Redis, the emulators over loopback; the emulator's
request log is the witness of how many codes each phone was sent, and the
one ``/metrics`` endpoint must count what every process did.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from test_worker import (
    SEND,
    cli_env,
    enqueue_all,
    otp_router_cli,
    queue_counts,
    settings_for,
    telegram_sends,
    wait_until,
)

from otp_router.config import FraudSettings
from otp_router.emulators import EmulatorPair, Script
from otp_router.harness import sample_numbers

pytest.importorskip("starlette")


class StderrLines:
    """Collects a subprocess's stderr lines as they come, for the test to wait on."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def matching(self, pattern: str) -> list[re.Match[str]]:
        return [m for line in self.lines if (m := re.search(pattern, line))]

    async def finish(self) -> str:
        await self._task
        return "\n".join(self.lines)


def metric(text: str, sample: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def test_two_processes_consume_exactly_once_and_metrics_sum_over_both(
    make_emulators: Callable[[Script], Awaitable[EmulatorPair]], redis_url: str, tmp_path: Path
) -> None:
    """Two worker processes share 50 messages (one send per phone); the one /metrics endpoint counts
    all 50; SIGTERM drains both and the supervisor exits 0, removing its metrics folder."""
    pair = await make_emulators(Script(default_delivery=0.1))
    # Nobody enters a code: the conversion guard would (rightly) step in for 50 numbers of one prefix.
    settings = settings_for(pair, redis_url, fraud=FraudSettings(min_conversion=0), concurrency=4)
    phones = sample_numbers("GB", 50)
    for phone in phones:
        # Slow enough that one process with 4 slots cannot take every message before the other reads.
        pair.script.set(phone, telegram_latency=0.1)
    metrics_root = tmp_path / "metrics"
    metrics_root.mkdir()
    env = cli_env(
        settings,
        OTP_ROUTER_HTTP_PORT="0",
        OTP_ROUTER_HTTP_HOST="127.0.0.1",
        OTP_ROUTER_FRAUD__MIN_CONVERSION="0",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_root),
    )
    process = await otp_router_cli("worker", "--processes", "2", "--name", "multi", env=env)
    stderr = StderrLines(process)
    try:
        await wait_until(lambda: len(stderr.matching(r"event=worker_started")) == 2, within=60)
        await wait_until(lambda: bool(stderr.matching(r"event=http_listening .*port=(\d+)")), within=30)
        port = int(stderr.matching(r"event=http_listening .*port=(\d+)")[0].group(1))
        await enqueue_all(settings, phones)

        async def all_acknowledged() -> bool:
            return len(telegram_sends(pair)) == 50 and await queue_counts(settings) == (0, 0)

        await wait_until(all_acknowledged, within=60)

        async def scrape() -> str:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
            response.raise_for_status()
            return response.text

        processed = 'otp_router_queue_messages_total{outcome="processed"}'
        # The counter is written when the ack returns; the queue may be empty a moment before.
        await wait_until(lambda: _scraped_at_least(scrape, processed, 50), within=10)
        text = await scrape()
        # The run's own fresh folder, inside the one the environment names.
        assert [p.name.startswith("otp-router-metrics-") for p in metrics_root.iterdir()] == [True]
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    log = await stderr.finish()
    assert process.returncode == 0, log
    assert metric(text, processed) == 50
    stopped = stderr.matching(r"event=worker_stopped .*consumer=(\S+) .*processed=(\d+)")
    assert len(stopped) == 2, log
    per_process = {m.group(1): int(m.group(2)) for m in stopped}
    assert len(per_process) == 2 and sum(per_process.values()) == 50
    assert min(per_process.values()) > 0, per_process  # both took part
    assert telegram_sends(pair) == Counter(phones)
    assert all(e.phone_number in phones for e in pair.telegram.log if e.method == SEND)
    assert len(stderr.matching(r"event=child_exited .*code=0")) == 2
    assert not stderr.matching(r"event=child_restart")
    assert list(metrics_root.iterdir()) == []  # removed when the run ended


async def _scraped_at_least(scrape: Callable[[], Awaitable[str]], sample: str, value: float) -> bool:
    return metric(await scrape(), sample) >= value


async def test_a_crashed_process_is_restarted_and_the_stop_still_exits_zero(
    make_emulators: Callable[[Script], Awaitable[EmulatorPair]], redis_url: str
) -> None:
    """SIGKILL one child: the supervisor logs the crash, starts a new child in its place, and a later
    SIGTERM still stops everything with status 0."""
    pair = await make_emulators(Script(default_delivery=0.1))
    settings = settings_for(pair, redis_url)
    process = await otp_router_cli("worker", "--processes", "2", "--no-http", env=cli_env(settings))
    stderr = StderrLines(process)
    try:
        await wait_until(lambda: len(stderr.matching(r"event=worker_started")) == 2, within=60)
        victim = int(stderr.matching(r"event=child_started index=1 pid=(\d+)")[0].group(1))
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: len(stderr.matching(r"event=worker_started")) == 3, within=60)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    log = await stderr.finish()
    assert process.returncode == 0, log
    assert stderr.matching(rf"event=child_exited index=1 pid={victim} code=-{int(signal.SIGKILL)}"), log
    assert stderr.matching(r"event=child_restart index=1"), log
    assert [int(m.group(1)) for m in stderr.matching(r"event=child_started index=1 pid=(\d+)")][-1] != victim
    assert len(stderr.matching(r"event=worker_stopped")) == 2


async def test_a_configuration_error_stops_the_supervisor_with_status_2(tmp_path: Path) -> None:
    """A configuration error is not restarted over and over: the command exits 2 with the one-line
    message, and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_", "PROMETHEUS_"))}
    env.update(OTP_ROUTER_STORE_URL=f"sqlite:///{tmp_path / 'otp.db'}", OTP_ROUTER_TELEGRAM__TOKEN="t")
    process = await otp_router_cli("worker", "--processes", "2", "--no-http", env=env)
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    log = err.decode()
    assert process.returncode == 2, log
    # Caught before any child starts (the command line checks the settings first), or by a child.
    assert "event=child_started" not in log or "reason=configuration" in log
    assert "otp-router: " in log and "Traceback" not in log
    assert "event=child_restart" not in log
