"""Store outage: the Redis a running worker uses goes away mid-run and comes back.

A private ``redis-server`` (AOF, ``appendfsync always``, its own folder and a
free loopback port) backs a real ``otp-router worker`` process, with the
emulators in this process as the witnesses. While Telegram answers slowly and
messages are in flight, Redis is killed, kept down for a few seconds, and
started again on the same files (``STORE_OUTAGE_SECONDS``, default 6; the
README's figure is a run with 20). Asserted:

* ``/healthz`` answers 500 naming the store while it is down, 200 after;
* the library raises :class:`~otp_router.errors.StoreError` (never a redis-py
  exception) while it is down;
* the worker stops consuming while it is down (no provider is ever called for
  a verification the store did not hold before the outage), and finishes the
  queue after;
* every queued number got exactly one Telegram message and no SMS, its code
  verifies, and the ledger equals what Telegram charged: nothing lost, nothing
  sent or paid twice, counted from the emulator's own records.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from test_worker import cli_env, enqueue_all, wait_until

from otp_router import router as router_module
from otp_router.config import FraudSettings, RetrySettings
from otp_router.emulators import EmulatorPair, Script
from otp_router.errors import StoreError
from otp_router.harness import emulated_settings, read_code, sample_numbers
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, ProbeResult
from otp_router.queue import open_queue, queue_url_for
from otp_router.router import OtpRouter
from otp_router.store.base import Record

#: Seconds Redis stays down (the worker's visibility timeout is 2 s, its read block 1 s).
OUTAGE = float(os.environ.get("STORE_OUTAGE_SECONDS", "6"))
MESSAGES = 40

pytestmark = [pytest.mark.redis, pytest.mark.timeout(150 + 2 * OUTAGE)]


def _append(path: Path) -> BinaryIO:
    # The child inherits the descriptor; ours closes once the child has started.
    return open(path, "ab")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` child with AOF on, in ``folder``, on ``port``; restartable on the same files."""

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        loop = asyncio.get_running_loop()
        until = loop.time() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                assert loop.time() < until, "redis-server did not start"
                assert self.process.returncode is None, "redis-server exited at start"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def kill(self) -> None:
        """SIGKILL: no goodbye to clients; with ``appendfsync always`` nothing acknowledged is lost."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()


@pytest.fixture
async def private_redis(redis_server_binary: str, tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(redis_server_binary, folder, free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(default_delivery=0.1))


async def healthz(http: httpx.AsyncClient, port: int) -> tuple[int, dict[str, Any]]:
    response = await http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def first_contact(pair: EmulatorPair) -> dict[str, float]:
    """When each number was first called at Telegram (the start of its verification)."""
    seen: dict[str, float] = {}
    for entry in pair.telegram.log:
        if entry.phone_number is not None:
            seen.setdefault(entry.phone_number, entry.time)
    return seen


def telegram_charged(pair: EmulatorPair, phone: str) -> Decimal:
    """What Telegram charged for ``phone``, from the emulator's log."""
    return sum(
        (Decimal(e.charged) for e in pair.telegram.log if e.phone_number == phone and e.charged is not None),
        Decimal(0),
    )


