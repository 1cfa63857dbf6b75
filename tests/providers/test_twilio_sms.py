"""The Twilio SMS channel over real loopback HTTP, against the emulator and small fake servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from otp_router.config import RetrySettings, TwilioSettings
from otp_router.emulators.script import Script
from otp_router.emulators.twilio import TwilioEmulator
from otp_router.errors import (
    ConfigError,
    InvalidRecipient,
    InvalidSignature,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderTimeout,
    ProviderUnavailable,
    WebhookError,
)
from otp_router.prices import SmsPrices
from otp_router.providers.base import Channel, ChannelName, DeliveryState, SendRequest, SupportsLookup
from otp_router.providers.twilio_sms import (
    HttpxTwilioClient,
    TwilioSmsChannel,
    map_twilio_status,
    parse_status_callback,
    verify_status_callback,
)

SID = "AC" + "c" * 32
TOKEN = "channel-test-token"
GB = "+447400123456"
US = "+12025550143"
SENDER = "+15005550006"

MakeChannel = Callable[..., TwilioSmsChannel]


@pytest.fixture
async def emulator() -> AsyncIterator[TwilioEmulator]:
    """A running Twilio emulator, 50 times faster than real time."""
    emulator = TwilioEmulator(SID, TOKEN, Script(time_scale=0.02), callback_backoff=0.0)
    await emulator.start("127.0.0.1", 0)
    yield emulator
    await emulator.stop()


@dataclass
class Retries:
    """Records the on_retry hook calls."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.calls.append((type(exc).__name__, attempt))


@pytest.fixture
def make_channel(http_client: httpx.AsyncClient, emulator: TwilioEmulator) -> MakeChannel:
    """Factory: a channel aimed at the emulator unless told otherwise; backoff off."""

    def make(**overrides: Any) -> TwilioSmsChannel:
        retry = overrides.pop("retry", RetrySettings(backoff=False, attempts=3, timeout=10))
        on_retry = overrides.pop("on_retry", None)
        values: dict[str, Any] = {
            "account_sid": SID,
            "auth_token": SecretStr(TOKEN),
            "from_number": SENDER,
            "base_url": emulator.url,
        }
        values.update(overrides)
        return TwilioSmsChannel(TwilioSettings(**values), retry, http_client, on_retry=on_retry)

    return make


def request(phone: str = GB, **kwargs: Any) -> SendRequest:
    """A send request for ``phone`` with code 123456."""
    kwargs.setdefault("ttl", 300)
    return SendRequest(phone=phone, code="123456", **kwargs)


def free_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ happy path


async def test_channel_satisfies_the_protocol(make_channel: MakeChannel) -> None:
    """The adapter is a Channel named sms/twilio."""
    channel = make_channel()
    assert isinstance(channel, Channel)
    assert (channel.name, channel.provider) == (ChannelName.SMS, "twilio")


