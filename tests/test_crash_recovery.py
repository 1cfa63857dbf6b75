"""Crash recovery through the real channels and the emulators, in one process.

A wrapper channel stands in for the process dying at a precise moment (it
raises a BaseException the router does not catch); a second router on the same
store then recovers through the stored write-ahead deadline. The emulators'
own logs are the witness of what the providers did and charged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import RetrySettings, Settings
from otp_router.core import IO_LEASE, AttemptPhase, Status, VerificationState
from otp_router.emulators import EmulatorPair, Script
from otp_router.harness import emulated_settings
from otp_router.metrics import Metrics
from otp_router.providers.base import Channel, ChannelName, ProbeResult, SendRequest, SendResult
from otp_router.providers.telegram import TelegramChannel
from otp_router.providers.twilio_sms import TwilioSmsChannel
from otp_router.router import OtpRouter
from otp_router.store import open_store

PHONE = "+447400123456"


class Died(BaseException):
    """The process died here (nothing after this point ran)."""


class DieAfter(TelegramChannel):
    """The real Telegram channel; the process dies right after the named call returned."""

    die_after: str = ""

    async def probe(self, phone: str) -> ProbeResult:
        result = await super().probe(phone)
        if self.die_after == "probe":
            raise Died
        return result

    async def send(self, request: SendRequest) -> SendResult:
        result = await super().send(request)
        if self.die_after == "send":
            raise Died
        return result


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(default_delivery=0.05))


@pytest.fixture
def settings(pair: EmulatorPair, tmp_path: Path) -> Settings:
    return emulated_settings(
        pair,
        store_url=f"sqlite:///{tmp_path / 'otp.db'}",
        code_secret="crash-secret",
        retry=RetrySettings(backoff=False, attempts=2, timeout=5),
    )


def router_for(
    settings: Settings,
    client: httpx.AsyncClient,
    *,
    die_after: str = "",
    clock: Callable[[], float] = time.time,
) -> OtpRouter:
    telegram = DieAfter(settings.telegram, settings.retry, client)
    telegram.die_after = die_after
    channels: dict[ChannelName, Channel] = {
        ChannelName.TELEGRAM: telegram,
        ChannelName.SMS: TwilioSmsChannel(settings.twilio, settings.retry, client),
    }
    return OtpRouter(
        store=open_store(settings.store_url),
        channels=channels,
        settings=settings,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
        run_deadlines=False,
    )


async def crash(doomed: OtpRouter) -> None:
    """``doomed`` starts a verification for PHONE and the process dies on the way; its store
    connection goes away with it."""
    await doomed.open()
    with pytest.raises(Died):
        await doomed.start(PHONE)
    await doomed.store.aclose()


@contextlib.asynccontextmanager
async def recovering(settings: Settings, client: httpx.AsyncClient) -> AsyncIterator[OtpRouter]:
    """The router of the next process on the same store, its clock past the dead one's I/O lease
    (so the stored write-ahead deadline is due)."""
    later = router_for(settings, client, clock=lambda: time.time() + IO_LEASE + 1)
    await later.open()
    try:
        yield later
    finally:
        await later.store.aclose()


def provider_charges(pair: EmulatorPair) -> Decimal:
    """What the Telegram emulator charged, from its own request log."""
    return sum((Decimal(e.charged) for e in pair.telegram.log if e.charged), Decimal(0))


async def test_crash_after_telegram_accepted_never_falls_back(
    pair: EmulatorPair, settings: Settings, http_client: httpx.AsyncClient
) -> None:
    """Killed after Telegram accepted the send, before the write: recovery re-sends with the same
    request_id, Telegram answers MESSAGE_ALREADY_SENT, and the verification keeps waiting on Telegram.
    One Telegram message, no SMS, the ledger equal to what Telegram charged."""
    await crash(router_for(settings, http_client, die_after="send"))

    async with recovering(settings, http_client) as later:
        assert await later.fire_due() == 1
        (record_id,) = {e.verification_id for e in await later.store.ledger()}
        record = await later.store.get(record_id)
        assert record is not None
        state = VerificationState.model_validate_json(record.data)
        assert state.status is Status.PENDING and state.fallbacks == ()
        cur = state.current
        assert cur is not None and cur.channel is ChannelName.TELEGRAM
        assert cur.phase in (AttemptPhase.AWAITING, AttemptPhase.DELIVERED)
        sends = [e.outcome for e in pair.telegram.log if e.method == "sendVerificationMessage"]
        assert sends == ["ok", "MESSAGE_ALREADY_SENT"]
        assert pair.twilio.messages_to(PHONE) == []
        assert await later.ledger_total() == provider_charges(pair) == Decimal("0.01")


async def test_crash_after_the_probe_is_stored_reuses_its_request_id(
    pair: EmulatorPair, settings: Settings, http_client: httpx.AsyncClient
) -> None:
    """Killed once the probe's answer is stored but before the send: recovery sends with that same
    request_id (no second probe, no second fee)."""

    class DieBeforeSend(DieAfter):
        async def send(self, request: SendRequest) -> SendResult:
            raise Died

    doomed = router_for(settings, http_client)
    doomed.channels[ChannelName.TELEGRAM] = DieBeforeSend(settings.telegram, settings.retry, http_client)
    await crash(doomed)

    async with recovering(settings, http_client) as later:
        assert await later.fire_due() == 1
        probes = [e for e in pair.telegram.log if e.method == "checkSendAbility"]
        sends = [e for e in pair.telegram.log if e.method == "sendVerificationMessage"]
        assert len(probes) == 1
        assert [(e.request_id, e.outcome) for e in sends] == [(probes[0].request_id, "ok")]
        assert pair.twilio.messages_to(PHONE) == []
        assert await later.ledger_total() == provider_charges(pair) == Decimal("0.01")
