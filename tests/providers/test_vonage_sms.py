"""Vonage SMS through the official SDK against the Vonage emulator; receipts; in-channel failover."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from otp_router.config import CircuitSettings, RetrySettings, Settings, SmsLookupSettings, VonageSettings
from otp_router.core import Status, VerificationState
from otp_router.emulators import EmulatorPair, Script
from otp_router.errors import (
    ConfigError,
    InvalidRecipient,
    InvalidSignature,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    StaleWebhook,
)
from otp_router.harness import emulated_settings, read_code
from otp_router.metrics import Metrics
from otp_router.policy import Policy
from otp_router.providers.base import DeliveryState, SendRequest, StatusResult
from otp_router.providers.vonage_sms import VonageSmsChannel, parse_receipt, sign_params
from otp_router.router import OtpRouter

GB = "+447400120000"
TIME_SCALE = 0.05
NO_RETRY = RetrySettings(backoff=False, attempts=2, timeout=10)


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=TIME_SCALE))


def _vonage_settings(pair: EmulatorPair, **changes: Any) -> VonageSettings:
    base = emulated_settings(pair).vonage
    return VonageSettings(**{**base.model_dump(), "enabled": True, **changes})


@pytest.fixture
async def channel(pair: EmulatorPair) -> AsyncIterator[VonageSmsChannel]:
    ch = VonageSmsChannel(_vonage_settings(pair), NO_RETRY)
    yield ch
    await ch.aclose()


def _request(phone: str = GB, **kw: Any) -> SendRequest:
    return SendRequest(phone=phone, code="123456", ttl=60, payload="v_1", **kw)


async def test_send_is_accepted_with_its_price(channel: VonageSmsChannel, pair: EmulatorPair) -> None:
    """A send returns Vonage's message-id and the quoted price; the emulator delivers the text."""
    assert pair.vonage is not None
    result = await channel.send(_request())
    assert result.ref and result.state is DeliveryState.PENDING
    assert result.cost == pair.vonage.prices.sms_cost("GB", "Your login code is 123456")
    assert not result.cost_is_final
    assert pair.vonage.inbox(GB) == ["Your login code is 123456"]
    assert [e.outcome for e in pair.vonage.log] == ["accepted"]


async def test_inbox_reads_a_literal_plus_in_the_query_as_a_plus(
    channel: VonageSmsChannel, pair: EmulatorPair
) -> None:
    """/_emulator/inbox?phone=+44… with the plus typed, not encoded, is the number with its plus."""
    await channel.send(_request())
    async with httpx.AsyncClient() as client:
        for query in (f"phone={GB}", f"phone=%2B{GB[1:]}"):
            response = await client.get(f"{pair.vonage_url}/_emulator/inbox?{query}")
            assert response.request.url.query == query.encode()  # sent as typed
            assert response.json() == {"messages": ["Your login code is 123456"]}, query


@pytest.mark.parametrize(
    ("status", "error"),
    [(7, InvalidRecipient), (29, InvalidRecipient), (9, ProviderRejected), (1, ProviderRateLimited)],
)
async def test_refusal_statuses_map_to_our_tree(
    channel: VonageSmsChannel, pair: EmulatorPair, status: int, error: type[Exception]
) -> None:
    """A non-zero status (HTTP 200) becomes our class with Vonage's status as code."""
    pair.script.set(GB, vonage_status=status)
    with pytest.raises(error) as info:
        await channel.send(_request())
    assert info.value.code == str(status)  # type: ignore[attr-defined]


async def test_a_5xx_is_not_sent_again(channel: VonageSmsChannel, pair: EmulatorPair) -> None:
    """HTTP 500 may have queued the message: one request only (no SDK or router resend)."""
    assert pair.vonage is not None
    pair.script.set(GB, vonage_5xx=5)
    with pytest.raises(ProviderUnavailable) as info:
        await channel.send(_request())
    assert info.value.not_performed is False
    assert [e.outcome for e in pair.vonage.log] == ["http_500"]


async def test_bad_credentials_are_a_rejection(pair: EmulatorPair) -> None:
    """Wrong secret: status 4, a permanent rejection."""
    ch = VonageSmsChannel(_vonage_settings(pair, api_secret="wrong", signature_secret=""), NO_RETRY)
    try:
        with pytest.raises(ProviderRejected) as info:
            await ch.send(_request())
        assert info.value.code == "4"
    finally:
        await ch.aclose()


async def test_a_refused_connection_is_not_performed_and_retried(pair: EmulatorPair) -> None:
    """Nothing listening: not performed, so the send is retried up to the attempt limit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    retries: list[int] = []
    ch = VonageSmsChannel(
        _vonage_settings(pair, base_url=f"http://127.0.0.1:{port}"),
        NO_RETRY,
        on_retry=lambda exc, n, delay: retries.append(n),
    )
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await ch.send(_request())
        assert info.value.not_performed is True
        assert retries == [1]
    finally:
        await ch.aclose()


def test_missing_credentials_are_a_config_error() -> None:
    """No key or no sender: ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_VONAGE__API_KEY"):
        VonageSmsChannel(VonageSettings(enabled=True, from_number="x"), NO_RETRY)
    with pytest.raises(ConfigError, match="FROM_NUMBER"):
        VonageSmsChannel(VonageSettings(enabled=True, api_key="k", api_secret="s"), NO_RETRY)