async def test_worker_rides_out_a_store_outage(
    private_redis: PrivateRedis, pair: EmulatorPair, tmp_path: Path
) -> None:
    settings = emulated_settings(
        pair,
        store_url=private_redis.url,
        code_secret=SecretStr("outage-secret"),
        retry=RetrySettings(backoff=False, attempts=2, timeout=10),
        queue_visibility_timeout=2.0,
        concurrency=4,
        # Forty starts in one prefix and none verified yet is what SMS pumping looks
        # like to the conversion guard; it is not what this test is about.
        fraud=FraudSettings(min_conversion=0),
    )
    phones = sample_numbers("GB", MESSAGES, offset=3000)
    for phone in phones:
        # Slow answers: the outage lands with provider calls in flight.
        pair.script.set(phone, telegram_latency=0.3)
    await enqueue_all(settings, phones, prefix="outage")

    http_port = free_port()
    log_path = tmp_path / "worker.log"
    with _append(log_path) as log_file:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "otp_router",
            "worker",
            "--name",
            "outage",
            env=cli_env(
                settings,
                OTP_ROUTER_SHUTDOWN_GRACE="5",
                OTP_ROUTER_HTTP_PORT=str(http_port),
                OTP_ROUTER_LOG_LEVEL="INFO",
                OTP_ROUTER_FRAUD__MIN_CONVERSION=str(settings.fraud.min_conversion),
            ),
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
        )
    library = OtpRouter.from_settings(settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False)
    try:
        async with httpx.AsyncClient(trust_env=False) as http:

            async def healthy() -> bool:
                try:
                    return (await healthz(http, http_port))[0] == 200
                except httpx.TransportError:
                    return False

            await wait_until(healthy, within=30, what="the worker never became healthy")
            # Mid-run: some numbers done, some in flight, most still queued. Killed
            # while probes are out: their outcomes (charged request_ids) must be
            # held and written once the store is back, not lost.
            await wait_until(lambda: _count(pair, 10), within=30, what="the worker did not start sending")

            await private_redis.kill()
            killed_at = time.time()
            status, body = await healthz(http, http_port)
            assert status == 500 and "store" in body["failing"], body
            with pytest.raises(StoreError, match=r"^redis: ") as raised:
                await library.start(phones[0], idempotency_key="outage-0")
            assert phones[0] not in str(raised.value)
            with pytest.raises(StoreError, match=r"^redis: "):
                await library.get("v_anything")
            await asyncio.sleep(OUTAGE)
            status, body = await healthz(http, http_port)
            assert status == 500 and "store" in body["failing"], body
            restarted_at = time.time()
            await private_redis.start()
            await wait_until(healthy, within=20, what="/healthz did not recover")
            await wait_until(
                lambda: _all_sent(pair, phones),
                within=60,
                what="not every queued number got its Telegram message",
            )
            # An ack that failed during the outage leaves its message pending: the worker takes
            # it back after the visibility timeout and acks it (its idempotency key finds the
            # verification, nothing is sent again). Wait for that before stopping the worker.
            drained = open_queue(queue_url_for(settings))
            try:

                async def queue_drained() -> bool:
                    return await drained.depth() == 0 and await drained.pending() == 0

                await wait_until(queue_drained, within=30, what="the worker did not drain the queue")
            finally:
                await drained.aclose()
    finally:
        await library.aclose()
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), timeout=20)
        except TimeoutError:
            worker.kill()
            await worker.wait()
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert worker.returncode == 0, log[-3000:]
    # Noticed: a failed queue read, or (when every slot was holding a provider
    # answer) the hold itself; either way it neither crashed nor exited.
    assert "error=StoreError" in log or "event=store_unavailable_holding_outcome" in log, "the worker noticed"
    for phone in phones:
        assert phone not in log, "a phone number reached the log"

    async with OtpRouter.from_settings(
        settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False
    ) as router:
        contacted = first_contact(pair)
        created: dict[str, float] = {}
        for n, phone in enumerate(phones):
            # The same key finds the worker's verification; nothing new is started.
            v = await router.start(phone, idempotency_key=f"outage-{n}")
            assert not v.created
            created[phone] = v.created_at
            # Write-ahead: the record existed before any provider heard of the number.
            assert v.created_at <= contacted[phone]
            assert len(pair.telegram.sent_to(phone)) == 1, "exactly one Telegram message"
            assert pair.twilio.messages_to(phone) == [], "and no SMS"
            code = await read_code(pair, phone, wait=10.0)
            assert code is not None, "the code was delivered"
            assert (await router.check(v.id, code)).valid
            ledger = sum((e.amount for e in await router.store.ledger(v.id)), Decimal(0))
            assert ledger == telegram_charged(pair, phone), "booked what Telegram charged, once"
        # The outage did land mid-run: some verifications are from before it,
        # and the worker resumed after it (the rest were created after the restart).
        assert [p for p, t in created.items() if t < killed_at]
        assert [p for p, t in created.items() if t >= restarted_at], "the worker resumed"
    queue = open_queue(queue_url_for(settings))
    try:
        assert await queue.depth() == 0 and await queue.pending() == 0
        assert await queue.dead_letters() == []
    finally:
        await queue.aclose()


