"""The Telegram Gateway emulator over real loopback HTTP: wire format, billing, delivery, reports."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from otp_router.emulators.script import Script
from otp_router.emulators.telegram import TelegramEmulator
from otp_router.providers.telegram import verify_report_signature

TOKEN = "emulator-test-token"
PHONE = "+14155550123"
OTHER = "+14155550124"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Gateway:
    """A running emulator and a way to call it."""

    emulator: TelegramEmulator
    url: str
    http: httpx.AsyncClient

    async def call(self, method: str, **params: Any) -> httpx.Response:
        return await self.http.post(f"{self.url}/{method}", json=params, headers=AUTH)

    async def ok(self, method: str, **params: Any) -> Any:
        response = await self.call(method, **params)
        body = response.json()
        assert response.status_code == 200 and body["ok"] is True, body
        return body["result"]

    async def error(self, method: str, **params: Any) -> str:
        response = await self.call(method, **params)
        body = response.json()
        assert body["ok"] is False and set(body) == {"ok", "error"}, body
        assert response.status_code == 400
        return str(body["error"])


@dataclass
class Receiver:
    """A delivery report endpoint that fails its first ``failures`` calls."""

    url: str = ""
    failures: int = 0
    seen: int = 0
    reports: asyncio.Queue[tuple[dict[str, str], bytes]] = field(default_factory=asyncio.Queue)


@pytest.fixture
def script() -> Script:
    return Script(time_scale=0.01)


@pytest.fixture
async def make_gateway(
    script: Script, http_client: httpx.AsyncClient
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Factory: start an emulator on an ephemeral port; all are stopped afterwards."""
    started: list[TelegramEmulator] = []

    async def make(**kwargs: Any) -> Gateway:
        emulator = TelegramEmulator(TOKEN, script, **kwargs)
        port = await emulator.start("127.0.0.1", 0)
        started.append(emulator)
        return Gateway(emulator, f"http://127.0.0.1:{port}", http_client)

    yield make
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def receiver(serve_loopback: Callable[[web.Application], Awaitable[str]]) -> Receiver:
    state = Receiver()

    async def receive(request: web.Request) -> web.Response:
        state.seen += 1
        if state.seen <= state.failures:
            return web.Response(status=500)
        await state.reports.put((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/reports", receive)
    state.url = f"{await serve_loopback(app)}/reports"
    return state


async def eventually(check: Callable[[], Any], limit: float = 5.0) -> Any:
    """Poll until ``check()`` is truthy (a bound, never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)
    return result


def current(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The emulator's RequestStatus for ``request_id`` (which must exist)."""
    status = gateway.emulator.request_status(request_id)
    assert status is not None
    return status


# --------------------------------------------------------------------------- wire format


async def test_all_four_methods_speak_the_envelope(gateway: Gateway) -> None:
    """Each method answers an ok envelope with a RequestStatus (or true for revoke)."""
    probe = await gateway.ok("checkSendAbility", phone_number=PHONE)
    assert probe["phone_number"] == PHONE and probe["request_cost"] == 0.01
    assert probe["remaining_balance"] == 99.99
    sent = await gateway.ok(
        "sendVerificationMessage", phone_number=PHONE, request_id=probe["request_id"], code="1234", ttl=60
    )
    assert sent["delivery_status"]["status"] == "sent"
    assert "remaining_balance" not in sent  # free send: nothing charged, no balance
    status = await gateway.ok("checkVerificationStatus", request_id=probe["request_id"])
    assert status["request_id"] == probe["request_id"]
    assert await gateway.ok("revokeVerificationMessage", request_id=probe["request_id"]) is True


async def test_method_names_are_case_insensitive(gateway: Gateway) -> None:
    """/CHECKSENDABILITY works and is logged under its canonical name."""
    await gateway.ok("CHECKSENDABILITY", phone_number=PHONE)
    assert [e.method for e in gateway.emulator.log] == ["checkSendAbility"]


async def test_query_string_and_access_token_parameter(gateway: Gateway) -> None:
    """GET with parameters and access_token in the query string is accepted."""
    response = await gateway.http.get(
        f"{gateway.url}/checkSendAbility", params={"phone_number": PHONE, "access_token": TOKEN}
    )
    assert response.json()["ok"] is True


async def test_form_encoded_body(gateway: Gateway) -> None:
    """A form-encoded POST with a Bearer header is accepted, numbers given as strings."""
    response = await gateway.http.post(
        f"{gateway.url}/sendVerificationMessage",
        data={"phone_number": PHONE, "code_length": "6", "ttl": "60"},
        headers=AUTH,
    )
    result = response.json()["result"]
    assert len(gateway.emulator.code_for(result["request_id"]) or "") == 6


@pytest.mark.parametrize(
    ("headers", "params", "error"),
    [
        ({}, {}, "ACCESS_TOKEN_REQUIRED"),
        ({"Authorization": "Bearer nope"}, {}, "ACCESS_TOKEN_INVALID"),
        ({}, {"access_token": "nope"}, "ACCESS_TOKEN_INVALID"),
    ],
)
async def test_token_errors_answer_401(
    gateway: Gateway, headers: dict[str, str], params: dict[str, str], error: str
) -> None:
    """A missing or wrong token answers HTTP 401 with the ACCESS_TOKEN_* error."""
    response = await gateway.http.post(
        f"{gateway.url}/checkSendAbility", json={"phone_number": PHONE, **params}, headers=headers
    )
    assert response.status_code == 401
    assert response.json() == {"ok": False, "error": error}


async def test_unknown_method(gateway: Gateway) -> None:
    """An unknown method name answers UNKNOWN_METHOD."""
    assert await gateway.error("sendPigeon", phone_number=PHONE) == "UNKNOWN_METHOD"


async def test_malformed_json_body(gateway: Gateway) -> None:
    """A JSON body that does not parse is an error envelope, not a crash."""
    response = await gateway.http.post(
        f"{gateway.url}/checkSendAbility",
        content=b"{nope",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.json() == {"ok": False, "error": "REQUEST_INVALID"}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"phone_number": "14155550123", "code": "1234"}, "PHONE_NUMBER_INVALID"),
        ({"phone_number": "+1 415 555 0123", "code": "1234"}, "PHONE_NUMBER_INVALID"),
        ({"phone_number": "+12", "code": "1234"}, "PHONE_NUMBER_INVALID"),
        ({"phone_number": PHONE}, "CODE_LENGTH_REQUIRED"),
        ({"phone_number": PHONE, "code_length": 9}, "CODE_LENGTH_INVALID"),
        ({"phone_number": PHONE, "code_length": "six"}, "CODE_LENGTH_INVALID"),
        ({"phone_number": PHONE, "code": "12a4"}, "CODE_INVALID"),
        ({"phone_number": PHONE, "code": "123"}, "CODE_INVALID"),
        ({"phone_number": PHONE, "code": "1234", "ttl": 29}, "TTL_INVALID"),
        ({"phone_number": PHONE, "code": "1234", "ttl": 3601}, "TTL_INVALID"),
        ({"phone_number": PHONE, "code": "1234", "payload": "é" * 65}, "PAYLOAD_INVALID"),
        (
            {"phone_number": PHONE, "code": "1234", "callback_url": "https://x/" + "a" * 247},
            "CALLBACK_URL_INVALID",
        ),
        ({"phone_number": PHONE, "code": "1234", "callback_url": "ftp://x/"}, "CALLBACK_URL_INVALID"),
        ({"phone_number": PHONE, "code": "1234", "sender_username": "-bad"}, "SENDER_USERNAME_INVALID"),
        ({"phone_number": PHONE, "code": "1234", "request_id": "unknown"}, "REQUEST_ID_INVALID"),
    ],
)
async def test_send_parameter_errors(gateway: Gateway, params: dict[str, Any], error: str) -> None:
    """Each invalid sendVerificationMessage parameter gives its error string and charges nothing."""
    assert await gateway.error("sendVerificationMessage", **params) == error
    assert gateway.emulator.balance == Decimal("100")


