"""The worker end to end: real Redis or SQLite, the real router, the emulators over loopback.

The emulators' request logs are the witness: they show how many messages
each phone was actually sent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from otp_router.config import FraudSettings, LimitSettings, RetrySettings, Settings
from otp_router.core import IO_LEASE
from otp_router.emulators import EmulatorPair, Script
from otp_router.errors import StoreError
from otp_router.harness import emulated_settings, provider_environ, sample_numbers
from otp_router.metrics import Metrics
from otp_router.policy import CountryRule, Policy
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel, ProbeResult, SendResult
from otp_router.queue import Queue, QueueMessage, open_queue, queue_url_for
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.worker import Worker

SEND = "sendVerificationMessage"


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    """Both emulators on free ports; Telegram delivers quickly so no deadline falls back to SMS."""
    return await make_emulators(Script(default_delivery=0.1))


def settings_for(pair: EmulatorPair, store_url: str, **overrides: Any) -> Settings:
    """Worker settings on the emulators: no backoff, a short visibility timeout, a fixed code secret."""
    values: dict[str, Any] = {
        "store_url": store_url,
        "code_secret": SecretStr("worker-test-secret"),
        "retry": RetrySettings(backoff=False, attempts=2, timeout=10),
        "queue_visibility_timeout": 1.0,
        "concurrency": 10,
        "shutdown_grace": 10.0,
        "http_port": 0,
    }
    values.update(overrides)
    return emulated_settings(pair, **values)


def make_worker(settings: Settings, name: str, **kwargs: Any) -> Worker:
    """A worker with its own router, store connection, queue connection and metrics registry."""
    policy = kwargs.pop("policy", None)
    router = OtpRouter.from_settings(settings, metrics=Metrics(CollectorRegistry()), policy=policy)
    kwargs.setdefault("serve_http", False)
    return Worker(settings, router=router, name=name, heartbeat_interval=0.2, **kwargs)


def counted(worker: Worker, metric: str, **labels: str) -> float:
    registry = worker.metrics.registry
    assert registry is not None
    return registry.get_sample_value(metric, labels) or 0.0


def telegram_sends(pair: EmulatorPair) -> Counter[str | None]:
    """Accepted Telegram sends per phone number, from the emulator's own log."""
    return Counter(e.phone_number for e in pair.telegram.log if e.method == SEND and e.outcome == "ok")


def sms_sends(pair: EmulatorPair, phones: list[str]) -> Counter[str]:
    """SMS messages created per phone number, from the Twilio emulator's own records."""
    return Counter(
        {phone: len(pair.twilio.messages_to(phone)) for phone in phones if pair.twilio.messages_to(phone)}
    )


def telegram_charges(pair: EmulatorPair) -> Decimal:
    """Everything the Telegram emulator charged, from its own request log."""
    return sum((Decimal(e.charged) for e in pair.telegram.log if e.charged), Decimal(0))


async def enqueue_all(settings: Settings, phones: list[str], *, prefix: str = "k") -> None:
    queue = open_queue(queue_url_for(settings))
    try:
        for n, phone in enumerate(phones):
            await queue.enqueue(QueueMessage(phone=phone, idempotency_key=f"{prefix}-{n}"))
    finally:
        await queue.aclose()


