"""The fault matrix: every provider fault the emulators can script, through the real router.

Each row scripts one number, starts a verification and asserts three things
from the emulators' own records, never from the router's opinion of itself:

* the outcome: the channel the code ended on, and the fallback reason
  (a single probe 5xx is ``provider_error``, a long flood wait is
  ``rate_limited``: neither is ``retries_exhausted``);
* no duplicate send: how many Telegram messages and SMS the number got;
* the cost: the ledger equals what the providers charged (net of refunds).

The policy is Telegram (probe first, 1 s to deliver) then SMS; emulated time
runs 20x faster. Delivery reports (duplicated, out of order, late, unknown
ids) go through the real web app served on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from twilio.request_validator import RequestValidator

from otp_router.config import CircuitSettings, RetrySettings, Settings, SmsLookupSettings
from otp_router.core import Status
from otp_router.emulators import EmulatorPair, Script
from otp_router.errors import AllProvidersFailed
from otp_router.harness import emulated_settings, read_code, sample_numbers
from otp_router.metrics import Metrics
from otp_router.models import Verification
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName
from otp_router.providers.telegram import sign_report
from otp_router.router import OtpRouter
from otp_router.webapp import create_app

TIME_SCALE = 0.05
POLICY = Policy(steps=(Step(ChannelName.TELEGRAM, 1.0, probe=True), Step(ChannelName.SMS, 2.0)))
PROBE = "checkSendAbility"
SEND = "sendVerificationMessage"
#: The Telegram emulator's price per message.
TELEGRAM_PRICE = Decimal("0.01")
#: An ambiguous SMS send is looked up 0.1, 0.4 and 1 s (real) after it began, and a listing
#: without it proves "never created" from 0.8 s on: the defaults' 2/10/30 s, at this time scale.
LOOKUP = SmsLookupSettings(delays=(0.1, 0.4, 1.0), grace=0.8)


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=TIME_SCALE, default_delivery=4.0))


def fault_settings(pair: EmulatorPair, tmp_path: Path, **overrides: Any) -> Settings:
    """Short provider timeouts (a hang costs 1 s), no backoff, a circuit that stays closed,
    ambiguous SMS sends looked up on the emulators' time scale."""
    settings = emulated_settings(
        pair,
        store_url=f"sqlite:///{tmp_path / 'otp.db'}",
        code_secret="fault-matrix-secret",
        retry=RetrySettings(backoff=False, attempts=3, timeout=10),
        circuit=CircuitSettings(failures=100, cooldown=60),
        settle_delay=0.3,
        sms_lookup=LOOKUP,
        **overrides,
    )
    settings.telegram.timeout = 1.0
    settings.twilio.timeout = 1.0
    return settings


@pytest.fixture
async def router(pair: EmulatorPair, tmp_path: Path) -> AsyncIterator[OtpRouter]:
    """The router without a public URL: delivery is learnt by polling at the step deadline."""
    settings = fault_settings(pair, tmp_path)
    async with OtpRouter.from_settings(settings, policy=POLICY, metrics=Metrics(CollectorRegistry())) as r:
        yield r


# --- witnesses ---------------------------------------------------------------------


def telegram_messages(pair: EmulatorPair, phone: str) -> int:
    """Telegram messages sent to ``phone`` (delivered or not), from the emulator's state."""
    return len(pair.telegram.sent_to(phone))


def sms_messages(pair: EmulatorPair, phone: str) -> int:
    """SMS created for ``phone``, from the Twilio emulator's log."""
    return len(pair.twilio.messages_to(phone))


def telegram_charged(pair: EmulatorPair, phone: str) -> Decimal:
    """What Telegram charged for ``phone``, net of refunds."""
    total = Decimal(0)
    for entry in pair.telegram.log:
        if entry.phone_number != phone or entry.charged is None:
            continue
        status = pair.telegram.request_status(entry.request_id or "") or {}
        if not status.get("is_refunded"):
            total += Decimal(entry.charged)
    return total


def sms_charged(pair: EmulatorPair, phone: str) -> Decimal | None:
    """What Twilio charged for ``phone``; None while a message has no final price yet."""
    total = Decimal(0)
    for sid in pair.twilio.messages_to(phone):
        price = pair.twilio.messages[sid].price
        if price is None:
            return None
        total += abs(Decimal(price))
    return total


async def booked(router: OtpRouter, vid: str, channel: str) -> Decimal:
    return sum((e.amount for e in await router.store.ledger(vid) if e.channel == channel), Decimal(0))


