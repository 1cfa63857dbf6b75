"""WhatsApp and voice through Twilio: adapters over the SDK against the emulator, and as workflow steps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from otp_router.config import RetrySettings, TwilioVoiceSettings, TwilioWhatsAppSettings
from otp_router.core import VerificationState
from otp_router.emulators import EmulatorPair, Script
from otp_router.emulators.twilio import WHATSAPP_TEMPLATE
from otp_router.errors import ConfigError
from otp_router.harness import emulated_settings, read_code
from otp_router.metrics import Metrics
from otp_router.policy import Policy
from otp_router.providers.base import DeliveryState, SendRequest
from otp_router.providers.twilio_channels import (
    TwilioVoiceChannel,
    TwilioWhatsAppChannel,
    call_twiml,
    map_call_status,
    parse_call_callback,
    say_language,
)
from otp_router.router import OtpRouter

GB = "+447400120000"
FR = "+33612345678"
NO_RETRY = RetrySettings(backoff=False, attempts=2, timeout=10)
WHATSAPP = TwilioWhatsAppSettings(enabled=True, from_number="+15005550006", content_sid="HX" + "a" * 32)
VOICE = TwilioVoiceSettings(enabled=True, from_number="+15005550006")


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=0.05))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


async def test_whatsapp_sends_the_template_with_the_code(
    pair: EmulatorPair, client: httpx.AsyncClient
) -> None:
    """ContentSid + ContentVariables to a whatsapp: address; the user reads the code in WhatsApp, not SMS."""
    twilio = emulated_settings(pair).twilio
    channel = TwilioWhatsAppChannel(twilio, WHATSAPP, NO_RETRY, client)
    result = await channel.send(SendRequest(phone=GB, code="123456", ttl=60))
    message = pair.twilio.messages[result.ref]
    assert message.to == f"whatsapp:{GB}" and message.from_ == "whatsapp:+15005550006"
    await pair.twilio.settle()
    assert pair.twilio.whatsapp_inbox(GB) == [WHATSAPP_TEMPLATE.format(code="123456")]
    assert pair.twilio.inbox(GB) == []
    status = await channel.status(result.ref)
    assert status.state is DeliveryState.DELIVERED and status.cost is not None and status.cost_is_final


async def test_whatsapp_without_an_account_fails_with_63003(
    pair: EmulatorPair, client: httpx.AsyncClient
) -> None:
    """A number without WhatsApp: the message fails with 63003, a failed delivery (the step falls back)."""
    pair.script.set(GB, whatsapp=False)
    channel = TwilioWhatsAppChannel(emulated_settings(pair).twilio, WHATSAPP, NO_RETRY, client)
    result = await channel.send(SendRequest(phone=GB, code="123456", ttl=60))
    await pair.twilio.settle()
    status = await channel.status(result.ref)
    assert status.state is DeliveryState.FAILED and status.error_code == "63003"
    assert pair.twilio.whatsapp_inbox(GB) == []


def test_whatsapp_needs_a_template_and_a_sender(pair: EmulatorPair) -> None:
    """No content SID or no sender: ConfigError naming the variable."""
    twilio = emulated_settings(pair).twilio
    with pytest.raises(ConfigError, match="CONTENT_SID"):
        TwilioWhatsAppChannel(twilio, TwilioWhatsAppSettings(from_number="+1"), NO_RETRY, httpx.AsyncClient())
    with pytest.raises(ConfigError, match="FROM_NUMBER"):
        TwilioWhatsAppChannel(
            twilio, TwilioWhatsAppSettings(content_sid="HX1"), NO_RETRY, httpx.AsyncClient()
        )


async def test_a_call_reads_the_code_twice_in_the_users_language(
    pair: EmulatorPair, client: httpx.AsyncClient
) -> None:
    """calls.create with TwiML: the person hears every digit, twice, in French for fr-FR; then a price."""
    channel = TwilioVoiceChannel(emulated_settings(pair).twilio, VOICE, NO_RETRY, client)
    result = await channel.send(SendRequest(phone=FR, code="4071", ttl=60, locale="fr-FR"))
    assert result.state is DeliveryState.PENDING
    call = pair.twilio.calls.calls[result.ref]
    assert 'language="fr-FR"' in call.twiml and call.twiml.count("Votre code est: 4, 0, 7, 1.") == 2
    await pair.twilio.settle()
    await asyncio.sleep(0.05)
    assert pair.twilio.calls.heard(FR) == ["Votre code est: 4, 0, 7, 1. Votre code est: 4, 0, 7, 1."]
    status = await channel.status(result.ref)
    assert (
        status.state is DeliveryState.DELIVERED and status.cost == Decimal("0.01400") and status.cost_is_final
    )


@pytest.mark.parametrize(
    ("final", "state"), [("busy", DeliveryState.UNDELIVERED), ("failed", DeliveryState.FAILED)]
)
async def test_an_unanswered_call_is_not_delivered(
    pair: EmulatorPair, client: httpx.AsyncClient, final: str, state: DeliveryState
) -> None:
    """Busy / failed calls are final failures, free, and nobody heard the code."""
    pair.script.set(GB, voice_final=final)
    channel = TwilioVoiceChannel(emulated_settings(pair).twilio, VOICE, NO_RETRY, client)
    result = await channel.send(SendRequest(phone=GB, code="123456", ttl=60))
    for _ in range(100):
        status = await channel.status(result.ref)
        if status.state is not DeliveryState.PENDING:
            break
        await asyncio.sleep(0.01)
    assert status.state is state and status.cost == Decimal(0)
    assert pair.twilio.calls.heard(GB) == []


def test_say_language_picks_the_locale_or_its_language_or_the_default() -> None:
    """Exact locale, then the language's first spoken locale, then the default."""
    langs = VOICE.languages
    assert say_language("en-GB", langs, "en-US") == "en-GB"
    assert say_language("pt_br", langs, "en-US") == "pt-BR"
    assert say_language("fr", langs, "en-US") == "fr-FR"
    assert say_language("fr-BE", langs, "en-US") == "fr-FR"
    assert say_language("en", langs, "en-US") == "en-US"
    assert say_language("zh", langs, "en-US") == "zh-CN"
    assert say_language("xx-YY", langs, "en-US") == "en-US"
    assert say_language(None, langs, "de-DE") == "de-DE"