async def queue_counts(settings: Settings) -> tuple[int, int]:
    """(waiting, pending) messages."""
    queue = open_queue(queue_url_for(settings))
    try:
        return await queue.depth(), await queue.pending()
    finally:
        await queue.aclose()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    within: float = 10.0,
    what: str = "condition not reached",
) -> None:
    """Poll ``condition`` until true; fail the test (saying ``what``) if it never becomes true."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > until:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives an ``otp-router`` worker subprocess the same settings.

    ``extra`` variables are added last (and win): a port, a log level, a shorter grace.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))},
        **provider_environ(settings),
        "OTP_ROUTER_RETRY__BACKOFF": "false",
        "OTP_ROUTER_QUEUE_VISIBILITY_TIMEOUT": str(settings.queue_visibility_timeout),
        "OTP_ROUTER_CONCURRENCY": str(settings.concurrency),
        "OTP_ROUTER_SHUTDOWN_GRACE": str(settings.shutdown_grace),
    }
    env.update(extra)
    return env


async def otp_router_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``otp-router ARGS`` (the installed console script when present)."""
    script = Path(sys.executable).with_name("otp-router")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from otp_router.cli import main; sys.exit(main())"]
    )
    return await asyncio.create_subprocess_exec(
        *command, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


# --- the distributed guarantees ---------------------------------------------------


@pytest.fixture(params=["redis", "redis-cluster", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A shared store (and, derived from it, queue): Redis, a three-master Redis Cluster or a SQLite file."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    if request.param == "redis-cluster":
        cluster_url: str = request.getfixturevalue("redis_cluster_url")
        return cluster_url
    return f"sqlite:///{tmp_path / 'otp.db'}"


async def test_two_workers_start_each_verification_exactly_once(pair: EmulatorPair, store_url: str) -> None:
    """Two workers in one consumer group process 50 messages; every phone gets exactly one Telegram send."""
    # 50 numbers of one prefix and nobody enters a code: the conversion guard would (rightly) step in.
    settings = settings_for(pair, store_url, fraud=FraudSettings(min_conversion=0))
    phones = sample_numbers("GB", 50)
    await enqueue_all(settings, phones)
    first, second = make_worker(settings, "w1", burst=True), make_worker(settings, "w2", burst=True)
    codes = await asyncio.gather(first.run(), second.run())
    assert list(codes) == [0, 0]
    assert telegram_sends(pair) == Counter(phones)
    processed = [counted(w, "otp_router_queue_messages_total", outcome="processed") for w in (first, second)]
    assert sum(processed) == 50
    assert min(processed) > 0  # both took part
    assert await queue_counts(settings) == (0, 0)


async def test_a_killed_worker_loses_nothing_and_sends_nothing_twice(
    pair: EmulatorPair, redis_url: str
) -> None:
    """SIGKILL mid-send: a second worker reclaims the messages, recovery re-issues the interrupted sends
    with the same request_id, and every phone ends with exactly one Telegram message."""
    settings = settings_for(pair, redis_url, concurrency=4)
    phones = sample_numbers("GB", 8)
    for phone in phones:
        # Slow answers: the kill lands while requests are in flight.
        pair.script.set(phone, telegram_latency=1.0)
    await enqueue_all(settings, phones)
    doomed = await otp_router_cli("worker", "--no-http", "--name", "doomed", env=cli_env(settings))
    try:
        await wait_until(lambda: any(e.method == SEND for e in pair.telegram.log), within=12)
    finally:
        doomed.kill()
        await doomed.communicate()
    assert doomed.returncode == -signal.SIGKILL
    for phone in phones:
        pair.script.set(phone, telegram_latency=0.0)
    # Messages the dead worker held become reclaimable after the visibility timeout.
    await asyncio.sleep(settings.queue_visibility_timeout + 0.2)
    rescuer = make_worker(settings, "rescuer", burst=True)
    assert await rescuer.run() == 0
    assert counted(rescuer, "otp_router_queue_messages_total", outcome="reclaimed") >= 1
    assert await queue_counts(settings) == (0, 0)
    assert all(count == 1 for count in telegram_sends(pair).values())
    # Let every accepted message reach its phone first (the emulator delivers after 0.1 s): the sweep
    # below runs past their deadlines and must find them delivered, not fall back for lack of time.
    await wait_until(lambda: all(pair.telegram.inbox(phone) for phone in telegram_sends(pair) if phone))

    # Verifications cut off mid-probe or mid-send are recovered by their write-ahead
    # deadline (IO_LEASE). Run that deadline sweep now with a clock set past the lease.
    recovery = OtpRouter.from_settings(
        settings,
        metrics=Metrics(CollectorRegistry()),
        clock=lambda: time.time() + IO_LEASE + 1,
        run_deadlines=False,
    )
    async with recovery:
        for _ in range(3):
            await recovery.fire_due()
        ledger = await recovery.store.ledger()
    assert telegram_sends(pair) == Counter(phones)
    # No SMS either: a resumed send answered MESSAGE_ALREADY_SENT is a sent Telegram message, not a
    # reason to fall back (which would make the user pay twice).
    assert sms_sends(pair, phones) == Counter()
    # Every fee Telegram charged is booked once (probes in advance, nothing refunded yet).
    assert sum((e.amount for e in ledger), Decimal(0)) == telegram_charges(pair)
    assert len({e.verification_id for e in ledger}) == len(phones)
    # The witness that sends really were cut off mid-flight and re-issued without a second message:
    assert any(e.method == SEND and e.outcome == "MESSAGE_ALREADY_SENT" for e in pair.telegram.log)


async def test_poison_messages_are_dead_lettered_and_the_rest_processed(
    pair: EmulatorPair, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad JSON, schema violations, bad or blocked numbers, key conflicts and rate limits become dead
    letters with their reasons; good messages and a duplicate are still handled; no log line holds a phone."""
    caplog.set_level(logging.INFO)
    settings = settings_for(
        pair,
        redis_url,
        concurrency=1,  # in order, so the conflict and the rate limit hit the second message
        limits=LimitSettings(per_phone=1),
    )
    good, other, blocked = sample_numbers("GB", 2) + sample_numbers("FR", 1)
    queue = open_queue(queue_url_for(settings))
    ids: dict[str, str] = {}
    try:
        ids["good"] = await queue.enqueue(QueueMessage(phone=good, idempotency_key="a"))
        ids["bad_json"] = await queue.enqueue("{oops")
        ids["invalid_message"] = await queue.enqueue('{"phone": "' + other + '"}')
        ids["invalid_phone"] = await queue.enqueue(QueueMessage(phone="+4412", idempotency_key="b"))
        ids["unsupported_country"] = await queue.enqueue(QueueMessage(phone=blocked, idempotency_key="c"))
        premium = QueueMessage(phone="+449012345678", idempotency_key="f")
        ids["unsupported_number_type"] = await queue.enqueue(premium)
        ids["idempotency_conflict"] = await queue.enqueue(QueueMessage(phone=other, idempotency_key="a"))
        ids["rate_limited"] = await queue.enqueue(QueueMessage(phone=good, idempotency_key="d"))
        ids["duplicate"] = await queue.enqueue(QueueMessage(phone=good, idempotency_key="a"))
        ids["other"] = await queue.enqueue(QueueMessage(phone=other, idempotency_key="e"))
        policy = Policy(countries={"FR": CountryRule(blocked=True)})
        worker = make_worker(settings, "w", burst=True, policy=policy)
        assert await worker.run() == 0
        dead = {d.message_id: d.reason for d in await queue.dead_letters()}
        assert await queue.depth() == 0
        assert await queue.pending() == 0
    finally:
        await queue.aclose()
    reasons = {"bad_json", "invalid_message", "invalid_phone", "unsupported_country"}
    reasons |= {"idempotency_conflict", "rate_limited", "unsupported_number_type"}
    assert dead == {ids[reason]: reason for reason in reasons}
    assert telegram_sends(pair) == Counter([good, other])
    for reason in reasons:
        assert counted(worker, "otp_router_dead_letters_total", reason=reason) == 1
    assert counted(worker, "otp_router_queue_messages_total", outcome="processed") == 2
    assert counted(worker, "otp_router_queue_messages_total", outcome="duplicate") == 1
    for phone in (good, other, blocked):
        assert phone[1:] not in caplog.text
    assert "event=dead_letter" in caplog.text


async def test_sigterm_finishes_in_flight_work_then_exits_zero(pair: EmulatorPair, redis_url: str) -> None:
    """SIGTERM with messages in flight: they complete (one send each, all acknowledged), exit status 0."""
    settings = settings_for(pair, redis_url, concurrency=5)
    phones = sample_numbers("GB", 3)
    for phone in phones:
        pair.script.set(phone, telegram_latency=0.7)
    await enqueue_all(settings, phones)
    process = await otp_router_cli("worker", "--no-http", "--name", "graceful", env=cli_env(settings))
    try:
        await wait_until(lambda: {e.phone_number for e in pair.telegram.log} >= set(phones), within=12)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "event=draining" in stderr.decode()
    assert telegram_sends(pair) == Counter(phones)
    assert await queue_counts(settings) == (0, 0)


async def test_worker_burst_cli_drains_a_sqlite_queue(pair: EmulatorPair, tmp_path: Path) -> None:
    """``otp-router worker --burst`` configured from the environment processes the queue beside
    the SQLite store and exits 0."""
    settings = settings_for(pair, f"sqlite:///{tmp_path / 'otp.db'}")
    phones = sample_numbers("GB", 3)
    await enqueue_all(settings, phones)
    process = await otp_router_cli("worker", "--burst", env=cli_env(settings))
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert telegram_sends(pair) == Counter(phones)
    assert await queue_counts(settings) == (0, 0)
    assert (tmp_path / "otp.queue.db").exists()


async def test_worker_check_reports_a_live_worker(pair: EmulatorPair, redis_url: str) -> None:
    """``otp-router worker --check`` exits 1 with no worker, 0 while one runs, 1 after it stopped."""
    settings = settings_for(pair, redis_url)
    env = cli_env(settings)

    async def check() -> int | None:
        process = await otp_router_cli("worker", "--check", "--name", "checked", env=env)
        await process.communicate()
        return process.returncode

    assert await check() == 1
    worker = make_worker(settings, "checked")
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(_heartbeat_of(settings, "checked"))
        assert await check() == 0
    finally:
        worker.stop()
        assert await running == 0
    assert await check() == 1


def _heartbeat_of(settings: Settings, name: str) -> Callable[[], Awaitable[bool]]:
    async def fresh() -> bool:
        queue = open_queue(queue_url_for(settings))
        try:
            return await queue.last_heartbeat(name) is not None
        finally:
            await queue.aclose()

    return fresh


# --- the worker's own rules, with injected fakes -------------------------------------


class GatedTelegram:
    """A fake Telegram channel whose sends wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sending = 0
        self.sent: list[str] = []

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref=f"req-{arg}", cost=Decimal("0.01"))
        if method == "send":
            self.sending += 1
            await self.gate.wait()
            self.sent.append(arg.phone)
            return SendResult(ref=arg.probe_ref, state=DeliveryState.SENT, cost=Decimal("0.01"))
        return True


def fake_router(settings: Settings, handler: Any, store: MemoryStore | None = None) -> OtpRouter:
    return OtpRouter(
        store=store or MemoryStore(),
        channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, handler)},
        settings=settings,
        metrics=Metrics(CollectorRegistry()),
    )


def fake_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "store_url": "memory://",
        "queue_url": f"sqlite:///{tmp_path / 'q.db'}",
        "code_secret": SecretStr("worker-test-secret"),
        "retry": RetrySettings(backoff=False),
        "queue_visibility_timeout": 0.3,
    }
    values.update(overrides)
    return Settings(**values)