async def assert_costs(
    router: OtpRouter, pair: EmulatorPair, vid: str, phone: str, *, unbooked: Decimal = Decimal(0)
) -> None:
    """The ledger reaches what the providers charged (Telegram less ``unbooked``) and stays there.

    ``unbooked`` is a charge no client can book: a probe that took effect but
    whose answer (the only place its request_id appears) was lost.
    """
    loop = asyncio.get_running_loop()
    until = loop.time() + 8.0
    while True:
        sms = sms_charged(pair, phone)
        want = (telegram_charged(pair, phone) - unbooked, sms)
        got = (await booked(router, vid, "telegram"), await booked(router, vid, "sms"))
        if got == want:
            break
        if loop.time() > until:
            raise AssertionError(f"ledger (telegram, sms) {got} != providers' charges {want}")
        await asyncio.sleep(0.05)


async def verify_with_delivered_code(
    router: OtpRouter, pair: EmulatorPair, v: Verification, phone: str
) -> None:
    code = await read_code(pair, phone, wait=8.0)
    assert code is not None, "the user never received a code"
    assert (await router.check(v.id, code)).valid


async def settled_state(
    router: OtpRouter, vid: str, predicate: Callable[[Verification], bool]
) -> Verification:
    loop = asyncio.get_running_loop()
    until = loop.time() + 8.0
    while True:
        v = await router.get(vid)
        if predicate(v):
            return v
        if loop.time() > until:
            raise AssertionError(f"condition not reached: {v}")
        await asyncio.sleep(0.05)


# --- the matrix ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One row: a script for the number and what must come of it."""

    name: str
    script: dict[str, Any]
    channel: str
    reasons: tuple[str, ...]
    telegram: int
    sms: int
    #: Telegram charges no client can book (a probe answer lost after it took effect).
    unbooked: Decimal = Decimal(0)
    #: Telegram calls per method the emulator must have seen (the re-issue after an ambiguous send…).
    calls: dict[str, int] = field(default_factory=dict)
    marks: tuple[Any, ...] = ()


ON_PROBE = {"telegram_fault_method": PROBE}
ON_SEND = {"telegram_fault_method": SEND}
ABSENT = {"telegram": "absent"}

FAULTS = [
    # Telegram, on the probe: none of these is repeated, since a probe that took effect was charged.
    Fault(
        "tg_probe_5xx", {**ON_PROBE, "telegram_5xx": 1}, "sms", ("provider_error",), 0, 1, calls={PROBE: 1}
    ),
    Fault(
        "tg_probe_reset_after_write",
        {**ON_PROBE, "telegram_reset_after_write": 1},
        "sms",
        ("provider_error",),
        0,
        1,
        unbooked=TELEGRAM_PRICE,
        calls={PROBE: 1},
    ),
    Fault(
        "tg_probe_hang",
        {**ON_PROBE, "telegram_hang": 1},
        "sms",
        ("timeout",),
        0,
        1,
        unbooked=TELEGRAM_PRICE,
        calls={PROBE: 1},
    ),
    Fault(
        "tg_probe_garbage",
        {**ON_PROBE, "telegram_garbage": 1},
        "sms",
        ("provider_error",),
        0,
        1,
        calls={PROBE: 1},
    ),
    Fault(
        "tg_probe_unknown_error",
        {**ON_PROBE, "telegram_error": "SOME_UNKNOWN_ERROR"},
        "sms",
        ("permanent_error",),
        0,
        1,
        calls={PROBE: 1},
    ),
    Fault(
        "tg_probe_flood_wait_short",
        {**ON_PROBE, "telegram_flood_wait": 1},
        "telegram",
        (),
        1,
        0,
        calls={PROBE: 2, SEND: 1},
    ),
    Fault(
        "tg_probe_flood_wait_long",
        {**ON_PROBE, "telegram_flood_wait": 3600},
        "sms",
        ("rate_limited",),
        0,
        1,
        calls={PROBE: 1},
    ),
    # Telegram, on the send: with the probe's request_id a repeated send cannot make a
    # second message (MESSAGE_ALREADY_SENT), so an ambiguous failure is re-issued once.
    Fault("tg_send_5xx", {**ON_SEND, "telegram_5xx": 1}, "telegram", (), 1, 0, calls={PROBE: 1, SEND: 2}),
    Fault(
        "tg_send_reset_after_write",
        {**ON_SEND, "telegram_reset_after_write": 1},
        "telegram",
        (),
        1,
        0,
        calls={PROBE: 1, SEND: 2},
    ),
    Fault("tg_send_hang", {**ON_SEND, "telegram_hang": 1}, "telegram", (), 1, 0, calls={PROBE: 1, SEND: 2}),
    Fault(
        "tg_send_garbage", {**ON_SEND, "telegram_garbage": 1}, "telegram", (), 1, 0, calls={PROBE: 1, SEND: 2}
    ),
    Fault(
        "tg_send_unknown_error",
        {**ON_SEND, "telegram_error": "SOME_UNKNOWN_ERROR"},
        "sms",
        ("permanent_error",),
        0,
        1,
        calls={PROBE: 1, SEND: 1},
    ),
    Fault(
        "tg_send_flood_wait_short",
        {**ON_SEND, "telegram_flood_wait": 1},
        "telegram",
        (),
        1,
        0,
        calls={PROBE: 1, SEND: 2},
    ),
    Fault(
        "tg_send_flood_wait_long",
        {**ON_SEND, "telegram_flood_wait": 3600},
        "sms",
        ("rate_limited",),
        0,
        1,
        calls={PROBE: 1, SEND: 1},
    ),
    # Twilio (the number is not on Telegram, so SMS is the only channel left).
    Fault("sms_429", {**ABSENT, "sms_429": 1}, "sms", ("ability_refused",), 0, 1),
    # A 503 may have been acted on: no blind second SMS. The lookup lists nothing for the number,
    # so the message provably never existed and the step is sent again (``not_created``): one SMS.
    Fault("sms_5xx", {**ABSENT, "sms_5xx": 1}, "sms", ("ability_refused", "not_created"), 0, 1),
    # Created, answer never came: the lookup finds it, no second SMS, and its price is booked.
    Fault("sms_hang", {**ABSENT, "sms_hang": 1}, "sms", ("ability_refused",), 0, 1),
]