async def test_request_id_errors(gateway: Gateway) -> None:
    """Status and revoke need a known request_id."""
    assert await gateway.error("checkVerificationStatus") == "REQUEST_ID_REQUIRED"
    assert await gateway.error("revokeVerificationMessage", request_id="nope") == "REQUEST_ID_INVALID"


async def test_request_id_is_for_one_number_and_one_send(gateway: Gateway) -> None:
    """A probe's request_id refuses another number, then allows exactly one send."""
    probe = await gateway.ok("checkSendAbility", phone_number=PHONE)
    rid = probe["request_id"]
    assert (
        await gateway.error("sendVerificationMessage", phone_number=OTHER, request_id=rid, code="1234")
        == "PHONE_NUMBER_MISMATCH"
    )
    await gateway.ok("sendVerificationMessage", phone_number=PHONE, request_id=rid, code="1234")
    assert (
        await gateway.error("sendVerificationMessage", phone_number=PHONE, request_id=rid, code="1234")
        == "MESSAGE_ALREADY_SENT"
    )
    outcomes = [(e.method, e.outcome) for e in gateway.emulator.log]
    assert outcomes[-2:] == [
        ("sendVerificationMessage", "ok"),
        ("sendVerificationMessage", "MESSAGE_ALREADY_SENT"),
    ]