async def test_sdk_request_logs_never_reach_the_logs(
    channel: VonageSmsChannel, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK logs request data (number, text) at debug: those records are dropped."""
    with caplog.at_level(logging.DEBUG):
        await channel.send(_request())
    assert not [r for r in caplog.records if "447400120000" in r.getMessage() or "123456" in r.getMessage()]


# --- delivery receipts ---------------------------------------------------------------------


class Receiver:
    """A local endpoint the emulator posts receipts to."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append({k: str(v) for k, v in (await request.post()).items()})
        self.arrived.set()
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/webhooks/vonage", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rec, f"http://127.0.0.1:{port}/webhooks/vonage"
    await runner.cleanup()


async def test_signed_receipt_is_parsed(
    channel: VonageSmsChannel, pair: EmulatorPair, receiver: tuple[Receiver, str]
) -> None:
    """The emulator's signed receipt verifies and says delivered, with price and our client-ref."""
    rec, url = receiver
    sent = await channel.send(_request(callback_url=url))
    await asyncio.wait_for(rec.arrived.wait(), 5)
    vid, status = parse_receipt(rec.received[0], _vonage_settings(pair))
    assert vid == "v_1"
    assert status.ref == sent.ref and status.state is DeliveryState.DELIVERED
    assert status.cost == sent.cost and status.cost_is_final


async def test_failed_receipt_carries_the_error_code(
    channel: VonageSmsChannel, pair: EmulatorPair, receiver: tuple[Receiver, str]
) -> None:
    """A failed message's receipt maps to FAILED with its err-code; nothing reaches the inbox."""
    assert pair.vonage is not None
    rec, url = receiver
    pair.script.set(GB, vonage_final="failed", vonage_err_code=3)
    await channel.send(_request(callback_url=url))
    await asyncio.wait_for(rec.arrived.wait(), 5)
    _, status = parse_receipt(rec.received[0], _vonage_settings(pair))
    assert status.state is DeliveryState.FAILED and status.error_code == "3"
    assert pair.vonage.inbox(GB) == []


def _signed(settings: VonageSettings, **params: str) -> dict[str, str]:
    secret = settings.signature_secret.get_secret_value()
    return {**params, "sig": sign_params(params, secret, settings.signature_method)}


def test_receipts_are_refused_when_forged_stale_or_unsigned() -> None:
    """A wrong sig, an old timestamp, or no configured secret: the receipt is refused."""
    settings = VonageSettings(signature_secret="s3cret")
    good = _signed(settings, messageId="M1", status="delivered", timestamp="1000")
    assert parse_receipt(good, settings, now=1000.0)[1].state is DeliveryState.DELIVERED
    with pytest.raises(InvalidSignature):
        parse_receipt({**good, "status": "failed"}, settings, now=1000.0)
    with pytest.raises(InvalidSignature):
        parse_receipt({k: v for k, v in good.items() if k != "sig"}, settings, now=1000.0)
    with pytest.raises(StaleWebhook):
        parse_receipt(good, settings, now=1000.0 + 301)
    with pytest.raises(InvalidSignature, match="SIGNATURE_SECRET"):
        parse_receipt(good, VonageSettings(), now=1000.0)


def test_signature_matches_the_sdk() -> None:
    """Our signing is the SDK's Auth.check_signature scheme (checked against the SDK itself)."""
    from vonage_http_client import Auth

    params = {"messageId": "M1", "status": "delivered", "text": "a&b=c", "timestamp": "1700000000"}
    for method in ("md5", "sha1", "sha256", "sha512"):
        auth = Auth(api_key="k", signature_secret="s3cret", signature_method=method)
        signed = {**params, "sig": sign_params(params, "s3cret", method)}
        assert auth.check_signature(dict(signed))


def test_receipt_states() -> None:
    """Receipt statuses map to provider-neutral states; unknown ones to UNKNOWN."""
    from otp_router.providers.vonage_sms import map_receipt_status

    assert map_receipt_status("delivered") is DeliveryState.DELIVERED
    assert map_receipt_status("rejected") is DeliveryState.UNDELIVERED
    assert map_receipt_status("expired").is_failed
    assert map_receipt_status("buffered") is DeliveryState.PENDING
    assert map_receipt_status("surprise") is DeliveryState.UNKNOWN


# --- SMS via Twilio, then SMS via Vonage -----------------------------------------------------

FAILOVER = Policy.from_dict(
    {"steps": [{"channel": "sms", "deliver_within": 30}, {"channel": "sms_backup", "deliver_within": 30}]},
    routes={"sms", "sms_backup"},
)


@pytest.fixture
def make_router(pair: EmulatorPair, tmp_path: Path) -> Callable[..., Any]:
    async def make(**overrides: Any) -> OtpRouter:
        settings = emulated_settings(
            pair,
            store_url=f"sqlite:///{tmp_path / 'otp.db'}",
            code_secret="failover-secret",
            retry=NO_RETRY,
            routes={"sms": "twilio_sms", "sms_backup": "vonage_sms"},
            sms_lookup=SmsLookupSettings(delays=(0.1, 0.4, 1.0), grace=0.3),
            **overrides,
        )
        settings = settings.model_copy(
            update={
                "vonage": settings.vonage.model_copy(update={"enabled": True}),
                "telegram": settings.telegram.model_copy(update={"enabled": False}),
            }
        )
        return OtpRouter.from_settings(settings, policy=FAILOVER, metrics=Metrics(CollectorRegistry()))

    return make


async def _until(
    router: OtpRouter, vid: str, check: Callable[[VerificationState], bool]
) -> VerificationState:
    for _ in range(400):
        record = await router.store.get(vid)
        assert record is not None
        state = VerificationState.model_validate_json(record.data)
        if check(state):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"never reached: {state!r}")


