"""TelegramChannel and TelegramGatewayClient over real loopback HTTP against the emulator."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from otp_router.config import RetrySettings, TelegramSettings
from otp_router.emulators.script import Script
from otp_router.emulators.telegram import TelegramEmulator
from otp_router.errors import (
    InputError,
    InvalidCode,
    InvalidRecipient,
    InvalidSignature,
    MessageAlreadySent,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderTimeout,
    ProviderUnavailable,
    StaleWebhook,
    WebhookError,
)
from otp_router.providers.base import Channel, DeliveryState, SendRequest
from otp_router.providers.telegram import (
    RequestStatus,
    TelegramChannel,
    error_from_string,
    map_transport_error,
    parse_report,
    sign_report,
    verify_report_signature,
)

TOKEN = "test-gateway-token"
PHONE = "+14155550101"


@dataclass
class Retries:
    """Collects on_retry hook calls."""

    calls: list[tuple[BaseException, int, float]] = field(default_factory=list)

    def __call__(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.calls.append((exc, attempt, delay))


@dataclass
class Gateway:
    emulator: TelegramEmulator
    url: str


@pytest.fixture
def script() -> Script:
    # 1 s default delivery becomes 10 ms; a 30 s ttl expires after 0.3 s.
    return Script(time_scale=0.01)


@pytest.fixture
async def gateway(script: Script) -> AsyncIterator[Gateway]:
    emulator = TelegramEmulator(TOKEN, script)
    port = await emulator.start("127.0.0.1", 0)
    yield Gateway(emulator, f"http://127.0.0.1:{port}")
    await emulator.stop()


@pytest.fixture
def make_channel(http_client: httpx.AsyncClient, gateway: Gateway) -> Callable[..., TelegramChannel]:
    def make(
        *,
        token: str = TOKEN,
        base_url: str | None = None,
        retry: RetrySettings | None = None,
        on_retry: Retries | None = None,
        timeout: float = 5.0,
    ) -> TelegramChannel:
        settings = TelegramSettings(token=SecretStr(token), base_url=base_url or gateway.url, timeout=timeout)
        retry = retry or RetrySettings(backoff=False, attempts=3, timeout=10)
        return TelegramChannel(settings, retry, http_client, on_retry=on_retry)

    return make


@pytest.fixture
def stub(
    serve_loopback: Callable[[web.Application], Awaitable[str]],
) -> Callable[[web.Response], Awaitable[str]]:
    """Factory: a loopback server answering every request with one canned response."""

    async def serve(response: web.Response) -> str:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                status=response.status, body=response.body, content_type=response.content_type
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        return await serve_loopback(app)

    return serve


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[Any]], limit: float = 5.0) -> Any:
    """Poll ``check`` until it returns something truthy (bounded, never asserted as a duration)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def sends(emulator: TelegramEmulator, phone: str) -> list[str]:
    return [
        e.outcome for e in emulator.log if e.method == "sendVerificationMessage" and e.phone_number == phone
    ]


# --------------------------------------------------------------------------- happy paths


def test_channel_satisfies_protocol(make_channel: Callable[..., TelegramChannel]) -> None:
    """TelegramChannel is a Channel with the telegram name and provider."""
    channel = make_channel()
    assert isinstance(channel, Channel)
    assert (channel.name, channel.provider) == ("telegram", "telegram")


async def test_probe_then_send_is_charged_once(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway
) -> None:
    """A reachable probe charges 0.01 in advance and the send with its request_id is free."""
    channel = make_channel()
    probe = await channel.probe(PHONE)
    assert probe.reachable and probe.ref
    assert probe.cost == Decimal("0.01")
    assert probe.remaining_balance == Decimal("99.99")

    sent = await channel.send(SendRequest(phone=PHONE, code="123456", ttl=60, probe_ref=probe.ref))
    assert sent.ref == probe.ref
    assert sent.state is DeliveryState.SENT
    assert sent.cost == Decimal("0.01") and not sent.cost_is_final
    assert sent.remaining_balance is None  # free call: no balance reported
    assert gateway.emulator.balance == Decimal("99.99")
    assert gateway.emulator.code_for(probe.ref) == "123456"


