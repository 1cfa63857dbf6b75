"""The Twilio emulator over real loopback HTTP: wire format, scripting, callbacks, admin."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from otp_router.emulators.script import Script
from otp_router.emulators.twilio import SERVICE_SENDER, TwilioEmulator

SID = "AC" + "a" * 32
TOKEN = "emulator-test-token"
GB = "+447400123456"
US = "+12025550143"
MESSAGES = f"/2010-04-01/Accounts/{SID}/Messages.json"

MakeEmulator = Callable[..., Awaitable[TwilioEmulator]]


def basic(user: str, password: str) -> dict[str, str]:
    """An Authorization header (aiohttp.BasicAuth is deprecated in aiohttp 3.14)."""
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


@pytest.fixture
async def make_emulator() -> AsyncIterator[MakeEmulator]:
    """Factory: a started emulator (fast time scale), stopped after the test."""
    started: list[TwilioEmulator] = []

    async def make(script: Script | None = None, **kwargs: Any) -> TwilioEmulator:
        emulator = TwilioEmulator(SID, TOKEN, script or Script(time_scale=0.02), **kwargs)
        await emulator.start("127.0.0.1", 0)
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def emulator(make_emulator: MakeEmulator) -> TwilioEmulator:
    """One started emulator with the default script."""
    return await make_emulator()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client with the emulator's Basic-auth credentials."""
    async with aiohttp.ClientSession(headers=basic(SID, TOKEN)) as client:
        yield client


@dataclass
class Receiver:
    """A tiny status-callback endpoint that records what it receives."""

    status: int = 200
    received: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
async def receiver(serve_loopback: Callable[[web.Application], Awaitable[str]]) -> Receiver:
    """A started callback receiver at ``receiver.url``."""
    state = Receiver()

    async def handle(request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        state.received.append((form, dict(request.headers)))
        return web.Response(status=state.status)

    app = web.Application()
    app.router.add_post("/twilio/status", handle)
    state.url = f"{await serve_loopback(app)}/twilio/status?v=1"
    return state


def form(**overrides: str | None) -> dict[str, str]:
    """A valid create form with some fields replaced or (None) removed."""
    data: dict[str, str | None] = {"To": GB, "From": "+15005550006", "Body": "Your login code is 123456"}
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


async def post(session: aiohttp.ClientSession, url: str, data: dict[str, str]) -> tuple[int, Any]:
    async with session.post(url, data=data) as response:
        return response.status, await response.json()


# ------------------------------------------------------------ the official SDK


# twilio-python's AsyncTwilioHttpClient itself uses aiohttp.BasicAuth and auth=, deprecated in aiohttp 3.14.
@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_official_sdk_creates_and_fetches_with_price_after_final(emulator: TwilioEmulator) -> None:
    """twilio-python's own async client creates a message and reads its price once final."""
    http = AsyncTwilioHttpClient()
    try:
        client = Client(SID, TOKEN, http_client=http, environment={"X": "1"})
        client.api.base_url = emulator.url
        created = await client.messages.create_async(to=GB, from_="+15005550006", body="code 123456")
        assert re.fullmatch(r"SM[0-9a-f]{32}", created.sid)
        assert created.status == "queued"
        assert created.num_segments == "1"
        assert created.price is None
        assert created.price_unit == "USD"
        assert created.direction == "outbound-api"
        assert isinstance(created.date_created, datetime)
        assert created.uri == f"/2010-04-01/Accounts/{SID}/Messages/{created.sid}.json"

        await emulator.settle()
        fetched = await client.messages(created.sid).fetch_async()
        assert fetched.status == "delivered"
        assert fetched.price == "-0.04630"  # GB list price, one segment
        assert fetched.error_code is None
        assert isinstance(fetched.date_sent, datetime)
    finally:
        await http.close()


async def test_create_answers_201_with_the_message_resource(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """A create answers 201 and the real resource's fields, strings where Twilio uses strings."""
    status, body = await post(session, emulator.url + MESSAGES, form())
    assert status == 201
    assert body["account_sid"] == SID
    assert body["api_version"] == "2010-04-01"
    assert body["to"] == GB and body["from"] == "+15005550006"
    assert body["num_media"] == "0" and body["num_segments"] == "1"
    assert body["error_code"] is None and body["error_message"] is None
    assert body["date_created"].endswith("+0000")
    assert body["subresource_uris"]["media"].endswith("/Media.json")


async def test_messaging_service_starts_accepted_without_sender(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """With only a Messaging Service the message is ``accepted``, no sender and "0" segments until sent."""
    status, body = await post(
        session, emulator.url + MESSAGES, form(From=None, MessagingServiceSid="MG" + "1" * 32)
    )
    assert status == 201
    assert body["status"] == "accepted"
    assert body["from"] is None and body["num_segments"] == "0"
    await emulator.settle()
    async with session.get(emulator.url + body["uri"]) as response:
        final = await response.json()
    assert final["from"] == SERVICE_SENDER and final["num_segments"] == "1"


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"To": None}, 21604),
        ({"To": "+123"}, 21211),
        ({"To": "07400123456"}, 21211),
        ({"To": "+4474001234"}, 21211),
        ({"From": None}, 21603),
        ({"Body": None}, 21602),
        ({"ValidityPeriod": "0"}, 21624),
        ({"ValidityPeriod": "36001"}, 21624),
        ({"ValidityPeriod": "soon"}, 21624),
    ],
)
async def test_invalid_creates_get_twilio_error_bodies(
    emulator: TwilioEmulator, session: aiohttp.ClientSession, overrides: dict[str, str | None], code: int
) -> None:
    """Each invalid request gets HTTP 400 and the legacy error body with the right code."""
    status, body = await post(session, emulator.url + MESSAGES, form(**overrides))
    assert status == 400
    assert body == {
        "code": code,
        "message": body["message"],
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": 400,
    }
    assert emulator.log[-1].outcome == f"error {code}"
    assert emulator.messages == {}