async def test_never_holds_more_messages_than_its_concurrency(tmp_path: Path) -> None:
    """With every slot busy the worker reads nothing more: the rest stays waiting in the queue."""
    settings = fake_settings(tmp_path, concurrency=3)
    telegram = GatedTelegram()
    phones = sample_numbers("GB", 10)
    await enqueue_all(settings, phones)
    worker = Worker(
        settings,
        router=fake_router(settings, telegram),
        name="bounded",
        serve_http=False,
        read_block=0.05,
        heartbeat_interval=0.1,
    )
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: telegram.sending == 3)
        await asyncio.sleep(0.3)  # room for an over-eager consumer to read more
        assert await queue_counts(settings) == (7, 3)
        assert counted(worker, "otp_router_inflight") == 3
        # Maintenance reports the backlog and beats.
        await wait_until(lambda: counted(worker, "otp_router_queue_depth") == 7)
        assert counted(worker, "otp_router_worker_heartbeat_timestamp_seconds") > 0
        telegram.gate.set()
        await wait_until(lambda: len(telegram.sent) == 10)
        await wait_until(lambda: _drained(settings))
    finally:
        worker.stop()
        assert await running == 0
    assert sorted(telegram.sent) == sorted(phones)


async def _drained(settings: Settings) -> bool:
    return await queue_counts(settings) == (0, 0)