async def test_send_creates_one_message_with_an_estimated_cost(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """send() returns the SID, PENDING and the price table's estimate, marked not final."""
    result = await make_channel().send(request())
    assert result.ref.startswith("SM")
    assert result.state is DeliveryState.PENDING
    assert result.cost == SmsPrices.load().sms("GB") == Decimal("0.0463")
    assert result.cost_is_final is False
    assert result.cost_is_estimate is True
    message = emulator.messages[result.ref]
    assert message.body == "Your login code is 123456"
    assert message.from_ == SENDER
    assert message.callback_url is None
    assert emulator.messages_to(GB) == [result.ref]


async def test_status_reports_final_price_and_state(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """After the final status, status() gives DELIVERED and abs(price) as a final cost."""
    channel = make_channel()
    sent = await channel.send(request(US))
    await emulator.settle()
    status = await channel.status(sent.ref)
    assert status.state is DeliveryState.DELIVERED
    assert status.cost == Decimal("0.00830")
    assert status.cost_is_final is True
    assert status.raw_status == "delivered"
    assert status.error_code is None


async def test_status_before_final_has_no_final_cost(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """While Twilio has not priced the message the cost is unknown and not final."""
    emulator.script.set(GB, sms_delay=1000.0)
    channel = make_channel()
    sent = await channel.send(request())
    status = await channel.status(sent.ref)
    assert status.state in (DeliveryState.PENDING, DeliveryState.SENT)
    assert (status.cost, status.cost_is_final) == (None, False)


async def test_undelivered_status_carries_the_error_code(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """An undelivered message maps to UNDELIVERED with Twilio's error code."""
    emulator.script.set(GB, sms_final="undelivered", sms_error_code=30007)
    channel = make_channel()
    sent = await channel.send(request())
    await emulator.settle()
    status = await channel.status(sent.ref)
    assert status.state is DeliveryState.UNDELIVERED
    assert status.error_code == "30007"
    assert status.cost_is_final is True


@pytest.mark.parametrize(("ttl", "accepted"), [(0, "1"), (300, "300"), (100_000, "36000")])
async def test_ttl_is_clamped_to_the_validity_period_range(
    make_channel: MakeChannel, emulator: TwilioEmulator, ttl: int, accepted: str
) -> None:
    """ValidityPeriod is the ttl clamped to 1..36000, so the create is never refused for it."""
    result = await make_channel().send(request(ttl=ttl))
    assert result.ref in emulator.messages
    assert emulator.log[-1].outcome == "queued"


async def test_messaging_service_is_used_when_configured(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """Without a From number the Messaging Service SID is sent, and Twilio starts it as accepted."""
    channel = make_channel(from_number=None, messaging_service_sid="MG" + "2" * 32)
    result = await channel.send(request())
    assert result.state is DeliveryState.PENDING
    assert emulator.messages[result.ref].service_sid == "MG" + "2" * 32
    # The status the create answered with (the message itself moves on to "sent" a moment later).
    assert emulator.log[-1].sid == result.ref and emulator.log[-1].outcome == "accepted"


async def test_base_url_override_survives_twilio_edge_in_environment(
    make_channel: MakeChannel, emulator: TwilioEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TWILIO_EDGE/TWILIO_REGION in os.environ do not rewrite the emulator's host."""
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    result = await make_channel().send(request())
    assert result.ref in emulator.messages


async def test_probe_revoke_report_do_no_io(make_channel: MakeChannel, emulator: TwilioEmulator) -> None:
    """probe() says reachable, revoke() says no, report_code() does nothing; none calls Twilio."""
    channel = make_channel()
    assert (await channel.probe(GB)).reachable is True
    assert await channel.revoke("SM" + "0" * 32) is False
    await channel.report_code("SM" + "0" * 32, "123456")
    await channel.aclose()
    assert emulator.log == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"account_sid": ""},
        {"auth_token": SecretStr("")},
        {"from_number": None, "messaging_service_sid": None},
    ],
)
def test_missing_configuration_is_a_config_error(
    make_channel: MakeChannel, overrides: dict[str, Any]
) -> None:
    """A channel without credentials or a sender refuses to be built."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_TWILIO__"):
        make_channel(**overrides)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("script", "error", "code"),
    [
        ({"sms_invalid": True}, InvalidRecipient, "21211"),
        ({"sms_error": 21614}, InvalidRecipient, "21614"),
        ({"sms_error": 21610}, InvalidRecipient, "21610"),
        ({"sms_error": 21612}, InvalidRecipient, "21612"),
        ({"sms_error": 21635}, InvalidRecipient, "21635"),
        ({"sms_error": 21408}, ProviderRejected, "21408"),
        ({"sms_error": 21606}, ProviderRejected, "21606"),
        ({"sms_error": 21608}, ProviderRejected, "21608"),
    ],
)
async def test_create_errors_map_to_our_tree(
    make_channel: MakeChannel,
    emulator: TwilioEmulator,
    script: dict[str, Any],
    error: type[Exception],
    code: str,
) -> None:
    """Recipient problems are InvalidRecipient, account problems ProviderRejected; never retried."""
    emulator.script.set(GB, **script)
    retries = Retries()
    with pytest.raises(error) as info:
        await make_channel(on_retry=retries).send(request())
    assert getattr(info.value, "code", None) == code
    assert GB not in str(info.value) and GB[1:] not in str(info.value)
    assert retries.calls == []
    assert len(emulator.log) == 1


async def test_bad_auth_token_is_rejected(make_channel: MakeChannel, emulator: TwilioEmulator) -> None:
    """A wrong auth token is ProviderRejected with code 20003, and nothing is sent."""
    with pytest.raises(ProviderRejected) as info:
        await make_channel(auth_token=SecretStr("wrong")).send(request())
    assert info.value.code == "20003"
    assert emulator.messages == {}


async def test_unknown_sid_status_is_rejected(make_channel: MakeChannel) -> None:
    """Fetching a SID Twilio does not know is a permanent 20404."""
    with pytest.raises(ProviderRejected) as info:
        await make_channel().status("SM" + "9" * 32)
    assert info.value.code == "20404"


async def test_429_is_retried_until_accepted(make_channel: MakeChannel, emulator: TwilioEmulator) -> None:
    """Twilio's 429/20429 was never processed, so the send is retried and then succeeds once."""
    emulator.script.set(GB, sms_429=2)
    retries = Retries()
    result = await make_channel(on_retry=retries).send(request())
    assert retries.calls == [("ProviderRateLimited", 1), ("ProviderRateLimited", 2)]
    assert [e.outcome for e in emulator.log] == ["http 429", "http 429", "queued"]
    assert emulator.messages_to(GB) == [result.ref]


async def test_429_retries_are_bounded(make_channel: MakeChannel, emulator: TwilioEmulator) -> None:
    """When every attempt is rate limited the last ProviderRateLimited is raised unchanged."""
    emulator.script.set(GB, sms_429=10)
    with pytest.raises(ProviderRateLimited) as info:
        await make_channel().send(request())
    assert info.value.code == "20429" and info.value.not_performed is True
    assert len(emulator.log) == 3


async def test_503_on_create_is_not_retried(make_channel: MakeChannel, emulator: TwilioEmulator) -> None:
    """A 5xx after the request was written may have sent the SMS: raised at once, never re-sent."""
    emulator.script.set(GB, sms_5xx=1)
    retries = Retries()
    with pytest.raises(ProviderUnavailable) as info:
        await make_channel(on_retry=retries).send(request())
    assert info.value.not_performed is False
    assert retries.calls == []
    assert [e.outcome for e in emulator.log] == ["http 503"]


async def test_connection_refused_on_create_is_retried(make_channel: MakeChannel) -> None:
    """Connection refused proves nothing was sent, so the send is retried up to the attempt limit."""
    retries = Retries()
    channel = make_channel(base_url=f"http://127.0.0.1:{free_port()}", on_retry=retries)
    with pytest.raises(ProviderUnavailable) as info:
        await channel.send(request())
    assert info.value.not_performed is True
    assert retries.calls == [("ProviderUnavailable", 1), ("ProviderUnavailable", 2)]


async def test_read_timeout_on_create_is_not_retried(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """A timeout after sending may have delivered the SMS: ProviderTimeout, not retried."""
    emulator.script.time_scale = 1.0
    emulator.script.set(GB, sms_latency=5.0)
    retries = Retries()
    with pytest.raises(ProviderTimeout) as info:
        await make_channel(timeout=0.2, on_retry=retries).send(request())
    assert info.value.not_performed is False
    assert retries.calls == []


# ------------------------------------------------------------- a fake server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeTwilio:
    """A loopback server answering with scripted raw responses, in order."""

    responses: list[web.Response] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str], str]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
async def fake_twilio(serve_loopback: Callable[[web.Application], Awaitable[str]]) -> FakeTwilio:
    """A started FakeTwilio; each request pops the next scripted response."""
    fake = FakeTwilio()

    async def handle(req: web.Request) -> web.StreamResponse:
        form = {key: str(value) for key, value in (await req.post()).items()}
        fake.requests.append((req.method, req.path, form, req.headers.get("Authorization", "")))
        return fake.responses.pop(0)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    fake.url = await serve_loopback(app)
    return fake


def message_json(status: str = "queued", price: str | None = None) -> web.Response:
    """A minimal Message resource."""
    body = {"sid": "SM" + "1" * 32, "status": status, "price": price, "price_unit": "USD", "error_code": None}
    return web.json_response(body, status=201 if status == "queued" else 200)


@pytest.mark.parametrize(
    "response",
    [
        web.Response(status=201, text="<html>gateway</html>"),
        web.Response(status=201, text="[1, 2]", content_type="application/json"),
        web.Response(status=201, text="null", content_type="application/json"),
        web.Response(status=201, text='{"status": "queued"}', content_type="application/json"),
        web.Response(status=201, text="[" * 100_000 + "]" * 100_000, content_type="application/json"),
    ],
    ids=["html", "list", "null", "no-sid", "recursion"],
)
async def test_garbage_create_body_is_a_response_error(
    make_channel: MakeChannel, fake_twilio: FakeTwilio, response: web.Response
) -> None:
    """A 2xx body that is not a Message resource is ProviderResponseError, and the send is not repeated."""
    fake_twilio.responses.append(response)
    with pytest.raises(ProviderResponseError) as info:
        await make_channel(base_url=fake_twilio.url).send(request())
    assert info.value.not_performed is False
    assert len(fake_twilio.requests) == 1


async def test_sdk_sends_form_fields_and_basic_auth(
    make_channel: MakeChannel, fake_twilio: FakeTwilio
) -> None:
    """The adapter carries the SDK's form body, Basic auth and path unchanged."""
    fake_twilio.responses.append(message_json())
    channel = make_channel(base_url=fake_twilio.url, message_template="Code: {code}. Do not share.")
    await channel.send(request(callback_url="https://example.com/hooks/twilio", attempt=2))
    method, path, form, auth = fake_twilio.requests[0]
    assert (method, path) == ("POST", f"/2010-04-01/Accounts/{SID}/Messages.json")
    assert form == {
        "To": GB,
        "From": SENDER,
        "Body": "Code: 123456. Do not share.",
        "ValidityPeriod": "300",
        "StatusCallback": "https://example.com/hooks/twilio",
        "Attempt": "2",
    }
    assert auth == httpx.BasicAuth(SID, TOKEN)._auth_header


async def test_retry_after_header_is_honoured(make_channel: MakeChannel, fake_twilio: FakeTwilio) -> None:
    """A Retry-After on a 429 becomes retry_after; beyond max_retry_after the error is raised at once."""
    body = {"code": 20429, "message": "Too Many Requests", "more_info": "", "status": 429}
    fake_twilio.responses.append(web.json_response(body, status=429, headers={"Retry-After": "30"}))
    retry = RetrySettings(backoff=False, attempts=3, max_retry_after=5)
    with pytest.raises(ProviderRateLimited) as info:
        await make_channel(base_url=fake_twilio.url, retry=retry).send(request())
    assert info.value.retry_after == 30.0
    assert len(fake_twilio.requests) == 1


async def test_status_read_is_retried_after_a_5xx(make_channel: MakeChannel, fake_twilio: FakeTwilio) -> None:
    """A read is always safe to repeat: a 503 then a 200 gives the status."""
    fake_twilio.responses.append(web.Response(status=503, text="busy"))
    fake_twilio.responses.append(message_json("delivered", "-0.07000"))
    retries = Retries()
    status = await make_channel(base_url=fake_twilio.url, on_retry=retries).status("SM" + "1" * 32)
    assert status.state is DeliveryState.DELIVERED
    assert status.cost == Decimal("0.07000")
    assert retries.calls == [("ProviderUnavailable", 1)]


async def test_unparseable_price_is_a_response_error(
    make_channel: MakeChannel, fake_twilio: FakeTwilio
) -> None:
    """A price that is not a number is not silently recorded as a cost."""
    fake_twilio.responses.extend(message_json("delivered", "lots") for _ in range(3))
    with pytest.raises(ProviderResponseError):
        await make_channel(base_url=fake_twilio.url).status("SM" + "1" * 32)


async def test_rfc9457_errors_are_mapped_too(make_channel: MakeChannel, fake_twilio: FakeTwilio) -> None:
    """The SDK's TwilioServiceException (problem+json) is mapped by code like the legacy body."""
    body = {
        "type": "https://www.twilio.com/docs/errors/21211",
        "title": "Invalid",
        "status": 400,
        "code": 21211,
    }
    fake_twilio.responses.append(web.json_response(body, status=400))
    with pytest.raises(InvalidRecipient):
        await make_channel(base_url=fake_twilio.url).send(request())


async def test_adapter_never_closes_the_shared_client(http_client: httpx.AsyncClient) -> None:
    """The adapter is async and leaves the shared client open."""
    adapter = HttpxTwilioClient(http_client, timeout=1.0)
    assert adapter.is_async is True
    del adapter
    assert not http_client.is_closed


# ------------------------------------------------------------------ callbacks


@dataclass
class Receiver:
    """A status-callback endpoint that validates with our verify_status_callback."""

    url: str = ""
    received: list[tuple[dict[str, str], str]] = field(default_factory=list)


@pytest.fixture
async def receiver(serve_loopback: Callable[[web.Application], Awaitable[str]]) -> Receiver:
    """A started callback receiver."""
    state = Receiver()

    async def handle(req: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await req.post()).items()}
        state.received.append((form, req.headers.get("X-Twilio-Signature", "")))
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/hooks/twilio", handle)
    state.url = f"{await serve_loopback(app)}/hooks/twilio?verification=v1"
    return state


async def test_status_callbacks_validate_and_parse(
    make_channel: MakeChannel, emulator: TwilioEmulator, receiver: Receiver
) -> None:
    """The emulator's callbacks pass verify_status_callback and parse to SENT then DELIVERED."""
    sent = await make_channel().send(request(callback_url=receiver.url))
    await emulator.settle()
    states = []
    for params, signature in receiver.received:
        verify_status_callback(TOKEN, receiver.url, params, signature)
        result = parse_status_callback(params)
        assert result.ref == sent.ref
        states.append(result.state)
    assert states == [DeliveryState.SENT, DeliveryState.DELIVERED]


async def test_status_callback_with_wrong_token_or_tampering_is_refused(
    make_channel: MakeChannel, emulator: TwilioEmulator, receiver: Receiver
) -> None:
    """A signature checked with another token, a changed field, another URL or none at all is refused."""
    await make_channel().send(request(callback_url=receiver.url))
    await emulator.settle()
    params, signature = receiver.received[-1]
    with pytest.raises(InvalidSignature):
        verify_status_callback("another-token", receiver.url, params, signature)
    with pytest.raises(InvalidSignature):
        verify_status_callback(TOKEN, receiver.url, {**params, "MessageStatus": "failed"}, signature)
    with pytest.raises(InvalidSignature):
        verify_status_callback(TOKEN, receiver.url.replace("v1", "v2"), params, signature)
    with pytest.raises(InvalidSignature):
        verify_status_callback(TOKEN, receiver.url, params, "")


def test_official_signature_vector() -> None:
    """Twilio's published test vector validates, and fails with one digit changed."""
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
        "Caller": "+14158675309",
    }
    verify_status_callback("12345", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    with pytest.raises(InvalidSignature):
        verify_status_callback("12345", url, {**params, "Digits": "1235"}, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_parse_undelivered_callback() -> None:
    """An undelivered callback maps to UNDELIVERED with its ErrorCode; the legacy Sms* names work."""
    result = parse_status_callback({"SmsSid": "SM1", "SmsStatus": "undelivered", "ErrorCode": "30003"})
    assert (result.ref, result.state, result.error_code) == ("SM1", DeliveryState.UNDELIVERED, "30003")
    assert result.cost is None


@pytest.mark.parametrize("form", [{}, {"MessageSid": "SM1"}, {"MessageStatus": "sent"}])
def test_parse_callback_without_sid_or_status_is_refused(form: dict[str, str]) -> None:
    """A callback without a SID or a status is a WebhookError."""
    with pytest.raises(WebhookError):
        parse_status_callback(form)


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("queued", DeliveryState.PENDING),
        ("accepted", DeliveryState.PENDING),
        ("scheduled", DeliveryState.PENDING),
        ("sending", DeliveryState.PENDING),
        ("sent", DeliveryState.SENT),
        ("delivered", DeliveryState.DELIVERED),
        ("read", DeliveryState.READ),
        ("undelivered", DeliveryState.UNDELIVERED),
        ("failed", DeliveryState.FAILED),
        ("canceled", DeliveryState.REVOKED),
        ("partially_delivered", DeliveryState.UNKNOWN),
        ("something-new", DeliveryState.UNKNOWN),
        (None, DeliveryState.UNKNOWN),
    ],
)
def test_status_mapping(raw: str | None, state: DeliveryState) -> None:
    """Every Twilio status maps to one DeliveryState; unknown ones to UNKNOWN."""
    assert map_twilio_status(raw) is state