@pytest.mark.parametrize("fault", [pytest.param(f, id=f.name, marks=f.marks) for f in FAULTS])
async def test_fault(router: OtpRouter, pair: EmulatorPair, fault: Fault) -> None:
    """The scripted fault ends on the expected channel and reason, one message, the right cost."""
    phone = sample_numbers("GB", 1, offset=FAULTS.index(fault) * 7)[0]
    pair.script.set(phone, **fault.script)
    v = await router.start(phone)
    await verify_with_delivered_code(router, pair, v, phone)
    final = await router.get(v.id)
    assert final.status is Status.VERIFIED
    assert final.channel == fault.channel
    assert tuple(f.reason for f in final.fallbacks) == fault.reasons
    assert (telegram_messages(pair, phone), sms_messages(pair, phone)) == (fault.telegram, fault.sms)
    for method, count in fault.calls.items():
        seen = [e for e in pair.telegram.log if e.phone_number == phone and e.method == method]
        assert len(seen) == count, (method, [e.outcome for e in seen])
    await assert_costs(router, pair, v.id, phone, unbooked=fault.unbooked)
    # Nothing more is sent once the verification is over (a late deadline, a stray retry).
    await asyncio.sleep(0.3)
    assert (telegram_messages(pair, phone), sms_messages(pair, phone)) == (fault.telegram, fault.sms)


@pytest.mark.parametrize("code", [21211, 21614, 21610, 21408])
async def test_sms_refusal_fails_the_verification(router: OtpRouter, pair: EmulatorPair, code: int) -> None:
    """Twilio refusing the number (invalid, landline, STOP, geo permission) ends the last step:
    failed with ``permanent_error`` and the code in the attempt, nothing created, nothing charged."""
    phone = sample_numbers("DE", 1, offset=code % 97)[0]
    pair.script.set(phone, telegram="absent", sms_error=code)
    with pytest.raises(AllProvidersFailed) as raised:
        await router.start(phone)
    assert raised.value.causes == {"telegram": "ability_refused", "sms": "permanent_error"}
    assert raised.value.verification_id is not None
    # Stored as failed: what get() returns is what the exception carried.
    v = await router.get(raised.value.verification_id)
    assert raised.value.verification is not None and raised.value.verification.created
    assert v.status is Status.FAILED and v == dataclasses.replace(raised.value.verification, created=False)
    assert [f.reason for f in v.fallbacks] == ["ability_refused", "permanent_error"]
    assert v.fallbacks[-1].to_channel is None
    [refused] = [e for e in pair.twilio.log if e.to == phone]
    assert refused.outcome == f"error {code}" and refused.sid is None
    assert (telegram_messages(pair, phone), sms_messages(pair, phone)) == (0, 0)
    assert await router.ledger_total(v.id) == 0
    # An idempotent repeat is no more a success than the first call.
    key = f"refused-{code}"
    with pytest.raises(AllProvidersFailed):
        await router.start(phone, idempotency_key=key)
    with pytest.raises(AllProvidersFailed) as again:
        await router.start(phone, idempotency_key=key)
    assert again.value.verification is not None and not again.value.verification.created