def test_twiml_reads_digit_by_digit() -> None:
    """Every digit is read on its own (commas), in the given language, the given number of times."""
    twiml = call_twiml("120", "de-DE", repeat=3, voice="Polly.Marlene")
    assert twiml.count("Ihr Code lautet: 1, 2, 0.") == 3
    assert 'voice="Polly.Marlene"' in twiml and 'language="de-DE"' in twiml
    assert call_twiml("9", "ja-JP", repeat=1).count(">9.</Say>") == 1


def test_call_statuses_and_callbacks() -> None:
    """Final call statuses map to delivered / undelivered / failed / revoked; callbacks parse."""
    assert map_call_status("completed") is DeliveryState.DELIVERED
    assert map_call_status("no-answer") is DeliveryState.UNDELIVERED
    assert map_call_status("canceled") is DeliveryState.REVOKED
    assert map_call_status("ringing") is DeliveryState.PENDING
    assert map_call_status("weird") is DeliveryState.UNKNOWN
    report = parse_call_callback({"CallSid": "CA1", "CallStatus": "busy"})
    assert report.ref == "CA1" and report.state is DeliveryState.UNDELIVERED


# --- as workflow steps ------------------------------------------------------------------------


@pytest.fixture
def make_router(pair: EmulatorPair, tmp_path: Path) -> Callable[..., Any]:
    def make(steps: list[dict[str, Any]], routes: dict[str, str]) -> OtpRouter:
        settings = emulated_settings(
            pair,
            store_url=f"sqlite:///{tmp_path / 'otp.db'}",
            code_secret="channels-secret",
            retry=NO_RETRY,
            routes=routes,
            twilio_whatsapp=WHATSAPP,
            twilio_voice=VOICE,
        )
        settings = settings.model_copy(
            update={"telegram": settings.telegram.model_copy(update={"enabled": False})}
        )
        policy = Policy.from_dict({"steps": steps}, routes=set(routes))
        return OtpRouter.from_settings(settings, policy=policy, metrics=Metrics(CollectorRegistry()))

    return make