async def _count(pair: EmulatorPair, at_least: int) -> bool:
    return sum(1 for e in pair.telegram.log if e.method == "checkSendAbility") >= at_least


async def _all_sent(pair: EmulatorPair, phones: list[str]) -> bool:
    return all(pair.telegram.sent_to(p) for p in phones)


# --- the router holds a provider's answer through a short outage ------------------------


@pytest.fixture
async def quick_pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(default_delivery=0.05))


def blip_after_probe(monkeypatch: pytest.MonkeyPatch, router: OtpRouter, failures: int | None) -> list[str]:
    """Make the store refuse the next ``failures`` writes (None: all) once a probe has answered.

    Returns a list that gets one entry per refused write.
    """
    refused: list[str] = []
    down = False
    real_cas = router.store.cas
    channel = router.channels[ChannelName.TELEGRAM]
    real_probe = channel.probe

    async def probe(phone: str) -> ProbeResult:
        nonlocal down
        result = await real_probe(phone)
        down = True  # the store goes away while the answer is on its way back
        return result

    async def cas(*args: Any, **kwargs: Any) -> Record:
        nonlocal down
        if down and (failures is None or len(refused) < failures):
            refused.append("cas")
            raise StoreError("redis: ConnectionError: connection refused")
        down = False
        return await real_cas(*args, **kwargs)

    monkeypatch.setattr(channel, "probe", probe)
    monkeypatch.setattr(router.store, "cas", cas)
    return refused


async def test_a_probe_answer_is_held_through_a_store_blip(
    quick_pair: EmulatorPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's answer (a charged request_id) arrives while the store is away: the router
    retries the write, so the send goes out on that request_id at once, not a lease later."""
    pair = quick_pair
    settings = emulated_settings(
        pair, store_url=f"sqlite:///{tmp_path / 'otp.db'}", code_secret=SecretStr("blip-secret")
    )
    phone = sample_numbers("GB", 1, offset=4000)[0]
    async with OtpRouter.from_settings(
        settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False
    ) as router:
        refused = blip_after_probe(monkeypatch, router, failures=3)
        v = await router.start(phone)
        assert refused == ["cas"] * 3, "the store did refuse the probe's answer"
        assert v.channel == "telegram" and v.fallbacks == ()
        [request_id] = pair.telegram.sent_to(phone)
        probes = [e for e in pair.telegram.log if e.method == "checkSendAbility"]
        assert [e.request_id for e in probes] == [request_id], "one probe, its request_id used to send"
        code = await read_code(pair, phone, wait=5.0)
        assert code is not None and (await router.check(v.id, code)).valid
        assert await router.ledger_total(v.id) == telegram_charged(pair, phone)


async def test_a_long_outage_ends_the_hold_with_a_store_error(
    quick_pair: EmulatorPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold is bounded: a store that stays away makes start() raise StoreError, and
    nothing is sent meanwhile (the write-ahead record lets a later run finish the attempt)."""
    pair = quick_pair
    monkeypatch.setattr(router_module, "STORE_HOLD", 0.5)
    settings = emulated_settings(
        pair, store_url=f"sqlite:///{tmp_path / 'otp.db'}", code_secret=SecretStr("blip-secret")
    )
    phone = sample_numbers("GB", 1, offset=4100)[0]
    async with OtpRouter.from_settings(
        settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False
    ) as router:
        refused = blip_after_probe(monkeypatch, router, failures=None)
        with pytest.raises(StoreError, match=r"^redis: "):
            await router.start(phone)
        assert len(refused) > 1, "the write was retried before giving up"
        assert pair.telegram.sent_to(phone) == [] and pair.twilio.messages_to(phone) == []