async def test_send_without_probe_charges(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway
) -> None:
    """A send with no request_id starts a new, charged request."""
    sent = await make_channel().send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert sent.remaining_balance == Decimal("99.99")
    assert gateway.emulator.balance == Decimal("99.99")


async def test_status_reaches_delivered_with_final_cost(make_channel: Callable[..., TelegramChannel]) -> None:
    """Polling after delivery gives DELIVERED, not refunded, cost final."""
    channel = make_channel()
    sent = await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60))

    async def delivered() -> Any:
        status = await channel.status(sent.ref)
        return status if status.state is DeliveryState.DELIVERED else None

    status = await eventually(delivered)
    assert status.cost == Decimal("0.01")
    assert status.cost_is_final and not status.refunded
    assert status.raw_status == "delivered"


async def test_expired_message_is_refunded(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """A message never delivered within ttl expires, is refunded and the balance is restored."""
    script.set(PHONE, telegram_never=True)
    channel = make_channel()
    probe = await channel.probe(PHONE)
    sent = await channel.send(SendRequest(phone=PHONE, code="1234", ttl=30, probe_ref=probe.ref))

    async def expired() -> Any:
        status = await channel.status(sent.ref)
        return status if status.state is DeliveryState.EXPIRED else None

    status = await eventually(expired)
    assert status.refunded and status.cost_is_final
    assert gateway.emulator.balance == Decimal("100")


async def test_revoke_is_not_refunded(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """Revoking an undelivered message makes it REVOKED with the fee kept."""
    script.set(PHONE, telegram_never=True)
    channel = make_channel()
    sent = await channel.send(SendRequest(phone=PHONE, code="1234", ttl=3600))
    assert await channel.revoke(sent.ref) is True
    status = await channel.status(sent.ref)
    assert status.state is DeliveryState.REVOKED
    assert not status.refunded and status.cost_is_final
    assert gateway.emulator.balance == Decimal("99.99")


async def test_send_clamps_ttl(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, http_client: httpx.AsyncClient
) -> None:
    """A ttl below Telegram's range is raised to 30 s rather than refused."""
    sent = await make_channel().send(SendRequest(phone=PHONE, code="1234", ttl=5))
    state = (await http_client.get(f"{gateway.url}/_emulator/state")).json()
    assert [r["ttl"] for r in state["requests"] if r["request_id"] == sent.ref] == [30]


async def test_report_code_reaches_gateway(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway
) -> None:
    """report_code passes the entered code to checkVerificationStatus."""
    channel = make_channel()
    sent = await channel.send(SendRequest(phone=PHONE, code="4321", ttl=60))
    await channel.report_code(sent.ref, "4321")
    status = gateway.emulator.request_status(sent.ref)
    assert status is not None
    assert status["verification_status"]["status"] == "code_valid"


async def test_report_code_swallows_provider_errors(make_channel: Callable[..., TelegramChannel]) -> None:
    """report_code is best effort: an unknown request id does not raise."""
    await make_channel().report_code("no-such-request", "1234")


# --------------------------------------------------------------------------- recipient errors


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("absent", "PHONE_NUMBER_NOT_FOUND"),
        ("unavailable", "PHONE_NUMBER_NOT_AVAILABLE"),
        ("invalid", "PHONE_NUMBER_INVALID"),
    ],
)
async def test_probe_unreachable_is_a_result_not_an_error(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script, mode: Any, error: str
) -> None:
    """A number that cannot receive gives reachable=False with the Gateway's reason, free of charge."""
    script.set(PHONE, telegram=mode)
    probe = await make_channel().probe(PHONE)
    assert not probe.reachable
    assert probe.reason == error
    assert gateway.emulator.balance == Decimal("100")