# ------------------------------------------------------- transport error table


def _raising(exc: Exception) -> httpx.MockTransport:
    def handler(_request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


def _chained(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "error", "not_performed"),
    [
        (httpx.ConnectError("refused"), ProviderUnavailable, True),
        (httpx.ConnectTimeout("slow connect"), ProviderTimeout, True),
        (httpx.PoolTimeout("pool"), ProviderTimeout, True),
        (httpx.ReadTimeout("slow read"), ProviderTimeout, False),
        (httpx.WriteTimeout("slow write"), ProviderTimeout, False),
        (httpx.ReadError("reset"), ProviderUnavailable, False),
        (httpx.RemoteProtocolError("bad http"), ProviderUnavailable, False),
        # httpx-aiohttp reports these aiohttp errors as ConnectTimeout; the cause decides.
        (_chained(httpx.ConnectTimeout("x"), aiohttp.ServerDisconnectedError()), ProviderUnavailable, False),
        (_chained(httpx.ConnectTimeout("x"), aiohttp.ConnectionTimeoutError()), ProviderTimeout, True),
        (_chained(httpx.ReadTimeout("x"), aiohttp.SocketTimeoutError()), ProviderTimeout, False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
async def test_transport_errors_map_to_our_tree(
    exc: Exception, error: type[Exception], not_performed: bool
) -> None:
    """Each httpx transport failure becomes our class, chained, with an honest not_performed."""
    async with httpx.AsyncClient(transport=_raising(exc)) as client:
        adapter = HttpxTwilioClient(client)
        with pytest.raises(error) as info:
            await adapter.request("POST", "http://twilio.invalid/x", data={"To": GB})
    assert info.value.not_performed is not_performed  # type: ignore[attr-defined]
    assert info.value.__cause__ is exc


async def test_connection_closed_after_request_is_not_retried(
    make_channel: MakeChannel,
) -> None:
    """A server that reads the create and hangs up may have sent it: one attempt, not_performed False."""
    connections = 0

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await make_channel(base_url=f"http://127.0.0.1:{port}").send(request())
    finally:
        server.close()
        await server.wait_closed()
    assert info.value.not_performed is False
    assert connections == 1


# ------------------------------------------------------------ message lookup

OTHER_SENDER = "+15005550009"
SERVICE = "MG" + "d" * 32


async def test_lookup_finds_a_message_whose_answer_was_lost(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """Created then 503: find_sent returns that message's SID and state, from Twilio's list."""
    emulator.script.set(GB, sms_5xx_after_create=1)
    channel = make_channel()
    since = time.time()
    with pytest.raises(ProviderUnavailable):
        await channel.send(request())
    found = await channel.find_sent(GB, since)
    assert found is not None and [found.ref] == emulator.messages_to(GB)
    assert found.state in (DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.DELIVERED)
    assert emulator.list_requests == 1
    assert isinstance(channel, SupportsLookup)


async def test_lookup_answers_none_when_nothing_was_created(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """A 503 that created nothing, or only older messages to the number: the complete answer is None."""
    emulator.script.set(GB, sms_5xx=1)
    channel = make_channel()
    since = time.time()
    with pytest.raises(ProviderUnavailable):
        await channel.send(request())
    assert await channel.find_sent(GB, since) is None
    await channel.send(request())
    assert await channel.find_sent(GB, time.time() + 10) is None, "older than the send: not ours"


async def test_lookup_picks_the_earliest_match_and_ignores_other_senders(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """Several matches: the earliest created after the send began; other senders' messages never match."""
    service_channel = make_channel(from_number=None, messaging_service_sid=SERVICE)
    other = make_channel(from_number=OTHER_SENDER)
    since = time.time()
    await other.send(request())
    assert await service_channel.find_sent(GB, since) is None
    first = await service_channel.send(request())
    await service_channel.send(request())
    found = await service_channel.find_sent(GB, since)
    assert found is not None and found.ref == first.ref


async def test_lookup_5xx_is_retried_then_unknown(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """A list 503 is retried as a read; when every try fails the error says the answer is unknown."""
    channel = make_channel()
    since = time.time()
    await channel.send(request())
    emulator.script.set(GB, sms_list_5xx=1)
    assert await channel.find_sent(GB, since) is not None
    assert emulator.list_requests == 2
    emulator.reset()
    emulator.script.set(GB, sms_list_5xx=10)
    with pytest.raises(ProviderUnavailable):
        await channel.find_sent(GB, since)
    assert emulator.list_requests == 3


async def test_lookup_with_bad_credentials_is_rejected(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """A 401 on the list is a permanent error of our tree, not retried."""
    with pytest.raises(ProviderRejected) as info:
        await make_channel(auth_token=SecretStr("wrong")).find_sent(GB, time.time())
    assert info.value.code == "401" and emulator.list_requests == 1


async def test_lookup_reads_a_bounded_number_of_pages(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """A list longer than lookup_max_pages pages leaves the answer unknown instead of claiming absence."""
    other = make_channel(from_number=OTHER_SENDER)
    since = time.time()
    for _ in range(3):
        await other.send(request())
    channel = make_channel(
        from_number=None, messaging_service_sid=SERVICE, lookup_page_size=1, lookup_max_pages=2
    )
    with pytest.raises(ProviderResponseError):
        await channel.find_sent(GB, since)
    assert emulator.list_requests == 2
    wider = make_channel(
        from_number=None, messaging_service_sid=SERVICE, lookup_page_size=1, lookup_max_pages=4
    )
    assert await wider.find_sent(GB, since) is None


async def test_lookup_date_filter_misses_unsent_messages(
    make_channel: MakeChannel, emulator: TwilioEmulator
) -> None:
    """With lookup_date_filter a message not yet sent is invisible (why the filter is off by default)."""
    emulator.script.set(GB, sms_delay=25.0)
    channel = make_channel(lookup_date_filter=True)
    since = time.time()
    sent = await channel.send(request())
    assert await channel.find_sent(GB, since) is None
    await emulator.settle()
    found = await channel.find_sent(GB, since)
    assert found is not None and found.ref == sent.ref
    assert await make_channel().find_sent(GB, since) is not None