# --------------------------------------------------------------------------- billing


async def test_billing_probe_charges_send_with_id_is_free(gateway: Gateway) -> None:
    """Probe charges 0.01; the send with its id is free; a send without id charges again."""
    probe = await gateway.ok("checkSendAbility", phone_number=PHONE)
    await gateway.ok(
        "sendVerificationMessage", phone_number=PHONE, request_id=probe["request_id"], code="1234"
    )
    assert gateway.emulator.balance == Decimal("99.99")
    sent = await gateway.ok("sendVerificationMessage", phone_number=OTHER, code="1234")
    assert sent["remaining_balance"] == 99.98
    assert gateway.emulator.balance == Decimal("99.98")
    assert [e.charged for e in gateway.emulator.log] == ["0.01", None, "0.01"]


async def test_balance_not_enough(make_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    """With less than one message of balance, charging calls fail and nothing is charged."""
    gateway = await make_gateway(balance=Decimal("0.005"))
    assert await gateway.error("checkSendAbility", phone_number=PHONE) == "BALANCE_NOT_ENOUGH"
    assert (
        await gateway.error("sendVerificationMessage", phone_number=PHONE, code="1234")
        == "BALANCE_NOT_ENOUGH"
    )
    assert gateway.emulator.balance == Decimal("0.005")


async def test_expired_message_is_refunded(gateway: Gateway, script: Script) -> None:
    """A message never delivered expires at ttl (scaled), is marked refunded and the balance restored."""
    script.set(PHONE, telegram_never=True)
    sent = await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", ttl=30)
    rid = sent["request_id"]
    await eventually(lambda: gateway.emulator.balance == Decimal("100"))
    status = await gateway.ok("checkVerificationStatus", request_id=rid)
    assert status["delivery_status"]["status"] == "expired"
    assert status["is_refunded"] is True


async def test_delay_longer_than_ttl_expires(gateway: Gateway, script: Script) -> None:
    """A delivery slower than ttl is an expiry, not a late delivery."""
    script.set(PHONE, telegram_delay=31.0)
    sent = await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", ttl=30)
    status = await eventually(lambda: current(gateway, sent["request_id"])["is_refunded"])
    assert status is True


async def test_revoked_is_not_refunded(gateway: Gateway, script: Script) -> None:
    """Revoking an undelivered message marks it revoked and keeps the fee."""
    script.set(PHONE, telegram_never=True)
    sent = await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", ttl=3600)
    assert await gateway.ok("revokeVerificationMessage", request_id=sent["request_id"]) is True
    status = await gateway.ok("checkVerificationStatus", request_id=sent["request_id"])
    assert status["delivery_status"]["status"] == "revoked"
    assert status["is_refunded"] is False
    assert gateway.emulator.balance == Decimal("99.99")


async def test_revoke_after_delivery_changes_nothing(gateway: Gateway) -> None:
    """A delivered message stays delivered after a revoke request."""
    sent = await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", ttl=60)
    rid = sent["request_id"]
    await eventually(lambda: current(gateway, rid)["delivery_status"]["status"] == "delivered")
    assert await gateway.ok("revokeVerificationMessage", request_id=rid) is True
    assert current(gateway, rid)["delivery_status"]["status"] == "delivered"


# --------------------------------------------------------------------------- scripted behaviour


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("absent", "PHONE_NUMBER_NOT_FOUND"),
        ("unavailable", "PHONE_NUMBER_NOT_AVAILABLE"),
        ("invalid", "PHONE_NUMBER_INVALID"),
    ],
)
async def test_scripted_recipient_errors(gateway: Gateway, script: Script, mode: Any, error: str) -> None:
    """Scripted numbers refuse probes and sends with the matching error, free of charge."""
    script.set(PHONE, telegram=mode)
    assert await gateway.error("checkSendAbility", phone_number=PHONE) == error
    assert await gateway.error("sendVerificationMessage", phone_number=PHONE, code="1234") == error
    assert gateway.emulator.balance == Decimal("100")