async def test_send_to_absent_number_raises_invalid_recipient(
    make_channel: Callable[..., TelegramChannel], script: Script
) -> None:
    """A send (unlike a probe) to a number not on Telegram raises InvalidRecipient with the code."""
    script.set(PHONE, telegram="absent")
    with pytest.raises(InvalidRecipient) as info:
        await make_channel().send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert info.value.code == "PHONE_NUMBER_NOT_FOUND"
    assert PHONE not in str(info.value)


async def test_malformed_number_is_invalid_recipient(make_channel: Callable[..., TelegramChannel]) -> None:
    """A number that is not E.164 is refused by the Gateway as PHONE_NUMBER_INVALID."""
    with pytest.raises(InvalidRecipient) as info:
        await make_channel().client.check_send_ability("12345")
    assert info.value.code == "PHONE_NUMBER_INVALID"


# --------------------------------------------------------------------------- account errors


async def test_bad_token_is_rejected_without_retry(make_channel: Callable[..., TelegramChannel]) -> None:
    """A wrong token raises ProviderRejected(ACCESS_TOKEN_INVALID) and is not retried."""
    retries = Retries()
    with pytest.raises(ProviderRejected) as info:
        await make_channel(token="wrong", on_retry=retries).status("anything")
    assert info.value.code == "ACCESS_TOKEN_INVALID"
    assert retries.calls == []


async def test_missing_token_is_rejected(make_channel: Callable[..., TelegramChannel]) -> None:
    """An empty token sends no Authorization header and gets ACCESS_TOKEN_REQUIRED."""
    with pytest.raises(ProviderRejected) as info:
        await make_channel(token="").probe(PHONE)
    assert info.value.code == "ACCESS_TOKEN_REQUIRED"


async def test_balance_not_enough(make_channel: Callable[..., TelegramChannel], gateway: Gateway) -> None:
    """An empty account refuses a reachable probe with BALANCE_NOT_ENOUGH."""
    await gateway.emulator.reset(balance=Decimal("0"))
    with pytest.raises(ProviderRejected) as info:
        await make_channel().probe(PHONE)
    assert info.value.code == "BALANCE_NOT_ENOUGH"


async def test_second_send_with_same_request_id_is_rejected(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway
) -> None:
    """Reusing a probe's request_id for a second send raises MESSAGE_ALREADY_SENT."""
    channel = make_channel()
    probe = await channel.probe(PHONE)
    await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60, probe_ref=probe.ref))
    with pytest.raises(MessageAlreadySent) as info:
        await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60, probe_ref=probe.ref))
    assert info.value.code == "MESSAGE_ALREADY_SENT"
    assert isinstance(info.value, ProviderRejected)
    assert sends(gateway.emulator, PHONE) == ["ok", "MESSAGE_ALREADY_SENT"]


# --------------------------------------------------------------------------- local validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"code": "12a4"}, InvalidCode),
        ({"code": "123"}, InvalidCode),
        ({"code": "123456789"}, InvalidCode),
        ({"code_length": 9}, InputError),
        ({"ttl": 29}, InputError),
        ({"ttl": 3601}, InputError),
        ({"code": "1234", "payload": "x" * 129}, InputError),
        ({"code": "1234", "callback_url": "https://e.test/" + "x" * 242}, InputError),
    ],
)
async def test_bad_send_parameters_fail_before_any_request(
    make_channel: Callable[..., TelegramChannel],
    gateway: Gateway,
    kwargs: dict[str, Any],
    error: type[Exception],
) -> None:
    """Out-of-range parameters raise an InputError and nothing reaches the Gateway."""
    with pytest.raises(error):
        await make_channel().client.send_verification_message(PHONE, **kwargs)
    assert gateway.emulator.log == []


# --------------------------------------------------------------------------- retries