class FlakyStore(MemoryStore):
    """A memory store whose first ``failures`` creates fail as if the database were down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("database unavailable")
        return await super().create(*args, **kwargs)


async def test_a_store_failure_leaves_the_message_for_redelivery(tmp_path: Path) -> None:
    """A message whose start hit a store error is not acknowledged, comes back, and is processed once."""
    settings = fake_settings(tmp_path)
    telegram = GatedTelegram()
    telegram.gate.set()
    [phone] = sample_numbers("GB", 1)
    await enqueue_all(settings, [phone])
    router = fake_router(settings, telegram, FlakyStore(failures=1))
    worker = Worker(settings, router=router, name="flaky", serve_http=False, read_block=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _drained(settings))
    finally:
        worker.stop()
        assert await running == 0
    assert telegram.sent == [phone]
    assert counted(worker, "otp_router_queue_messages_total", outcome="reclaimed") == 1
    assert counted(worker, "otp_router_queue_messages_total", outcome="processed") == 1


async def test_a_message_delivered_too_often_is_dead_lettered(tmp_path: Path) -> None:
    """A message already delivered ``queue_max_deliveries`` times is set aside, not started again."""
    settings = fake_settings(tmp_path, queue_max_deliveries=1)
    telegram = GatedTelegram()
    await enqueue_all(settings, sample_numbers("GB", 1))
    queue: Queue = open_queue(queue_url_for(settings))
    try:
        assert len(await queue.read("crashed", 1, 0)) == 1
        await asyncio.sleep(settings.queue_visibility_timeout + 0.1)
        worker = Worker(
            settings, router=fake_router(settings, telegram), name="w", serve_http=False, burst=True
        )
        assert await worker.run() == 0
        [dead] = await queue.dead_letters()
    finally:
        await queue.aclose()
    assert dead.reason == "too_many_deliveries"
    assert dead.attempts == 2
    assert telegram.sending == 0


async def test_serves_the_web_app_while_running(tmp_path: Path) -> None:
    """The worker serves /healthz (store and queue pinged) on its HTTP port until it stops."""
    pytest.importorskip("fastapi")
    settings = fake_settings(tmp_path, http_port=0)
    worker = Worker(settings, router=fake_router(settings, GatedTelegram()), name="web", read_block=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port is not None)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{worker.http_port}/healthz")
        assert response.status_code == 200
        assert {"store", "queue"} <= set(response.json()["ok"])
    finally:
        worker.stop()
        assert await running == 0


async def test_ops_port_serves_metrics_and_healthz_apart_behind_the_ops_token(tmp_path: Path) -> None:
    """With OTP_ROUTER_OPS_PORT, /metrics and /healthz leave the public port for their own listener,
    where OTP_ROUTER_OPS_TOKEN guards them; the API stays on the public port."""
    pytest.importorskip("fastapi")
    settings = fake_settings(
        tmp_path, http_port=0, ops_port=0, ops_token="ops-secret", api_token="api-secret"
    )
    worker = Worker(settings, router=fake_router(settings, GatedTelegram()), name="web", read_block=0.05)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.http_port is not None and worker.ops_port is not None)
        assert worker.ops_port != worker.http_port
        public, ops = f"http://127.0.0.1:{worker.http_port}", f"http://127.0.0.1:{worker.ops_port}"
        bearer = {"Authorization": "Bearer ops-secret"}
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{public}/healthz", headers=bearer)).status_code == 404
            assert (await client.get(f"{public}/metrics", headers=bearer)).status_code == 404
            api = await client.get(
                f"{public}/v1/verifications/v_x", headers={"Authorization": "Bearer api-secret"}
            )
            assert api.status_code == 404 and "no verification" in api.json()["error"]["message"]
            assert (await client.get(f"{ops}/healthz")).status_code == 401
            response = await client.get(f"{ops}/healthz", headers=bearer)
            assert response.status_code == 200 and {"store", "queue"} <= set(response.json()["ok"])
            assert (await client.get(f"{ops}/metrics", headers=bearer)).status_code == 200
            assert (await client.get(f"{ops}/v1/verifications/v_x")).status_code == 404
    finally:
        worker.stop()
        assert await running == 0


async def test_an_unusable_http_port_stops_the_worker_with_status_1(tmp_path: Path) -> None:
    """If the HTTP port is taken, the worker stops cleanly and reports failure instead of running half-way."""
    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = fake_settings(tmp_path, http_port=taken.getsockname()[1])
        worker = Worker(settings, router=fake_router(settings, GatedTelegram()), name="web", read_block=0.05)
        assert await asyncio.wait_for(worker.run(), timeout=10) == 1