async def _until(
    router: OtpRouter, vid: str, check: Callable[[VerificationState], bool]
) -> VerificationState:
    for _ in range(500):
        record = await router.store.get(vid)
        assert record is not None
        state = VerificationState.model_validate_json(record.data)
        if check(state):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"never reached: {state!r}")


ROUTES = {"whatsapp": "twilio_whatsapp", "sms": "twilio_sms", "voice": "twilio_voice"}


async def test_whatsapp_step_delivers_and_verifies(
    make_router: Callable[..., Any], pair: EmulatorPair
) -> None:
    """whatsapp → sms: a WhatsApp user gets the code in WhatsApp and no SMS is sent."""
    steps = [{"channel": "whatsapp", "deliver_within": 5}, {"channel": "sms", "deliver_within": 5}]
    async with make_router(steps, ROUTES) as router:
        v = await router.start(GB)
        assert v.channel == "whatsapp"
        code = await read_code(pair, GB, wait=5)
        assert code is not None and (await router.check(v.id, code)).valid
    assert pair.twilio.inbox(GB) == []


async def test_no_whatsapp_falls_back_as_undelivered(
    make_router: Callable[..., Any], pair: EmulatorPair
) -> None:
    """A number without WhatsApp: its failed message (63003) moves the verification on to SMS."""
    pair.script.set(GB, whatsapp=False)
    steps = [{"channel": "whatsapp", "deliver_within": 0.5}, {"channel": "sms", "deliver_within": 5}]
    async with make_router(steps, ROUTES) as router:
        v = await router.start(GB)
        state = await _until(router, v.id, lambda s: s.channel == "sms")
        assert [f.reason for f in state.fallbacks] == ["undelivered"]
        assert state.attempts[0].delivery is DeliveryState.FAILED
        code = await read_code(pair, GB, wait=5)
        assert code is not None and (await router.check(v.id, code)).valid


async def test_voice_step_after_sms_is_not_delivered(
    make_router: Callable[..., Any], pair: EmulatorPair
) -> None:
    """sms → voice: an undelivered SMS moves on to a call that reads the code in the caller's locale."""
    pair.script.set(FR, sms_final="undelivered", sms_delay=0.2)
    steps = [{"channel": "sms", "deliver_within": 0.5}, {"channel": "voice", "deliver_within": 5}]
    async with make_router(steps, ROUTES) as router:
        v = await router.start(FR, locale="fr-FR")
        state = await _until(router, v.id, lambda s: s.channel == "voice")
        assert state.locale == "fr-FR"
        code = await read_code(pair, FR, wait=5)
        assert code is not None and (await router.check(v.id, code)).valid
    assert "Votre code est" in pair.twilio.calls.heard(FR)[0]


async def test_call_callbacks_are_signed_and_read_by_the_twilio_receiver(
    pair: EmulatorPair, client: httpx.AsyncClient
) -> None:
    """The emulator's signed call callbacks verify like message ones and parse to delivery states."""
    from aiohttp import web

    from otp_router.providers.twilio_sms import parse_status_callback, verify_status_callback

    received: list[tuple[str, dict[str, str], str]] = []

    async def handle(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        received.append((str(request.url), form, request.headers.get("X-Twilio-Signature", "")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/webhooks/twilio", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        twilio = emulated_settings(pair).twilio
        channel = TwilioVoiceChannel(twilio, VOICE, NO_RETRY, client)
        url = channel.callback_url(base, "v_9")
        sent = await channel.send(SendRequest(phone=GB, code="123456", ttl=60, callback_url=url))
        for _ in range(200):
            if any(form.get("CallStatus") == "completed" for _, form, _ in received):
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    reports = []
    for got_url, form, signature in received:
        verify_status_callback(twilio.auth_token.get_secret_value(), got_url, form, signature)
        reports.append(parse_status_callback(form))
    assert [r.state for r in reports] == [DeliveryState.SENT, DeliveryState.DELIVERED]
    assert {r.ref for r in reports} == {sent.ref}