async def test_scripted_5xx_then_flood_wait_then_ok(gateway: Gateway, script: Script) -> None:
    """The first N calls answer 502 with HTML, the next K answer FLOOD_WAIT_N, then calls succeed."""
    script.set(PHONE, telegram_5xx=2, telegram_flood_wait=7, telegram_flood_count=1)
    for _ in range(2):
        response = await gateway.call("checkSendAbility", phone_number=PHONE)
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("text/html")
    assert await gateway.error("checkSendAbility", phone_number=PHONE) == "FLOOD_WAIT_7"
    await gateway.ok("checkSendAbility", phone_number=PHONE)
    assert [e.outcome for e in gateway.emulator.log] == ["HTTP_502", "HTTP_502", "FLOOD_WAIT_7", "ok"]
    assert gateway.emulator.balance == Decimal("99.99")


async def test_rescripting_restarts_failure_count(gateway: Gateway, script: Script) -> None:
    """Scripting a number again counts its failing calls afresh."""
    script.set(PHONE, telegram_5xx=1)
    assert (await gateway.call("checkSendAbility", phone_number=PHONE)).status_code == 502
    await gateway.ok("checkSendAbility", phone_number=PHONE)
    script.set(PHONE, telegram_5xx=1)
    assert (await gateway.call("checkSendAbility", phone_number=PHONE)).status_code == 502


async def test_latency_holds_the_answer_but_the_request_takes_effect(
    gateway: Gateway, script: Script
) -> None:
    """A client that gives up on a slow answer still finds the send performed (an ambiguous timeout)."""
    script.set(PHONE, telegram_latency=500)
    with pytest.raises(httpx.TimeoutException):
        await gateway.http.post(
            f"{gateway.url}/sendVerificationMessage",
            json={"phone_number": PHONE, "code": "1234"},
            headers=AUTH,
            timeout=0.1,
        )
    assert [(e.method, e.outcome) for e in gateway.emulator.log] == [("sendVerificationMessage", "ok")]
    assert gateway.emulator.balance == Decimal("99.99")


# --------------------------------------------------------------------------- codes


async def test_code_checks(make_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    """Wrong codes are code_invalid up to the limit, then code_max_attempts_exceeded, even the right one."""
    gateway = await make_gateway(max_code_attempts=2)
    rid = (await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="2468"))["request_id"]
    statuses = []
    for code in ("1111", "2222", "3333", "2468"):
        result = await gateway.ok("checkVerificationStatus", request_id=rid, code=code)
        statuses.append(result["verification_status"]["status"])
    assert statuses == [
        "code_invalid",
        "code_invalid",
        "code_max_attempts_exceeded",
        "code_max_attempts_exceeded",
    ]