async def test_probe_5xx_then_healthy_probe(router: OtpRouter, pair: EmulatorPair) -> None:
    """One 5xx is one user's fallback, not an outage: the next user of the same number is on Telegram."""
    phone = sample_numbers("GB", 1, offset=900)[0]
    pair.script.set(phone, telegram_fault_method=PROBE, telegram_5xx=1)
    first = await router.start(phone)
    second = await router.start(phone)
    assert [f.reason for f in first.fallbacks] == ["provider_error"]
    assert second.channel == "telegram" and second.fallbacks == ()
    assert router.circuits[ChannelName.TELEGRAM] == 0


# --- delivery reports, through the web app -------------------------------------------------


@dataclass
class Served:
    router: OtpRouter
    public_url: str
    http: httpx.AsyncClient

    @property
    def token(self) -> str:
        return self.router.settings.telegram.token.get_secret_value()

    async def telegram_report(self, status: dict[str, Any]) -> dict[str, Any]:
        """POST a Telegram delivery report, signed as the Gateway signs."""
        body = json.dumps(status, separators=(",", ":")).encode()
        stamp = str(int(time.time()))
        response = await self.http.post(
            f"{self.public_url}/webhooks/telegram",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Request-Timestamp": stamp,
                "X-Request-Signature": sign_report(self.token, stamp, body),
            },
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def twilio_callback(self, vid: str, params: dict[str, str]) -> dict[str, Any]:
        """POST a Twilio status callback, signed as Twilio signs."""
        url = f"{self.public_url}/webhooks/twilio?vid={vid}"
        auth = self.router.settings.twilio.auth_token.get_secret_value()
        signature = RequestValidator(auth).compute_signature(url, params)
        response = await self.http.post(url, data=params, headers={"X-Twilio-Signature": signature})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture
async def served(pair: EmulatorPair, tmp_path: Path) -> AsyncIterator[Served]:
    """The router with a public URL on loopback, its web app served there: reports arrive by webhook."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    public_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = fault_settings(pair, tmp_path, public_url=public_url)
    async with OtpRouter.from_settings(
        settings, policy=POLICY, metrics=Metrics(CollectorRegistry())
    ) as router:
        config = uvicorn.Config(create_app(router), lifespan="off", log_config=None, access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            for _ in range(500):
                if server.started:
                    break
                await asyncio.sleep(0.01)
            assert server.started, "the web app did not start"
            async with httpx.AsyncClient(trust_env=False) as http:
                yield Served(router, public_url, http)
        finally:
            server.should_exit = True
            await task
            sock.close()


def twilio_params(pair: EmulatorPair, sid: str, status: str) -> dict[str, str]:
    message = pair.twilio.messages[sid]
    return {
        "AccountSid": pair.twilio.account_sid,
        "ApiVersion": "2010-04-01",
        "From": message.from_ or "",
        "MessageSid": sid,
        "MessageStatus": status,
        "SmsSid": sid,
        "SmsStatus": status,
        "To": message.to,
    }


async def test_duplicated_reports_change_nothing(served: Served, pair: EmulatorPair) -> None:
    """A Telegram report and a Twilio callback delivered twice: the second is a duplicate, booked once."""
    router = served.router
    tg_phone, sms_phone = sample_numbers("GB", 2, offset=400)
    pair.script.set(sms_phone, telegram="absent")
    tg = await router.start(tg_phone)
    sms = await router.start(sms_phone)
    await settled_state(router, tg.id, lambda v: v.delivered)
    await settled_state(router, sms.id, lambda v: v.delivered)
    [request_id] = pair.telegram.sent_to(tg_phone)
    [sid] = pair.twilio.messages_to(sms_phone)
    before = {vid: (await router.store.get(vid)) for vid in (tg.id, sms.id)}
    status = pair.telegram.request_status(request_id)
    assert status is not None
    for _ in range(2):
        assert (await served.telegram_report(status))["outcome"] == "duplicate"
        assert (await served.twilio_callback(sms.id, twilio_params(pair, sid, "delivered")))[
            "outcome"
        ] == "duplicate"
    after = {vid: (await router.store.get(vid)) for vid in (tg.id, sms.id)}
    assert after == before
    await verify_with_delivered_code(router, pair, tg, tg_phone)
    await verify_with_delivered_code(router, pair, sms, sms_phone)
    await assert_costs(router, pair, tg.id, tg_phone)
    await assert_costs(router, pair, sms.id, sms_phone)
    assert (telegram_messages(pair, tg_phone), sms_messages(pair, tg_phone)) == (1, 0)
    assert (telegram_messages(pair, sms_phone), sms_messages(pair, sms_phone)) == (0, 1)


async def test_out_of_order_callbacks_never_move_back(served: Served, pair: EmulatorPair) -> None:
    """``delivered`` before ``sent`` (Twilio does not promise order): the late ``sent`` changes nothing."""
    router = served.router
    phone = sample_numbers("GB", 1, offset=500)[0]
    # Twilio's own callbacks come 5 s later: ours arrive first, in the wrong order.
    pair.script.set(phone, telegram="absent", sms_delay=100.0)
    v = await router.start(phone)
    [sid] = pair.twilio.messages_to(phone)
    assert (await served.twilio_callback(v.id, twilio_params(pair, sid, "delivered")))[
        "outcome"
    ] == "accepted"
    assert (await served.twilio_callback(v.id, twilio_params(pair, sid, "sent")))["outcome"] == "duplicate"
    assert (await router.get(v.id)).delivered
    await verify_with_delivered_code(router, pair, v, phone)
    await assert_costs(router, pair, v.id, phone)
    assert sms_messages(pair, phone) == 1


async def test_late_report_after_fallback(served: Served, pair: EmulatorPair) -> None:
    """Telegram delivers after the step deadline already moved the user to SMS: the late report is
    taken in, nothing is sent again, and both messages are paid for exactly once."""
    router = served.router
    phone = sample_numbers("GB", 1, offset=600)[0]
    # Delivered 1.5 s after the send (30 s emulated, inside the ttl), the step deadline being 1 s.
    pair.script.set(phone, telegram_delay=30.0)
    v = await router.start(phone)
    fell = await settled_state(router, v.id, lambda s: s.channel == "sms")
    assert [f.reason for f in fell.fallbacks] == ["deadline"]
    loop = asyncio.get_running_loop()
    until = loop.time() + 8.0
    while not any(r["status"] == "delivered" and r["delivered"] for r in pair.telegram.reports):
        assert loop.time() < until, "the late Telegram report never reached the webhook"
        await asyncio.sleep(0.05)
    later = await router.get(v.id)
    assert later.channel == "sms" and later.status is Status.PENDING
    await verify_with_delivered_code(router, pair, v, phone)
    await assert_costs(router, pair, v.id, phone)
    assert (telegram_messages(pair, phone), sms_messages(pair, phone)) == (1, 1)


async def test_reports_for_unknown_ids_are_acknowledged_and_ignored(
    served: Served, pair: EmulatorPair
) -> None:
    """Reports naming no verification, an unknown one, or an unknown message of a known one:
    acknowledged with 200, nothing changed."""
    router = served.router
    phone = sample_numbers("GB", 1, offset=700)[0]
    pair.script.set(phone, telegram="absent")
    v = await router.start(phone)
    await settled_state(router, v.id, lambda s: s.delivered)
    before = await router.store.get(v.id)
    foreign = {
        "request_id": "f00dfeedf00dfeed",
        "phone_number": phone,
        "request_cost": 0.01,
        "delivery_status": {"status": "delivered", "updated_at": int(time.time())},
    }
    assert (await served.telegram_report(foreign))["outcome"] == "ignored"
    assert (await served.telegram_report({**foreign, "payload": "v_unknown"}))["outcome"] == "ignored"
    assert (await served.telegram_report({**foreign, "payload": v.id}))["outcome"] == "duplicate"
    [sid] = pair.twilio.messages_to(phone)
    params = twilio_params(pair, sid, "undelivered")
    assert (await served.twilio_callback("v_unknown", params))["outcome"] == "ignored"
    stranger = {**params, "MessageSid": "SM" + "0" * 32, "SmsSid": "SM" + "0" * 32}
    assert (await served.twilio_callback(v.id, stranger))["outcome"] == "duplicate"
    assert await router.store.get(v.id) == before
    await verify_with_delivered_code(router, pair, v, phone)
    await assert_costs(router, pair, v.id, phone)
    assert (telegram_messages(pair, phone), sms_messages(pair, phone)) == (0, 1)