async def test_flood_wait_is_honoured_then_succeeds(
    make_channel: Callable[..., TelegramChannel], script: Script
) -> None:
    """FLOOD_WAIT_1 is waited out (the hook sees a 1 s delay) and the retried probe succeeds."""
    script.set(PHONE, telegram_flood_wait=1, telegram_flood_count=1)
    retries = Retries()
    probe = await make_channel(on_retry=retries).probe(PHONE)
    assert probe.reachable
    [(exc, attempt, delay)] = retries.calls
    assert isinstance(exc, ProviderRateLimited) and exc.code == "FLOOD_WAIT_1"
    assert (attempt, delay) == (1, 1.0)


async def test_flood_wait_above_limit_is_not_retried(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """A flood wait longer than max_retry_after is raised at once so the router can fall back."""
    script.set(PHONE, telegram_flood_wait=60, telegram_flood_count=5)
    retries = Retries()
    retry = RetrySettings(backoff=False, attempts=3, max_retry_after=10)
    with pytest.raises(ProviderRateLimited) as info:
        await make_channel(retry=retry, on_retry=retries).send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert info.value.retry_after == 60.0
    assert info.value.not_performed
    assert retries.calls == []
    assert sends(gateway.emulator, PHONE) == ["FLOOD_WAIT_60"]


async def test_5xx_on_read_is_retried(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """An HTTP 502 with an HTML body on checkVerificationStatus is retried and then succeeds."""
    retries = Retries()
    channel = make_channel(on_retry=retries)
    sent = await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60))
    script.set(PHONE, telegram_5xx=1)
    status = await channel.status(sent.ref)
    assert status.ref == sent.ref
    [(exc, _, _)] = retries.calls
    assert isinstance(exc, ProviderUnavailable) and exc.code == "HTTP_502"
    outcomes = [e.outcome for e in gateway.emulator.log if e.method == "checkVerificationStatus"]
    assert outcomes == ["HTTP_502", "ok"]


async def test_5xx_on_send_is_not_retried(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """A 502 on a send may have sent the message, so it is raised without a second send."""
    script.set(PHONE, telegram_5xx=1)
    retries = Retries()
    with pytest.raises(ProviderUnavailable) as info:
        await make_channel(on_retry=retries).send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert not info.value.not_performed
    assert retries.calls == []
    assert sends(gateway.emulator, PHONE) == ["HTTP_502"]


async def test_connection_refused_on_send_is_retried(make_channel: Callable[..., TelegramChannel]) -> None:
    """Connection refused proves nothing was sent, so a send is retried up to the attempt limit."""
    retries = Retries()
    channel = make_channel(base_url=f"http://127.0.0.1:{closed_port()}", on_retry=retries)
    with pytest.raises(ProviderUnavailable) as info:
        await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert info.value.not_performed
    assert [attempt for _, attempt, _ in retries.calls] == [1, 2]
    assert isinstance(info.value.__cause__, httpx.TransportError)


async def test_read_timeout_on_send_is_not_retried(
    make_channel: Callable[..., TelegramChannel], gateway: Gateway, script: Script
) -> None:
    """A send whose answer is late raises ProviderTimeout, not retried: the Gateway did act on it."""
    script.set(PHONE, telegram_latency=100)  # 1 s after time_scale, the client waits 0.2 s
    retries = Retries()
    with pytest.raises(ProviderTimeout) as info:
        await make_channel(timeout=0.2, on_retry=retries).send(SendRequest(phone=PHONE, code="1234", ttl=60))
    assert not info.value.not_performed
    assert retries.calls == []
    assert sends(gateway.emulator, PHONE) == ["ok"]


# --------------------------------------------------------------------------- malformed answers


async def test_garbage_body_is_a_response_error(
    make_channel: Callable[..., TelegramChannel], stub: Callable[[web.Response], Awaitable[str]]
) -> None:
    """A 200 with a non-JSON body raises ProviderResponseError (never KeyError or JSONDecodeError)."""
    url = await stub(web.Response(text="<html>hello</html>", content_type="text/html"))
    with pytest.raises(ProviderResponseError):
        await make_channel(base_url=url, retry=RetrySettings(backoff=False, attempts=1)).status("r1")


@pytest.mark.parametrize(
    "body",
    [
        {"ok": True, "result": {"request_id": "r1", "phone_number": PHONE}},
        {"ok": True, "result": {"request_id": "r1", "phone_number": PHONE, "request_cost": "lots"}},
        {"ok": True, "result": [1, 2]},
        {"ok": True},
        {"ok": False},
        {"result": {}},
    ],
)
async def test_malformed_envelope_is_a_response_error(
    make_channel: Callable[..., TelegramChannel],
    stub: Callable[[web.Response], Awaitable[str]],
    body: dict[str, Any],
) -> None:
    """An envelope or result that fails validation raises ProviderResponseError without the phone number."""
    url = await stub(web.json_response(body))
    with pytest.raises(ProviderResponseError) as info:
        await make_channel(base_url=url, retry=RetrySettings(backoff=False, attempts=1)).status("r1")
    assert PHONE not in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"[" * 100_000 + b"]" * 100_000, ProviderResponseError),
        (
            200,
            b'{"ok": true, "result": {"request_id": "r\xff", "request_cost": 0.01}}',
            ProviderResponseError,
        ),
        (200, b'{"ok": true, "result": {"request_id": "r1", "request_cost": 1e999}}', ProviderResponseError),
        (500, b'{"ok": false, "error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ProviderUnavailable),
    ],
    ids=["recursion", "invalid-utf8", "cost-1e999", "5xx-recursion"],
)
async def test_hostile_response_bytes_are_provider_errors(
    make_channel: Callable[..., TelegramChannel],
    stub: Callable[[web.Response], Awaitable[str]],
    status: int,
    body: bytes,
    expected: type[Exception],
) -> None:
    """Nesting that would exhaust the recursion limit, bytes that are not UTF-8 and out-of-range
    numbers in a Gateway answer are errors of our tree (never a RecursionError reaching the caller)."""
    url = await stub(web.Response(status=status, body=body, content_type="application/json"))
    with pytest.raises(expected):
        await make_channel(base_url=url, retry=RetrySettings(backoff=False, attempts=1)).status("r1")