async def test_right_code_is_valid_and_generated_codes_work(gateway: Gateway) -> None:
    """The stored code checks as code_valid, including a code the emulator generated."""
    rid = (await gateway.ok("sendVerificationMessage", phone_number=PHONE, code_length=5))["request_id"]
    code = gateway.emulator.code_for(rid)
    assert code is not None and len(code) == 5 and code.isdigit()
    result = await gateway.ok("checkVerificationStatus", request_id=rid, code=code)
    assert result["verification_status"]["status"] == "code_valid"
    assert result["verification_status"]["code_entered"] == code


async def test_code_after_expiry_is_expired(gateway: Gateway, script: Script) -> None:
    """Checking a code for an expired message answers verification status expired."""
    script.set(PHONE, telegram_never=True)
    rid = (await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", ttl=30))["request_id"]
    await eventually(lambda: current(gateway, rid)["delivery_status"]["status"] == "expired")
    result = await gateway.ok("checkVerificationStatus", request_id=rid, code="1234")
    assert result["verification_status"]["status"] == "expired"


# --------------------------------------------------------------------------- delivery reports


async def test_delivery_report_is_signed_like_telegram(gateway: Gateway, receiver: Receiver) -> None:
    """A delivered message is reported to callback_url with a valid signature and the payload."""
    sent = await gateway.ok(
        "sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=receiver.url, payload="v-1"
    )
    headers, body = await asyncio.wait_for(receiver.reports.get(), 5)
    verify_report_signature(TOKEN, headers["X-Request-Timestamp"], headers["X-Request-Signature"], body)
    report = json.loads(body)
    assert report["request_id"] == sent["request_id"]
    assert report["delivery_status"]["status"] == "delivered"
    assert report["payload"] == "v-1"


async def test_expiry_and_revoke_are_reported(gateway: Gateway, receiver: Receiver, script: Script) -> None:
    """expired (refunded) and revoked messages are both reported."""
    script.set(PHONE, telegram_never=True)
    script.set(OTHER, telegram_never=True)
    await gateway.ok(
        "sendVerificationMessage", phone_number=PHONE, code="1234", ttl=30, callback_url=receiver.url
    )
    other = await gateway.ok(
        "sendVerificationMessage", phone_number=OTHER, code="1234", callback_url=receiver.url
    )
    await gateway.ok("revokeVerificationMessage", request_id=other["request_id"])
    reports = [json.loads((await asyncio.wait_for(receiver.reports.get(), 5))[1]) for _ in range(2)]
    by_status = {r["delivery_status"]["status"]: r for r in reports}
    assert by_status["expired"]["is_refunded"] is True
    assert by_status["revoked"]["is_refunded"] is False


async def test_failed_report_is_retried(gateway: Gateway, receiver: Receiver) -> None:
    """A receiver answering 500 twice gets the same report a third time."""
    receiver.failures = 2
    await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=receiver.url)
    await asyncio.wait_for(receiver.reports.get(), 5)
    reports = await eventually(lambda: gateway.emulator.reports)
    assert reports[0]["attempts"] == 3 and reports[0]["delivered"] is True