async def test_failover_when_twilio_refuses(make_router: Callable[..., Any], pair: EmulatorPair) -> None:
    """Twilio refuses the number: the same code goes out through Vonage at once."""
    pair.script.set(GB, sms_error=21408)
    async with await make_router() as router:
        v = await router.start(GB)
        assert v.channel == "sms_backup" and [f.reason for f in v.fallbacks] == ["permanent_error"]
        code = await read_code(pair, GB, wait=5)
        assert code is not None and (await router.check(v.id, code)).valid
    assert pair.twilio.inbox(GB) == []


async def test_failover_after_a_5xx_storm(make_router: Callable[..., Any], pair: EmulatorPair) -> None:
    """Every Twilio create answers 503: once a lookup proves nothing was created, Vonage sends."""
    assert pair.vonage is not None
    pair.script.set(GB, sms_5xx=100)
    async with await make_router() as router:
        v = await router.start(GB)
        assert v.channel == "sms", "an ambiguous send is not failed over at once (it may have gone out)"
        state = await _until(router, v.id, lambda s: s.channel == "sms_backup")
        assert [f.reason for f in state.fallbacks] == ["not_created"]
        code = await read_code(pair, GB, wait=5)
        assert code is not None and (await router.check(v.id, code)).valid
    assert pair.twilio.inbox(GB) == [] and len(pair.vonage.inbox(GB)) == 1


async def test_failover_when_twilio_circuit_is_open(
    make_router: Callable[..., Any], pair: EmulatorPair
) -> None:
    """With Twilio's circuit open (opened by one user's failures), the next user goes straight to Vonage."""
    other = "+447400120001"
    pair.script.set(other, sms_5xx=100)
    async with await make_router(circuit=CircuitSettings(failures=1, cooldown=60)) as router:
        await router.start(other)  # one transient failure opens the circuit
        v = await router.start(GB)
        assert v.channel == "sms_backup" and [f.reason for f in v.fallbacks] == ["circuit_open"]
        assert await read_code(pair, GB, wait=5) is not None
    assert pair.twilio.messages_to(GB) == []


async def test_vonage_receipt_delivers_through_the_router(
    make_router: Callable[..., Any], pair: EmulatorPair, receiver: tuple[Receiver, str]
) -> None:
    """A signed Vonage receipt, applied to the router, marks the backup step delivered with its price."""
    rec, url = receiver
    pair.script.set(GB, sms_error=21408)
    # The public URL is the test's receiver: the adapter asks Vonage for {public_url}/webhooks/vonage.
    async with await make_router(public_url=url.removesuffix("/webhooks/vonage")) as router:
        v = await router.start(GB)
        await asyncio.wait_for(rec.arrived.wait(), 5)
        vid, report = parse_receipt(rec.received[0], router.settings.vonage)
        assert vid == v.id
        await router.apply_report(vid, report)
        state = await _until(router, v.id, lambda s: s.attempts[-1].delivery is DeliveryState.DELIVERED)
        assert state.attempts[-1].provider == "vonage" and state.attempts[-1].cost > Decimal(0)
        assert state.status is Status.PENDING


def test_vonage_status_poll_says_unknown() -> None:
    """The SMS API has no per-message read: a poll answers UNKNOWN (the deadline decides)."""

    async def poll() -> StatusResult:
        ch = VonageSmsChannel(VonageSettings(api_key="k", api_secret="s", from_number="x"), NO_RETRY)
        try:
            return await ch.status("M1")
        finally:
            await ch.aclose()

    assert asyncio.run(poll()).state is DeliveryState.UNKNOWN


def test_settings_enable_the_route() -> None:
    """The routes setting binds a route to the vonage adapter by name."""
    settings = Settings(routes={"sms_backup": "vonage_sms"})
    assert settings.routes == {"sms_backup": "vonage_sms"}