async def test_validity_period_limits_are_accepted(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """ValidityPeriod 1 and 36000 are both inside Twilio's range."""
    for value in ("1", "36000"):
        status, _ = await post(session, emulator.url + MESSAGES, form(ValidityPeriod=value))
        assert status == 201


@pytest.mark.parametrize(
    ("headers", "path_sid"),
    [
        (basic(SID, "wrong"), SID),
        (basic("AC" + "b" * 32, TOKEN), SID),
        (basic(SID, TOKEN), "AC" + "b" * 32),
        ({"Authorization": "Basic !!!"}, SID),
        ({"Authorization": f"Bearer {TOKEN}"}, SID),
        ({}, SID),
    ],
)
async def test_bad_credentials_or_account_get_20003(
    emulator: TwilioEmulator, headers: dict[str, str], path_sid: str
) -> None:
    """Wrong token, wrong user, another account's path, garbled or no auth: 401 with code 20003."""
    async with aiohttp.ClientSession(headers=headers) as client:
        url = f"{emulator.url}/2010-04-01/Accounts/{path_sid}/Messages.json"
        async with client.post(url, data=form()) as response:
            assert response.status == 401
            assert (await response.json())["code"] == 20003
            assert "Basic" in response.headers["WWW-Authenticate"]
    assert emulator.messages == {}


async def test_fetch_of_unknown_sid_is_20404(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """Fetching a SID the emulator never created answers 404 / 20404."""
    async with session.get(
        f"{emulator.url}/2010-04-01/Accounts/{SID}/Messages/SM{'0' * 32}.json"
    ) as response:
        assert response.status == 404
        assert (await response.json())["code"] == 20404


# -------------------------------------------------------------------- scripts


async def test_scripted_errors(make_emulator: MakeEmulator, session: aiohttp.ClientSession) -> None:
    """sms_invalid answers 21211 and sms_error answers its own code, both HTTP 400."""
    script = Script({}, time_scale=0.02)
    script.set(GB, sms_invalid=True)
    script.set(US, sms_error=21610)
    emulator = await make_emulator(script)
    assert (await post(session, emulator.url + MESSAGES, form()))[1]["code"] == 21211
    status, body = await post(session, emulator.url + MESSAGES, form(To=US))
    assert (status, body["code"]) == (400, 21610)


async def test_scripted_429_then_503_then_success(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """The first sms_429 creates get 429/20429, the next sms_5xx get 503, then creates succeed."""
    script = Script(time_scale=0.02)
    script.set(GB, sms_429=2, sms_5xx=1)
    emulator = await make_emulator(script)
    results = [await post(session, emulator.url + MESSAGES, form()) for _ in range(4)]
    assert [(status, body.get("code")) for status, body in results] == [
        (429, 20429),
        (429, 20429),
        (503, 20503),
        (201, None),
    ]
    assert [entry.outcome for entry in emulator.log] == ["http 429", "http 429", "http 503", "queued"]
    assert emulator.messages_to(GB) == [results[3][1]["sid"]]


@pytest.mark.parametrize(
    ("final", "error_code", "expected_code", "price"),
    [
        ("undelivered", None, 30003, "-0.04630"),
        ("undelivered", 30005, 30005, "-0.04630"),
        ("failed", None, 30008, "0.00000"),
    ],
)
async def test_scripted_final_status(
    make_emulator: MakeEmulator,
    session: aiohttp.ClientSession,
    final: str,
    error_code: int | None,
    expected_code: int,
    price: str,
) -> None:
    """Undelivered and failed messages end with an error code; failed ones cost nothing."""
    script = Script(time_scale=0.02)
    script.set(GB, sms_final=final, sms_error_code=error_code)
    emulator = await make_emulator(script)
    _, created = await post(session, emulator.url + MESSAGES, form())
    await emulator.settle()
    async with session.get(emulator.url + created["uri"]) as response:
        body = await response.json()
    assert body["status"] == final
    assert body["error_code"] == expected_code
    assert body["error_message"]
    assert body["price"] == price


async def test_two_creates_to_one_number_are_both_witnessed(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """The log records every create, so a test can prove how many SMS one phone got."""
    await post(session, emulator.url + MESSAGES, form())
    await post(session, emulator.url + MESSAGES, form(To=US))
    await post(session, emulator.url + MESSAGES, form())
    assert len(emulator.messages_to(GB)) == 2
    assert len(emulator.messages_to(US)) == 1


# ------------------------------------------------------------------ callbacks


async def test_status_callbacks_are_signed_and_ordered(
    emulator: TwilioEmulator, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """``sent`` then ``delivered`` arrive form-encoded with a valid X-Twilio-Signature over the exact URL."""
    _, created = await post(session, emulator.url + MESSAGES, form(StatusCallback=receiver.url))
    await emulator.settle()
    assert [f["MessageStatus"] for f, _ in receiver.received] == ["sent", "delivered"]
    validator = RequestValidator(TOKEN)
    for params, headers in receiver.received:
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert validator.validate(receiver.url, params, headers["X-Twilio-Signature"])
        assert params["MessageSid"] == params["SmsSid"] == created["sid"]
        assert params["SmsStatus"] == params["MessageStatus"]
        assert params["AccountSid"] == SID and params["ApiVersion"] == "2010-04-01"
        assert params["To"] == GB and params["From"] == "+15005550006"
        assert "ErrorCode" not in params
    sent, delivered = (params for params, _ in receiver.received)
    assert "RawDlrDoneDate" not in sent
    assert re.fullmatch(r"\d{10}", delivered["RawDlrDoneDate"])
    assert not RequestValidator("other-token").validate(
        receiver.url, delivered, receiver.received[1][1]["X-Twilio-Signature"]
    )


async def test_undelivered_callback_carries_error_code(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """The final ``undelivered`` callback has ErrorCode and RawDlrDoneDate."""
    script = Script(time_scale=0.02)
    script.set(GB, sms_final="undelivered", sms_error_code=30006)
    emulator = await make_emulator(script)
    await post(session, emulator.url + MESSAGES, form(StatusCallback=receiver.url))
    await emulator.settle()
    final = receiver.received[-1][0]
    assert final["MessageStatus"] == "undelivered"
    assert final["ErrorCode"] == "30006"
    assert "RawDlrDoneDate" in final


async def test_failing_callbacks_are_retried_a_bounded_number_of_times(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    """A receiver answering 500 gets each status exactly ``callback_attempts`` times; serving goes on."""
    receiver.status = 500
    emulator = await make_emulator(callback_attempts=3, callback_backoff=0.0)
    await post(session, emulator.url + MESSAGES, form(StatusCallback=receiver.url))
    await emulator.settle()
    assert [f["MessageStatus"] for f, _ in receiver.received] == ["sent"] * 3 + ["delivered"] * 3
    status, _ = await post(session, emulator.url + MESSAGES, form())
    assert status == 201


async def test_unreachable_callback_never_breaks_the_emulator(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession, unused_port: int
) -> None:
    """A callback URL nobody listens on is dropped after its retries; the message still completes."""
    emulator = await make_emulator(callback_backoff=0.0)
    url = f"http://127.0.0.1:{unused_port}/cb"
    _, created = await post(session, emulator.url + MESSAGES, form(StatusCallback=url))
    await emulator.settle()
    assert emulator.messages[created["sid"]].status == "delivered"


@pytest.fixture
def unused_port() -> int:
    """A port with nothing listening on it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_stop_cancels_pending_work_cleanly(make_emulator: MakeEmulator, receiver: Receiver) -> None:
    """Stopping with messages mid-flight cancels their timers and callbacks without warnings."""
    script = Script(time_scale=1.0)
    script.set(GB, sms_delay=30.0)
    emulator = await make_emulator(script)
    async with aiohttp.ClientSession(headers=basic(SID, TOKEN)) as client:
        await post(client, emulator.url + MESSAGES, form(StatusCallback=receiver.url))
    await emulator.stop()
    await emulator.settle()  # returns at once: nothing is pending any more
    assert receiver.received == []


# ---------------------------------------------------------------------- admin


async def test_admin_script_log_and_reset(emulator: TwilioEmulator, session: aiohttp.ClientSession) -> None:
    """Scripts can be set over HTTP, the log lists creates, and reset forgets messages and log."""
    async with session.post(emulator.url + "/_emulator/script", json={US: {"sms_invalid": True}}) as response:
        assert response.status == 200
    assert (await post(session, emulator.url + MESSAGES, form(To=US)))[1]["code"] == 21211
    _, created = await post(session, emulator.url + MESSAGES, form())

    async with session.get(emulator.url + "/_emulator/log") as response:
        log = await response.json()
    assert [(e["to"], e["outcome"], e["http_status"]) for e in log] == [
        (US, "error 21211", 400),
        (GB, "queued", 201),
    ]
    assert log[1]["sid"] == created["sid"] and isinstance(log[1]["time"], float)

    async with session.post(emulator.url + "/_emulator/reset") as response:
        assert response.status == 200
    assert emulator.log == []
    async with session.get(emulator.url + created["uri"]) as response:
        assert response.status == 404
    # The script survives a reset.
    assert (await post(session, emulator.url + MESSAGES, form(To=US)))[1]["code"] == 21211


@pytest.mark.parametrize("payload", [{"+1": {"no_such_field": 1}}, ["not", "an", "object"], {"+1": 3}])
async def test_admin_script_refuses_bad_json(
    emulator: TwilioEmulator, session: aiohttp.ClientSession, payload: Any
) -> None:
    """An unusable script is refused with 400 and changes nothing."""
    async with session.post(emulator.url + "/_emulator/script", json=payload) as response:
        assert response.status == 400
        assert "error" in await response.json()
    assert emulator.script.numbers == {}


# ----------------------------------------------------------------------- curl


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_plain_curl_can_send_and_is_refused_with_a_bad_token(emulator: TwilioEmulator) -> None:
    """The emulator works with a plain ``curl -u SID:TOKEN --data-urlencode`` as in Twilio's docs."""

    async def curl(*args: str) -> tuple[int, Any]:
        process = await asyncio.create_subprocess_exec(
            "curl", "-s", "-w", "\n%{http_code}", *args, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        body, _, code = out.decode().rpartition("\n")
        return int(code), json.loads(body)

    url = emulator.url + MESSAGES
    fields = ["--data-urlencode", f"To={GB}", "--data-urlencode", "From=+15005550006", "-d", "Body=hi"]
    status, body = await curl("-u", f"{SID}:{TOKEN}", *fields, url)
    assert status == 201 and body["status"] == "queued"
    status, body = await curl("-u", f"{SID}:nope", *fields, url)
    assert (status, body["code"]) == (401, 20003)
    assert len(emulator.messages) == 1


# ------------------------------------------------------------- message list


async def get(session: aiohttp.ClientSession, url: str, params: Any = None) -> tuple[int, Any]:
    async with session.get(url, params=params) as response:
        return response.status, await response.json()


async def create_n(
    session: aiohttp.ClientSession, emulator: TwilioEmulator, n: int, **fields: str
) -> list[str]:
    sids = []
    for _ in range(n):
        status, body = await post(session, emulator.url + MESSAGES, form(**fields))
        assert status == 201
        sids.append(body["sid"])
    return sids


@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_official_sdk_lists_pages_newest_first(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """twilio-python's list_async walks every page (PageSize 2) and sees each message once, newest first."""
    mine = await create_n(session, emulator, 5)
    await create_n(session, emulator, 2, To=US)
    http = AsyncTwilioHttpClient()
    try:
        client = Client(SID, TOKEN, http_client=http, environment={"X": "1"})
        client.api.base_url = emulator.url
        listed = await client.messages.list_async(to=GB, page_size=2)
        assert [m.sid for m in listed] == list(reversed(mine))
        assert all(m.to == GB and m.direction == "outbound-api" for m in listed)
        first = await client.messages.page_async(to=GB, page_size=2)
        assert first.next_page_url is not None and first.previous_page_url is None
        second = await first.next_page_async()
        assert [m.sid for m in second] == [mine[2], mine[1]]
        assert second.previous_page_url is not None
        back = await second.previous_page_async()
        assert [m.sid for m in back] == [mine[4], mine[3]]
    finally:
        await http.close()


async def test_list_envelope_matches_twilio(emulator: TwilioEmulator, session: aiohttp.ClientSession) -> None:
    """The list answer has exactly Twilio's envelope keys, page URIs carrying the filters."""
    sids = await create_n(session, emulator, 3)
    status, body = await get(session, emulator.url + MESSAGES, {"To": GB, "PageSize": "2"})
    assert status == 200
    assert set(body) == {
        "end",
        "first_page_uri",
        "messages",
        "next_page_uri",
        "page",
        "page_size",
        "previous_page_uri",
        "start",
        "uri",
    }
    assert (body["page"], body["page_size"], body["start"], body["end"]) == (0, 2, 0, 1)
    assert [m["sid"] for m in body["messages"]] == [sids[2], sids[1]]
    assert body["previous_page_uri"] is None
    assert body["next_page_uri"].startswith(MESSAGES + "?To=%2B447400123456&PageSize=2&Page=1&PageToken=PA")
    assert body["first_page_uri"] == MESSAGES + "?To=%2B447400123456&PageSize=2&Page=0"
    status, last = await get(session, emulator.url + body["next_page_uri"])
    assert status == 200 and [m["sid"] for m in last["messages"]] == [sids[0]]
    assert (last["page"], last["start"], last["end"], last["next_page_uri"]) == (1, 2, 2, None)
    status, empty = await get(session, emulator.url + MESSAGES, {"To": US})
    assert status == 200 and empty["messages"] == [] and empty["next_page_uri"] is None


async def test_list_filters_by_sender_and_date_sent(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """From filters the sender; DateSent filters match only sent messages, by UTC day or instant."""
    emulator.script.set(GB, sms_delay=25.0)  # sent after 0.25 s of real time
    [ours] = await create_n(session, emulator, 1)
    await create_n(session, emulator, 1, From="+15005550009")
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "From": "+15005550006"})
    assert [m["sid"] for m in body["messages"]] == [ours]
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent>": "2020-01-01"})
    assert body["messages"] == [], "a message not yet sent has no date_sent and matches no date filter"
    await emulator.settle()
    sent = emulator.messages[ours].sent
    assert sent is not None
    today = datetime.fromtimestamp(sent, UTC).strftime("%Y-%m-%d")
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent>": today})
    assert len(body["messages"]) == 2
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent": today})
    assert len(body["messages"]) == 2
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent<": "2020-01-01"})
    assert body["messages"] == []
    later = datetime.fromtimestamp(sent + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent>": later})
    assert body["messages"] == []
    _, body = await get(session, emulator.url + MESSAGES, {"To": GB, "DateSent<": later})
    assert len(body["messages"]) == 2


async def test_list_refuses_bad_parameters_and_credentials(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """Unparsable dates, page sizes or tokens answer 400/20001; wrong credentials 401/20003."""
    for params in (
        {"DateSent>": "yesterday"},
        {"PageSize": "0"},
        {"PageSize": "1001"},
        {"Page": "x"},
        {"PageToken": "PAnope"},
    ):
        status, body = await get(session, emulator.url + MESSAGES, params)
        assert (status, body["code"]) == (400, 20001), params
    async with aiohttp.ClientSession(headers=basic(SID, "wrong")) as bad:
        status, body = await get(bad, emulator.url + MESSAGES)
    assert (status, body["code"]) == (401, 20003)


async def test_scripted_list_faults_and_lag(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """sms_list_5xx answers the first list calls for a number with 503; sms_list_lag hides new messages."""
    script = Script(time_scale=1.0)
    script.set(GB, sms_list_5xx=1, sms_list_lag=0.3)
    emulator = await make_emulator(script)
    await create_n(session, emulator, 1)
    status, body = await get(session, emulator.url + MESSAGES, {"To": GB})
    assert (status, body["code"]) == (503, 20503)
    status, body = await get(session, emulator.url + MESSAGES, {"To": GB})
    assert status == 200 and body["messages"] == []
    await asyncio.sleep(0.35)
    status, body = await get(session, emulator.url + MESSAGES, {"To": GB})
    assert status == 200 and len(body["messages"]) == 1
    assert emulator.list_requests == 3


async def test_scripted_5xx_after_create_keeps_the_message(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """sms_5xx_after_create: the message is created and delivered, but the create answers 503."""
    emulator.script.set(GB, sms_5xx_after_create=1)
    status, body = await post(session, emulator.url + MESSAGES, form())
    assert (status, body["code"]) == (503, 20503)
    await emulator.settle()
    assert len(emulator.messages_to(GB)) == 1
    assert emulator.inbox(GB) == ["Your login code is 123456"]
    assert [e.outcome for e in emulator.log] == ["http 503 after create"]
    status, _ = await post(session, emulator.url + MESSAGES, form())
    assert status == 201 and len(emulator.messages_to(GB)) == 2


async def test_scripted_latency_after_create(
    make_emulator: MakeEmulator, session: aiohttp.ClientSession
) -> None:
    """sms_latency_after_create holds the answer after the message exists: a client timeout loses it."""
    script = Script(time_scale=1.0)
    script.set(GB, sms_latency_after_create=5.0, sms_delay=0.05)
    emulator = await make_emulator(script)
    with pytest.raises(TimeoutError):
        async with session.post(
            emulator.url + MESSAGES, data=form(), timeout=aiohttp.ClientTimeout(total=0.3)
        ) as response:
            await response.read()
    assert len(emulator.messages_to(GB)) == 1
    await emulator.settle()
    assert len(emulator.inbox(GB)) == 1


async def test_inbox_reads_a_literal_plus_in_the_query_as_a_plus(
    emulator: TwilioEmulator, session: aiohttp.ClientSession
) -> None:
    """/_emulator/inbox?phone=+44… with the plus typed, not encoded, is the number with its plus
    (the literal plus rule); %2B works too."""
    status, _ = await post(session, emulator.url + MESSAGES, form())
    assert status == 201
    await emulator.settle()
    for query in (f"phone={GB}", f"phone=%2B{GB[1:]}"):
        url = yarl.URL(f"{emulator.url}/_emulator/inbox?{query}", encoded=True)
        async with session.get(url) as response:
            assert response.url.raw_query_string == query  # sent as typed
            assert await response.json() == {"messages": ["Your login code is 123456"]}, query