async def test_unreachable_callback_gives_up_without_crashing(
    make_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    """A callback URL nobody listens on is tried a bounded number of times and the emulator keeps serving."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = await make_gateway(callback_attempts=3, callback_backoff=0.5)
    await gateway.ok(
        "sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=f"http://127.0.0.1:{port}/x"
    )
    reports = await eventually(lambda: gateway.emulator.reports)
    assert reports == [
        {"request_id": reports[0]["request_id"], "status": "delivered", "attempts": 3, "delivered": False}
    ]
    await gateway.ok("checkSendAbility", phone_number=OTHER)


async def test_stop_cancels_pending_deliveries_and_reports(
    script: Script, receiver: Receiver, http_client: httpx.AsyncClient
) -> None:
    """Stopping with scheduled deliveries and failing reports in flight leaves nothing running."""
    receiver.failures = 1000
    emulator = TelegramEmulator(TOKEN, script, callback_backoff=100.0)
    port = await emulator.start()
    gateway = Gateway(emulator, f"http://127.0.0.1:{port}", http_client)
    await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234", callback_url=receiver.url)
    await gateway.ok("sendVerificationMessage", phone_number=OTHER, code="1234", ttl=3600)
    await eventually(lambda: receiver.seen >= 1)
    await emulator.stop()
    pending = [
        t for t in asyncio.all_tasks() if t is not asyncio.current_task() and "_post_report" in repr(t)
    ]
    assert pending == []


# --------------------------------------------------------------------------- admin


async def test_admin_script_log_state_reset(gateway: Gateway, script: Script) -> None:
    """The admin endpoints script numbers, expose the log and state, and reset everything but the script."""
    response = await gateway.http.post(
        f"{gateway.url}/_emulator/script", json={PHONE: {"telegram": "absent"}}
    )
    assert response.json()["ok"] is True
    assert await gateway.error("checkSendAbility", phone_number=PHONE) == "PHONE_NUMBER_NOT_FOUND"
    await gateway.ok("checkSendAbility", phone_number=OTHER)

    log = (await gateway.http.get(f"{gateway.url}/_emulator/log")).json()
    assert [(e["method"], e["phone_number"], e["outcome"]) for e in log] == [
        ("checkSendAbility", PHONE, "PHONE_NUMBER_NOT_FOUND"),
        ("checkSendAbility", OTHER, "ok"),
    ]
    assert log == [e.to_dict() for e in gateway.emulator.log]

    state = (await gateway.http.get(f"{gateway.url}/_emulator/state")).json()
    assert state["balance"] == "99.99" and len(state["requests"]) == 1

    reset = await gateway.http.post(f"{gateway.url}/_emulator/reset", json={"balance": "5"})
    assert reset.json()["result"]["balance"] == "5"
    assert (await gateway.http.get(f"{gateway.url}/_emulator/log")).json() == []
    assert script.behaviour(PHONE).telegram == "absent"


async def test_admin_script_refuses_typos(gateway: Gateway) -> None:
    """An unknown behaviour field is refused with HTTP 400 instead of silently ignored."""
    response = await gateway.http.post(
        f"{gateway.url}/_emulator/script", json={PHONE: {"telegarm": "absent"}}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "SCRIPT_INVALID"


async def test_injected_clock_stamps_statuses(make_gateway: Callable[..., Awaitable[Gateway]]) -> None:
    """updated_at and the log use the injected clock."""
    gateway = await make_gateway(clock=lambda: 1234567890.5)
    sent = await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="1234")
    assert sent["delivery_status"]["updated_at"] == 1234567890
    assert gateway.emulator.log[0].time == 1234567890.5


async def test_plain_curl_works(gateway: Gateway) -> None:
    """The emulator answers a plain curl request, as in the docs' examples."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    command = [
        curl, "-sS", "-X", "POST", f"{gateway.url}/checkSendAbility",
        "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
        "-d", json.dumps({"phone_number": PHONE}),
    ]  # fmt: skip
    completed = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=10, check=True)
    body = json.loads(completed.stdout)
    assert body["ok"] is True and body["result"]["phone_number"] == PHONE


async def test_inbox_reads_a_literal_plus_in_the_query_as_a_plus(gateway: Gateway) -> None:
    """/_emulator/inbox?phone=+1415… with the plus typed, not encoded, is the number with its plus
    (the literal plus rule); %2B works too, and another number's inbox stays empty."""
    await gateway.ok("sendVerificationMessage", phone_number=PHONE, code="4321", ttl=60)
    await eventually(lambda: gateway.emulator.inbox(PHONE))
    for query in (f"phone={PHONE}", f"phone=%2B{PHONE[1:]}"):
        response = await gateway.http.get(f"{gateway.url}/_emulator/inbox?{query}")
        assert response.request.url.query == query.encode()  # sent as typed
        assert response.json() == {"codes": ["4321"]}, query
    response = await gateway.http.get(f"{gateway.url}/_emulator/inbox?phone={OTHER}")
    assert response.json() == {"codes": []}