async def test_non_http_answer_is_a_response_error(make_channel: Callable[..., TelegramChannel]) -> None:
    """A server that answers with bytes that are not HTTP gives an otp-router error, not an aiohttp one."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        channel = make_channel(
            base_url=f"http://127.0.0.1:{port}", retry=RetrySettings(backoff=False, attempts=1)
        )
        with pytest.raises(ProviderResponseError) as info:
            await channel.send(SendRequest(phone=PHONE, code="1234", ttl=60))
        assert not info.value.not_performed
        # aiohttp's error repr holds the request headers (the token): the chain is dropped.
        assert info.value.__cause__ is None
    finally:
        server.close()
        await server.wait_closed()


async def test_json_error_on_5xx_keeps_the_error_string(
    make_channel: Callable[..., TelegramChannel], stub: Callable[[web.Response], Awaitable[str]]
) -> None:
    """A JSON ok:false body is mapped by its error string whatever the HTTP status."""
    url = await stub(web.json_response({"ok": False, "error": "FLOOD_WAIT_99"}, status=503))
    with pytest.raises(ProviderRateLimited) as info:
        await make_channel(base_url=url).probe(PHONE)
    assert info.value.retry_after == 99.0


async def test_unknown_fields_and_status_values_are_tolerated(
    make_channel: Callable[..., TelegramChannel], stub: Callable[[web.Response], Awaitable[str]]
) -> None:
    """New fields and an unknown delivery status parse, mapping to UNKNOWN with the raw value kept."""
    result = {
        "request_id": "r1",
        "phone_number": PHONE,
        "request_cost": 0.01,
        "is_refunded": False,
        "brand_new_field": {"nested": True},
        "delivery_status": {"status": "teleported", "updated_at": 1700000000, "extra": 1},
        "verification_status": {"status": "code_quantum", "updated_at": 1700000000},
    }
    url = await stub(web.json_response({"ok": True, "result": result, "also_new": 1}))
    status = await make_channel(base_url=url).status("r1")
    assert status.state is DeliveryState.UNKNOWN
    assert status.raw_status == "teleported"
    assert status.cost == Decimal("0.01")
    assert not status.cost_is_final


# --------------------------------------------------------------------------- models and mapping


def test_money_is_exact_decimal() -> None:
    """request_cost and remaining_balance parse from JSON floats without binary error."""
    status = RequestStatus.model_validate(
        {"request_id": "r", "phone_number": PHONE, "request_cost": 0.1 + 0.2, "remaining_balance": 99.99}
    )
    assert status.remaining_balance == Decimal("99.99")
    assert status.request_cost == Decimal(str(0.1 + 0.2))
    assert PHONE not in repr(status)


@pytest.mark.parametrize(
    ("error", "status", "expected"),
    [
        ("PHONE_NUMBER_NOT_FOUND", 400, InvalidRecipient),
        ("FLOOD_WAIT_abc", 400, ProviderRateLimited),
        ("SENDER_NOT_VERIFIED", 400, ProviderRejected),
        ("REQUEST_ID_INVALID", 400, ProviderRejected),
        ("MESSAGE_ALREADY_SENT", 400, MessageAlreadySent),
        ("SOMETHING_NEW", 400, ProviderRejected),
        ("SOMETHING_NEW", 500, ProviderUnavailable),
    ],
)
def test_error_strings_map_to_classes(error: str, status: int, expected: type[Exception]) -> None:
    """Every error string maps to one class and keeps the string in .code."""
    exc = error_from_string(error, method="m", http_status=status)
    assert type(exc) is expected
    assert exc.code == error


def test_unparsable_flood_wait_has_no_retry_after() -> None:
    """FLOOD_WAIT_ with a non-numeric suffix is still a rate limit, with no wait value."""
    exc = error_from_string("FLOOD_WAIT_abc", method="m")
    assert isinstance(exc, ProviderRateLimited) and exc.retry_after is None


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "expected", "not_performed"),
    [
        (httpx.ConnectError("refused"), ProviderUnavailable, True),
        (httpx.ConnectTimeout("slow connect"), ProviderTimeout, True),
        (httpx.PoolTimeout("pool"), ProviderTimeout, True),
        (httpx.ReadTimeout("slow answer"), ProviderTimeout, False),
        (httpx.WriteTimeout("slow write"), ProviderTimeout, False),
        (httpx.ReadError("reset"), ProviderUnavailable, False),
        (httpx.RemoteProtocolError("bad"), ProviderUnavailable, False),
        (httpx.DecodingError("garbled"), ProviderResponseError, False),
        # httpx-aiohttp labels a server disconnect "ConnectTimeout"; the aiohttp cause wins.
        (_chained(httpx.ConnectTimeout("x"), aiohttp.ServerDisconnectedError()), ProviderUnavailable, False),
        (_chained(httpx.ReadTimeout("x"), aiohttp.SocketTimeoutError()), ProviderTimeout, False),
        (_chained(httpx.ConnectTimeout("x"), aiohttp.ConnectionTimeoutError()), ProviderTimeout, True),
    ],
)
def test_transport_errors_say_whether_performed(
    exc: Exception, expected: type[Exception], not_performed: bool
) -> None:
    """Only failures before the request was written are marked not_performed."""
    mapped = map_transport_error(exc, method="m")
    assert type(mapped) is expected
    assert getattr(mapped, "not_performed", None) is not_performed


def test_bad_base_url_is_a_configuration_rejection() -> None:
    """An unsupported URL scheme is a permanent configuration error."""
    assert isinstance(map_transport_error(httpx.UnsupportedProtocol("ftp"), method="m"), ProviderRejected)


# --------------------------------------------------------------------------- delivery reports

VECTOR_BODY = b'{"request_id":"abc","phone_number":"+10000000000","request_cost":0.01}'
VECTOR_SIG = "e1a75b5858256498843ef1ed6dec3d5a21a8047c803aa3db42b367d6f9927aee"


def test_sign_report_matches_reference_vector() -> None:
    """The signature equals the reference vector (raw-digest key, hex output)."""
    assert sign_report("test-token", "1700000000", VECTOR_BODY) == VECTOR_SIG


def test_verify_accepts_reference_vector() -> None:
    """A fresh report with the reference signature is accepted."""
    verify_report_signature("test-token", "1700000000", VECTOR_SIG, VECTOR_BODY, now=1700000100)


@pytest.mark.parametrize(
    ("token", "timestamp", "signature", "body"),
    [
        ("other-token", "1700000000", VECTOR_SIG, VECTOR_BODY),
        # The hex-string key gives 820385cb…: a wrong-key signature.
        ("test-token", "1700000000", "820385cb" + "0" * 56, VECTOR_BODY),
        ("test-token", "1700000000", VECTOR_SIG, VECTOR_BODY.replace(b"0.01", b"0.00")),
        ("test-token", "1700000001", VECTOR_SIG, VECTOR_BODY),
        ("test-token", "1700000000.0", VECTOR_SIG, VECTOR_BODY),
        ("test-token", "", VECTOR_SIG, VECTOR_BODY),
        ("test-token", "1700000000", "é" * 64, VECTOR_BODY),
    ],
)
def test_verify_refuses_forgeries(token: str, timestamp: str, signature: str, body: bytes) -> None:
    """Wrong key, tampered body or timestamp, and malformed headers raise InvalidSignature."""
    with pytest.raises(InvalidSignature):
        verify_report_signature(token, timestamp, signature, body, now=1700000000)


def test_verify_refuses_stale_reports() -> None:
    """A genuine report older (or newer) than max_age is refused as stale."""
    with pytest.raises(StaleWebhook):
        verify_report_signature("test-token", "1700000000", VECTOR_SIG, VECTOR_BODY, now=1700000301)
    with pytest.raises(StaleWebhook):
        verify_report_signature("test-token", "1700000000", VECTOR_SIG, VECTOR_BODY, now=1699999000)


def test_parse_report_tolerates_unknowns_and_refuses_garbage() -> None:
    """parse_report maps a report with new fields, and refuses a body that is not a RequestStatus."""
    body = json.dumps(
        {
            "request_id": "r9",
            "phone_number": PHONE,
            "request_cost": 0.01,
            "is_refunded": True,
            "delivery_status": {"status": "expired", "updated_at": 1},
            "payload": "ver-1",
            "future": [1],
        }
    ).encode()
    status, payload = parse_report(body)
    assert (status.ref, status.state, status.refunded, payload) == (
        "r9",
        DeliveryState.EXPIRED,
        True,
        "ver-1",
    )
    for garbage in (b"not json", b"[]", b'{"request_id": "r"}'):
        with pytest.raises(WebhookError):
            parse_report(garbage)


async def test_delivery_report_is_signed_and_parsed(
    make_channel: Callable[..., TelegramChannel], serve_loopback: Callable[[web.Application], Awaitable[str]]
) -> None:
    """The emulator's delivery report reaches a receiver, verifies with the token and parses."""
    received: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        await received.put((headers["X-Request-Timestamp"], headers["X-Request-Signature"], body))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/telegram", receive)
    url = f"{await serve_loopback(app)}/telegram"
    channel = make_channel()
    sent = await channel.send(
        SendRequest(phone=PHONE, code="1234", ttl=60, callback_url=url, payload="ver-42")
    )
    timestamp, signature, body = await asyncio.wait_for(received.get(), 5)
    verify_report_signature(TOKEN, timestamp, signature, body)
    status, payload = channel.parse_report(body)
    assert (status.ref, status.state, payload) == (sent.ref, DeliveryState.DELIVERED, "ver-42")
    with pytest.raises(InvalidSignature):
        verify_report_signature("not-the-token", timestamp, signature, body)
