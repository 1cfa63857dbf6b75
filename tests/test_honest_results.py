"""A verification that no channel could send is a failure everywhere: library, sync facade, CLI, API,
worker. The failed verification is still stored, so ``get``, ``check`` and the ledger agree."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from otp_router import SyncOtpRouter
from otp_router.config import RetrySettings, Settings
from otp_router.core import CheckOutcome, Status
from otp_router.emulators import (
    EmulatorPair,
    Script,
)
from otp_router.errors import AllProvidersFailed, InvalidRecipient
from otp_router.harness import emulated_settings, provider_environ
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, FakeChannel, ProbeResult
from otp_router.queue import QueueMessage, open_queue
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.worker import Worker

PHONE = "+447400123456"


async def refuse_telegram(method: str, arg: Any) -> Any:
    if method == "probe":
        return ProbeResult(False, reason="PHONE_NUMBER_NOT_FOUND")
    raise AssertionError(f"unexpected telegram call {method}")


async def refuse_sms(method: str, arg: Any) -> Any:
    if method == "probe":
        return ProbeResult(True)
    if method == "send":
        raise InvalidRecipient("landline", provider="twilio", code="21614")
    return None


def refusing_router(settings: Settings | None = None, store: MemoryStore | None = None) -> OtpRouter:
    return OtpRouter(
        store=store or MemoryStore(),
        channels={
            ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, refuse_telegram, provider="telegram"),
            ChannelName.SMS: FakeChannel(ChannelName.SMS, refuse_sms, provider="twilio"),
        },
        settings=settings or Settings(code_secret=SecretStr("s")),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )


async def test_start_raises_and_the_failed_verification_is_stored() -> None:
    """``start`` raises with the id and each channel's reason; ``get``/``check`` see it failed."""
    async with refusing_router() as router:
        with pytest.raises(AllProvidersFailed) as raised:
            await router.start(PHONE)
        exc = raised.value
        assert exc.causes == {"telegram": "ability_refused", "sms": "permanent_error"}
        assert "ability_refused" in str(exc) and PHONE[3:] not in str(exc)
        assert exc.verification_id is not None and exc.verification is not None
        stored = await router.get(exc.verification_id)
        assert stored.status is Status.FAILED and stored.id == exc.verification.id
        result = await router.check(exc.verification_id, "123456")
        assert not result.valid and result.status is not CheckOutcome.NOT_FOUND


def test_sync_facade_raises_the_same() -> None:
    """The blocking facade raises ``AllProvidersFailed`` too, with the same details."""
    with SyncOtpRouter(refusing_router) as router:
        with pytest.raises(AllProvidersFailed) as raised:
            router.start(PHONE, idempotency_key="k1")
        assert raised.value.verification_id is not None
        assert router.get(raised.value.verification_id).status is Status.FAILED
        # An idempotent repeat is the same failure, not a success.
        with pytest.raises(AllProvidersFailed) as again:
            router.start(PHONE, idempotency_key="k1")
        assert again.value.verification_id == raised.value.verification_id


async def test_worker_acknowledges_a_failed_verification(tmp_path: Path) -> None:
    """The worker acks the message (the failure is stored; a redelivery would change nothing)."""
    settings = Settings(
        store_url="memory://",
        queue_url=f"sqlite:///{tmp_path / 'q.db'}",
        code_secret=SecretStr("s"),
        retry=RetrySettings(backoff=False),
    )
    store = MemoryStore()
    queue = open_queue(settings.queue_url or "")
    try:
        await queue.enqueue(QueueMessage(phone=PHONE, idempotency_key="failing"))
    finally:
        await queue.aclose()
    router = refusing_router(settings, store)
    worker = Worker(settings, router=router, name="w", serve_http=False, burst=True, read_block=0.05)
    assert await worker.run() == 0
    registry = worker.metrics.registry
    assert registry is not None
    assert registry.get_sample_value("otp_router_queue_messages_total", {"outcome": "processed"}) == 1
    queue = open_queue(settings.queue_url or "")
    try:
        assert (await queue.depth(), await queue.pending(), await queue.dead_letters()) == (0, 0, [])
    finally:
        await queue.aclose()


async def test_api_answers_502_with_id_and_causes() -> None:
    """The HTTP API answers 502 ``all_providers_failed`` naming the stored verification."""
    import httpx

    from otp_router.webapp import create_app

    router = refusing_router(Settings(code_secret=SecretStr("s"), api_token=SecretStr("tok")))
    async with router:
        app = create_app(router)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            resp = await client.post(
                "/v1/verifications", json={"phone": PHONE}, headers={"Authorization": "Bearer tok"}
            )
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert error["code"] == "all_providers_failed"
        assert error["causes"] == {"telegram": "ability_refused", "sms": "permanent_error"}
        assert (await router.get(error["verification_id"])).status is Status.FAILED
        assert PHONE[3:] not in resp.text


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=0.05))


async def test_cli_send_exits_3_with_one_line(pair: EmulatorPair, tmp_path: Path) -> None:
    """``otp-router send`` to a number no channel can reach: one line on stderr, exit 3, nothing on stdout;
    ``status`` then shows the stored verification as failed."""
    phone = "+4915123451299"
    pair.script.set(phone, telegram="absent", sms_error=21614)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))}
    env = {
        **base,
        **provider_environ(
            emulated_settings(
                pair, store_url=f"sqlite:///{tmp_path / 'cli.db'}", code_secret=SecretStr("cli-test-secret")
            )
        ),
    }

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "otp_router", *args, env=env, stdout=-1, stderr=-1
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run("send", phone)
    assert code == 3 and out == "", (code, out, err)
    [line] = err.strip().splitlines()
    assert "no channel could send" in line and "telegram: ability_refused" in line
    assert phone[3:] not in line
    vid = line.split("verification ", 1)[1].split(":", 1)[0]
    code, out, _ = await run("status", vid)
    assert code == 0 and json.loads(out)["status"] == "failed"
