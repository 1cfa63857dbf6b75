"""The router shell with injected fake channels, an in-memory store and a hand-driven clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otp_router.circuit import CircuitState
from otp_router.codes import derive_code
from otp_router.config import CircuitSettings, LimitSettings, Settings
from otp_router.core import AttemptPhase, CheckOutcome, Status, VerificationState
from otp_router.errors import (
    AllProvidersFailed,
    IdempotencyConflict,
    InputError,
    InvalidCode,
    InvalidPhoneNumber,
    MessageAlreadySent,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UnsupportedCountry,
    VerificationNotFound,
)
from otp_router.metrics import Metrics
from otp_router.policy import CountryRule, Policy, Step
from otp_router.providers.base import (
    ChannelName,
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendRequest,
    SendResult,
    StatusResult,
)
from otp_router.router import OtpRouter, ResendNotAllowed
from otp_router.store.memory import MemoryStore

US = "+12025550143"
TG = Decimal("0.01")
SMS = Decimal("0.0083")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Crash(BaseException):
    """Stands in for the process dying in the middle of a provider call."""


Handler = Callable[[str, Any], Awaitable[Any]]


def telegram_handler(*, reachable: bool = True, status: DeliveryState = DeliveryState.SENT) -> Handler:
    async def handle(method: str, arg: Any) -> Any:
        if method == "probe":
            if not reachable:
                return ProbeResult(False, reason="PHONE_NUMBER_NOT_FOUND")
            return ProbeResult(True, ref="req-1", cost=TG, remaining_balance=Decimal("99.99"))
        if method == "send":
            return SendResult(ref=arg.probe_ref or "req-x", state=DeliveryState.SENT, cost=TG)
        if method == "status":
            refunded = status is DeliveryState.EXPIRED
            return StatusResult(arg, status, cost=TG, refunded=refunded, cost_is_final=status != "sent")
        return True

    return handle


def sms_handler(*, status: DeliveryState = DeliveryState.DELIVERED) -> Handler:
    async def handle(method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True)
        if method == "send":
            return SendResult(ref="SM1", state=DeliveryState.PENDING, cost=SMS, cost_is_estimate=True)
        if method == "status":
            return StatusResult(arg, status, cost=Decimal("0.0079"), cost_is_final=True)
        return False

    return handle


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def build(clock: Clock, registry: CollectorRegistry) -> Any:
    """Factory for an opened router over fake channels; tests pass handlers and settings."""
    metrics = Metrics(registry)

    async def make(
        tg: Handler | None = None,
        sms: Handler | None = None,
        store: MemoryStore | None = None,
        **settings: Any,
    ) -> tuple[OtpRouter, FakeChannel, FakeChannel]:
        telegram = FakeChannel(ChannelName.TELEGRAM, tg or telegram_handler(), provider="telegram")
        twilio = FakeChannel(ChannelName.SMS, sms or sms_handler(), provider="twilio")
        settings.setdefault("code_secret", "test-secret")
        router = OtpRouter(
            store=store or MemoryStore(),
            channels={ChannelName.TELEGRAM: telegram, ChannelName.SMS: twilio},
            settings=Settings(**settings),
            metrics=metrics,
            clock=clock,
            run_deadlines=False,
        )
        await router.open()
        return router, telegram, twilio

    return make


def code_of(router: OtpRouter, state: VerificationState) -> str:
    return derive_code(router.secret, state.id, state.code_nonce, router.settings.code_length)


async def state_of(router: OtpRouter, vid: str) -> VerificationState:
    record = await router.store.get(vid)
    assert record is not None
    return VerificationState.model_validate_json(record.data)


async def test_telegram_first_then_valid_code(build: Any, registry: CollectorRegistry) -> None:
    """Telegram is probed then sent with the probe's request_id; the right code verifies."""
    router, tg, sms = await build()
    v = await router.start(US)
    assert v.status is Status.PENDING and v.channel == "telegram"
    assert [m for m, _ in tg.calls] == ["probe", "send"]
    request: SendRequest = tg.calls[1][1]
    assert request.probe_ref == "req-1" and request.ttl == 30 and request.payload == v.id
    assert sms.calls == []
    result = await router.check(v.id, request.code)
    assert result.valid and result.verification is not None
    assert result.verification.status is Status.VERIFIED
    await router.wait_idle()
    assert ("report_code", ("req-1", request.code)) in tg.calls
    assert await router.ledger_total(v.id) == TG
    assert registry.get_sample_value("otp_router_telegram_balance_credits") == pytest.approx(99.99)


async def test_not_on_telegram_goes_to_sms_at_once(build: Any, registry: CollectorRegistry) -> None:
    """A refused ability check sends the same code by SMS in the same call; Telegram charges nothing."""
    router, tg, sms = await build(tg=telegram_handler(reachable=False))
    v = await router.start(US)
    assert v.channel == "sms" and [f.reason for f in v.fallbacks] == ["ability_refused"]
    assert [m for m, _ in tg.calls] == ["probe"]
    state = await state_of(router, v.id)
    assert sms.calls[0][1].code == code_of(router, state)
    entries = await router.store.ledger(v.id)
    assert [(e.channel, e.kind.value, e.amount) for e in entries] == [("sms", "estimate", SMS)]
    labels = {"from_channel": "telegram", "to_channel": "sms", "reason": "ability_refused"}
    assert registry.get_sample_value("otp_router_fallbacks_total", labels) == 1


async def test_deadline_falls_back_and_settles_the_refund(build: Any, clock: Clock) -> None:
    """No delivery by the deadline: poll, fall back to SMS, and later book Telegram's refund."""
    router, tg, sms = await build(tg=telegram_handler(status=DeliveryState.SENT))
    v = await router.start(US)
    clock.now += 29
    assert await router.fire_due() == 0
    clock.now += 2
    assert await router.fire_due() == 1
    state = await state_of(router, v.id)
    assert state.channel is ChannelName.SMS and state.fallbacks[0].reason == "deadline"
    assert ("status", "req-1") in tg.calls, "the deadline polls before falling back"
    assert len([c for c in sms.calls if c[0] == "send"]) == 1
    # Telegram's message then expires and is refunded; the settle pass books it.
    tg.handler = telegram_handler(status=DeliveryState.EXPIRED)
    clock.now += 20
    await router.fire_due()
    entries = await router.store.ledger(v.id)
    tg_net = sum(e.amount for e in entries if e.channel == "telegram")
    assert tg_net == 0 and any(e.kind.value == "refund" for e in entries)


async def test_bad_input_sends_and_stores_nothing(build: Any) -> None:
    """A malformed number, a blocked country, a malformed code and an unknown id are typed errors."""
    router, tg, sms = await build()
    router.policy = Policy(countries={"KP": CountryRule(blocked=True)})
    for bad in ["", "12345", "+1 202 555", "not a number", "+999123456789"]:
        with pytest.raises(InvalidPhoneNumber):
            await router.start(bad)
    with pytest.raises(UnsupportedCountry):
        await router.start("+850 2 381 2345")
    assert tg.calls == [] and sms.calls == []
    assert await router.store.next_deadline() is None
    v = await router.start(US)
    for bad_code in ["12a456", "12345", "1234567", "", "١٢٣٤٥٦"]:
        with pytest.raises(InvalidCode):
            await router.check(v.id, bad_code)
    assert (await router.get(v.id)).attempts_left == 5, "malformed codes cost no attempt"
    with pytest.raises(VerificationNotFound):
        await router.get("v_missing")
    assert (await router.check("v_missing", "123456")).status is CheckOutcome.NOT_FOUND


async def test_wrong_codes_then_lockout(build: Any) -> None:
    """Wrong codes count down attempts; after the limit even the right code fails."""
    router, tg, _ = await build(max_attempts=3)
    v = await router.start(US)
    right = tg.calls[1][1].code
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    first = await router.check(v.id, wrong)
    assert first.status is CheckOutcome.INVALID and first.attempts_left == 2
    await router.check(v.id, wrong)
    third = await router.check(v.id, wrong)
    assert third.status is CheckOutcome.TOO_MANY_ATTEMPTS
    assert (await router.check(v.id, right)).status is CheckOutcome.TOO_MANY_ATTEMPTS


async def test_code_expires(build: Any, clock: Clock) -> None:
    """After code_ttl the right code is refused as expired."""
    router, tg, _ = await build(code_ttl=60)
    v = await router.start(US)
    clock.now += 61
    assert (await router.check(v.id, tg.calls[1][1].code)).status is CheckOutcome.EXPIRED
    assert (await router.get(v.id)).status is Status.EXPIRED


async def test_idempotency_key_sends_once(build: Any) -> None:
    """The same idempotency key returns the same verification and sends nothing new."""
    router, tg, _ = await build()
    a = await router.start(US, idempotency_key="login-42")
    b = await router.start(US, idempotency_key="login-42")
    assert a.id == b.id
    assert [m for m, _ in tg.calls] == ["probe", "send"]
    with pytest.raises(IdempotencyConflict):
        await router.start("+12025550199", idempotency_key="login-42")


async def test_rate_limit_per_phone(build: Any) -> None:
    """Past the per-number limit, start raises RateLimited with a retry-after and sends nothing."""
    router, tg, _ = await build(limits=LimitSettings(per_phone=2, per_phone_window=600))
    await router.start(US)
    await router.start(US)
    with pytest.raises(RateLimited) as info:
        await router.start(US)
    assert info.value.scope == "phone" and 0 < info.value.retry_after <= 600
    assert len([c for c in tg.calls if c[0] == "send"]) == 2


async def test_transient_storm_opens_the_circuit(build: Any, registry: CollectorRegistry) -> None:
    """Repeated Telegram 5xx failures open its circuit; later starts skip Telegram at once."""

    async def broken(method: str, arg: Any) -> Any:
        raise ProviderUnavailable("502", provider="telegram")

    router, tg, _ = await build(tg=broken)
    for i in range(5):
        v = await router.start(f"+1202555{i:04d}")
        assert v.channel == "sms"
    assert router.circuits[ChannelName.TELEGRAM] == 1
    calls_before = len(tg.calls)
    v = await router.start("+12025559999")
    assert len(tg.calls) == calls_before, "an open circuit makes no provider call"
    assert v.fallbacks[0].reason == "circuit_open"
    assert registry.get_sample_value("otp_router_circuit_state", {"channel": "telegram"}) == 1


async def test_ambiguous_telegram_send_is_resolved_by_request_id(build: Any) -> None:
    """A send timeout is resolved by re-sending with the same request_id; MESSAGE_ALREADY_SENT means sent."""
    sends = 0

    async def handle(method: str, arg: Any) -> Any:
        nonlocal sends
        if method == "send":
            sends += 1
            if sends == 1:
                raise ProviderTimeout("timed out", provider="telegram")
            raise MessageAlreadySent("dup", provider="telegram", code="MESSAGE_ALREADY_SENT")
        return await telegram_handler()(method, arg)

    router, tg, sms = await build(tg=handle)
    v = await router.start(US)
    assert v.channel == "telegram" and v.fallbacks == ()
    assert {c[1].probe_ref for c in tg.calls if c[0] == "send"} == {"req-1"}
    assert sms.calls == []


async def test_crash_mid_telegram_send_resumes_with_same_request_id(build: Any, clock: Clock) -> None:
    """A process dying during the send is recovered at the lease deadline with the same request_id."""
    store = MemoryStore()

    async def crashing(method: str, arg: Any) -> Any:
        if method == "send":
            raise Crash
        return await telegram_handler()(method, arg)

    first, _, _ = await build(tg=crashing, store=store)
    with pytest.raises(Crash):
        await first.start(US)
    second, tg, sms = await build(store=store)
    clock.now += 61
    assert await second.fire_due() == 1
    sends = [c[1] for c in tg.calls if c[0] == "send"]
    assert [s.probe_ref for s in sends] == ["req-1"]
    assert sms.calls == []


async def test_crash_after_telegram_accepted_keeps_waiting_on_telegram(build: Any, clock: Clock) -> None:
    """The process dies after Telegram accepted the send but before the state write. Recovery re-sends
    with the same request_id, Telegram answers MESSAGE_ALREADY_SENT: the step is sent, no SMS, no
    permanent_error fallback, one fee booked."""
    store = MemoryStore()

    async def accepted_then_crash(method: str, arg: Any) -> Any:
        result = await telegram_handler()(method, arg)
        if method == "send":
            raise Crash  # the message went out; the process died before recording it
        return result

    async def already_sent(method: str, arg: Any) -> Any:
        if method == "send":
            raise MessageAlreadySent("already", provider="telegram", code="MESSAGE_ALREADY_SENT")
        return await telegram_handler()(method, arg)

    first, _, _ = await build(tg=accepted_then_crash, store=store)
    with pytest.raises(Crash):
        await first.start(US)
    second, tg, sms = await build(tg=already_sent, store=store)
    clock.now += 61
    assert await second.fire_due() == 1
    (vid,) = {e.verification_id for e in await store.ledger()}
    state = await state_of(second, vid)
    assert state.status is Status.PENDING and state.fallbacks == ()
    cur = state.current
    assert cur is not None and cur.channel is ChannelName.TELEGRAM and cur.ref == "req-1"
    assert [c[1].probe_ref for c in tg.calls if c[0] == "send"] == ["req-1"]
    assert sms.calls == []
    assert await second.ledger_total(vid) == TG
    # Delivery on Telegram then verifies as usual.
    assert await second.apply_report(
        vid, StatusResult("req-1", DeliveryState.DELIVERED, TG, cost_is_final=True)
    )
    assert (await second.check(vid, code_of(second, state))).valid


async def test_already_sent_without_our_request_id_is_a_refusal(build: Any) -> None:
    """MESSAGE_ALREADY_SENT to a send that carried no id of ours cannot be about our message: fall back."""

    async def handle(method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True)  # reachable but no request_id
        if method == "send":
            raise MessageAlreadySent("already", provider="telegram", code="MESSAGE_ALREADY_SENT")
        return await telegram_handler()(method, arg)

    router, _, sms = await build(tg=handle)
    v = await router.start(US)
    assert v.channel == "sms"
    assert [f.reason for f in v.fallbacks] == ["permanent_error"]
    assert [c[0] for c in sms.calls] == ["send"]


async def test_crash_mid_sms_send_is_not_repeated(build: Any, clock: Clock) -> None:
    """An SMS send interrupted by a crash is never sent again blindly."""
    store = MemoryStore()

    async def crashing(method: str, arg: Any) -> Any:
        if method == "send":
            raise Crash
        return await sms_handler()(method, arg)

    first, _, _ = await build(tg=telegram_handler(reachable=False), sms=crashing, store=store)
    with pytest.raises(Crash):
        await first.start(US)
    second, _, sms = await build(tg=telegram_handler(reachable=False), store=store)
    clock.now += 61
    await second.fire_due()
    assert [c for c in sms.calls if c[0] == "send"] == []


async def test_resend_moves_to_sms_after_cooldown(build: Any, clock: Clock) -> None:
    """A user resend is refused during the cooldown, then moves to SMS."""
    router, _, sms = await build()
    v = await router.start(US)
    with pytest.raises(ResendNotAllowed) as info:
        await router.resend(v.id)
    assert info.value.retry_after == pytest.approx(30)
    clock.now += 31
    again = await router.resend(v.id)
    assert again.channel == "sms" and again.fallbacks[-1].reason == "user_resend"
    assert len([c for c in sms.calls if c[0] == "send"]) == 1


async def test_duplicate_report_is_idempotent(build: Any, registry: CollectorRegistry) -> None:
    """The same delivery report twice changes state once and counts once."""
    router, _, _ = await build()
    v = await router.start(US)
    report = StatusResult("req-1", DeliveryState.DELIVERED, cost=TG, cost_is_final=True)
    assert await router.apply_report(v.id, report) is True
    assert await router.apply_report(v.id, report) is False
    labels = {"channel": "telegram", "status": "delivered"}
    assert registry.get_sample_value("otp_router_deliveries_total", labels) == 1
    assert (await router.get(v.id)).delivered


async def test_cancel_revokes(build: Any) -> None:
    """Cancel ends the verification and revokes the undelivered Telegram message."""
    router, tg, _ = await build()
    v = await router.start(US)
    assert (await router.cancel(v.id)).status is Status.CANCELED
    await router.wait_idle()
    assert ("revoke", "req-1") in tg.calls


class CountingStore(MemoryStore):
    """A memory store that counts reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {"get": 0, "create": 0, "cas": 0}

    async def get(self, record_id: str) -> Any:
        self.counts["get"] += 1
        return await super().get(record_id)

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        self.counts["create"] += 1
        return await super().create(*args, **kwargs)

    async def cas(self, *args: Any, **kwargs: Any) -> Any:
        self.counts["cas"] += 1
        return await super().cas(*args, **kwargs)


async def test_start_writes_ahead_without_rereading(build: Any) -> None:
    """A Telegram start is one create (already probing) and two writes (sending, awaiting), no reads."""
    store = CountingStore()
    router, tg, _ = await build(store=store)
    await router.start(US)
    assert store.counts == {"get": 0, "create": 1, "cas": 2}
    assert [m for m, _ in tg.calls] == ["probe", "send"]


async def test_with_webhooks_the_deadline_does_not_poll(build: Any, clock: Clock) -> None:
    """With a public URL (reports by webhook) the deadline falls back without a status read."""
    router, tg, sms = await build(public_url="https://otp.example.com")
    v = await router.start(US)
    assert tg.calls[1][1].callback_url == "https://otp.example.com/webhooks/telegram"
    clock.now += 31
    assert await router.fire_due() == 1
    assert [m for m, _ in tg.calls] == ["probe", "send"]
    assert (await router.get(v.id)).channel == "sms"
    assert sms.calls[0][1].callback_url == f"https://otp.example.com/webhooks/twilio?vid={v.id}"


async def test_permanent_probe_error_falls_back(build: Any) -> None:
    """A permanent Telegram error on the probe (e.g. no balance) falls back to SMS with its reason."""
    from otp_router.errors import ProviderRejected

    async def broke(method: str, arg: Any) -> Any:
        raise ProviderRejected("no funds", provider="telegram", code="BALANCE_NOT_ENOUGH")

    router, _, _ = await build(tg=broke)
    v = await router.start(US)
    assert v.channel == "sms" and v.fallbacks[0].reason == "permanent_error"
    state = await state_of(router, v.id)
    assert state.attempts[0].reason == "BALANCE_NOT_ENOUGH"
    assert router.circuits[ChannelName.TELEGRAM] == 0, "a permanent answer proves the provider is up"


async def test_refused_connection_on_send_falls_back(build: Any) -> None:
    """A send that certainly did not happen (connection refused after retries) falls back to SMS."""

    async def refused(method: str, arg: Any) -> Any:
        if method == "send":
            raise ProviderUnavailable("refused", provider="telegram", not_performed=True)
        return await telegram_handler()(method, arg)

    router, _, sms = await build(tg=refused)
    v = await router.start(US)
    assert v.channel == "sms" and v.fallbacks[0].reason == "retries_exhausted"
    assert len([c for c in sms.calls if c[0] == "send"]) == 1


async def test_ambiguous_sms_failure_is_not_sent_again(build: Any) -> None:
    """An SMS 5xx may have been sent: no second SMS, no other channel; the verification stays pending."""

    async def flaky(method: str, arg: Any) -> Any:
        if method == "send":
            raise ProviderUnavailable("503", provider="twilio")
        return await sms_handler()(method, arg)

    router, _, sms = await build(tg=telegram_handler(reachable=False), sms=flaky)
    v = await router.start(US)
    assert v.status is Status.PENDING and v.channel == "sms"
    assert len([c for c in sms.calls if c[0] == "send"]) == 1
    state = await state_of(router, v.id)
    assert state.current is not None and state.current.sent_at is not None and state.current.ref is None


async def test_rate_limit_per_country(build: Any) -> None:
    """The per-country limit refuses starts to that region only."""
    router, _, _ = await build(limits=LimitSettings(per_phone=0, per_country=2, per_country_window=60))
    await router.start("+12025550101")
    await router.start("+12025550102")
    with pytest.raises(RateLimited) as info:
        await router.start("+12025550103")
    assert info.value.scope == "country"
    assert (await router.start("+447400123456")).region == "GB"


async def test_idempotency_key_must_be_reasonable(build: Any) -> None:
    """An empty or oversized idempotency key is an input error, before anything is sent."""
    router, tg, _ = await build()
    for key in ["", "k" * 201]:
        with pytest.raises(InputError):
            await router.start(US, idempotency_key=key)
    assert tg.calls == []


async def test_start_says_whether_it_created(build: Any) -> None:
    """The first start with a key is created; its idempotent repeat and later reads are not."""
    router, _, _ = await build()
    first = await router.start(US, idempotency_key="k-1")
    again = await router.start(US, idempotency_key="k-1")
    assert first.created and not again.created
    assert not (await router.get(first.id)).created


async def test_telegram_delivered_after_an_early_fallback_counts_paid_twice_once(
    build: Any, clock: Clock, registry: CollectorRegistry
) -> None:
    """Deadline 5 s below the 30 s ttl: Telegram delivers after the SMS went out, so the user paid twice."""
    router, tg, _ = await build()
    router.policy = Policy(steps=(Step(ChannelName.TELEGRAM, 5.0, probe=True), Step(ChannelName.SMS, 120.0)))
    v = await router.start(US)
    assert tg.calls[1][1].ttl == 30
    clock.now += 6
    assert await router.fire_due() == 1
    state = await state_of(router, v.id)
    assert state.channel is ChannelName.SMS and state.fallbacks[0].reason == "deadline"
    # Still inside its ttl: Telegram may refund it yet, so nobody has paid twice so far.
    assert not (await router.get(v.id)).paid_twice
    assert registry.get_sample_value("otp_router_paid_twice_total", {"country": "US"}) is None
    clock.now += 4
    late = StatusResult("req-1", DeliveryState.DELIVERED, cost=TG, cost_is_final=True)
    assert await router.apply_report(v.id, late) is True
    assert await router.apply_report(v.id, late) is False
    got = await router.get(v.id)
    assert got.paid_twice and got.paid_twice_extra == SMS
    assert got.time_to_code == pytest.approx(10.0)
    assert got.to_dict()["paid_twice_extra"] == str(SMS)
    assert registry.get_sample_value("otp_router_paid_twice_total", {"country": "US"}) == 1
    assert registry.get_sample_value("otp_router_paid_twice_usd_total", {"country": "US"}) == float(SMS)
    ttc = {"channel": "telegram", "country": "US"}
    assert registry.get_sample_value("otp_router_time_to_code_seconds_count", ttc) == 1
    # The late code is the same code: the user who types it is verified.
    assert (await router.check(v.id, code_of(router, state))).valid
    assert registry.get_sample_value("otp_router_paid_twice_total", {"country": "US"}) == 1
    assert await router.ledger_total(v.id) == TG + SMS


async def test_deadline_equal_to_ttl_never_pays_twice(
    build: Any, clock: Clock, registry: CollectorRegistry
) -> None:
    """With the 30 s default, an undelivered Telegram message is refunded before the SMS counts twice."""
    router, tg, _ = await build(tg=telegram_handler(status=DeliveryState.SENT))
    v = await router.start(US)
    clock.now += 31
    assert await router.fire_due() == 1
    tg.handler = telegram_handler(status=DeliveryState.EXPIRED)
    clock.now += 20
    await router.fire_due()
    got = await router.get(v.id)
    assert got.channel == "sms" and not got.paid_twice and got.paid_twice_extra == 0
    assert got.time_to_code is None
    assert registry.get_sample_value("otp_router_paid_twice_total", {"country": "US"}) is None


def flaky_sms(state: dict[str, bool]) -> Handler:
    """An SMS channel whose sends answer 503 while ``state["down"]`` (nothing created)."""
    working = sms_handler()

    async def handle(method: str, arg: Any) -> Any:
        if method == "send" and state["down"]:
            raise ProviderUnavailable("twilio error 503 (HTTP 503)", provider="twilio", not_performed=True)
        return await working(method, arg)

    return handle


def sms_sends_to(twilio: FakeChannel, phone: str) -> int:
    return sum(1 for c in twilio.calls if c[0] == "send" and c[1].phone == phone)


async def test_open_circuit_on_the_last_step_delays_the_login_never_drops_it(
    build: Any, clock: Clock
) -> None:
    """SMS is the only channel left and its circuit is open: the step waits for the cool-down,
    then sends once; the user verifies. Nothing is sent while the circuit is open."""
    sms_state = {"down": True}
    router, _, twilio = await build(
        tg=telegram_handler(reachable=False),
        sms=flaky_sms(sms_state),
        circuit=CircuitSettings(failures=2, cooldown=30),
    )
    for i in range(2):
        with pytest.raises(AllProvidersFailed):  # the SMS was refused: nothing on its way
            await router.start(f"+1202555{i:04d}")
    assert router.circuits[ChannelName.SMS] is CircuitState.OPEN
    sms_state["down"] = False

    v = await router.start(US)
    assert v.status == "pending"
    assert sms_sends_to(twilio, US) == 0, "an open circuit makes no provider call"
    state = await state_of(router, v.id)
    assert state.current is not None and state.current.phase is AttemptPhase.WAITING
    assert [f.to_channel for f in state.fallbacks] == [ChannelName.SMS], "no fall back to nothing"
    assert state.deadline is not None and clock.now < state.deadline <= clock.now + 30

    clock.now += 10
    await router.fire_due()
    assert sms_sends_to(twilio, US) == 0, "still cooling down"
    clock.now += 20
    await router.fire_due()
    assert sms_sends_to(twilio, US) == 1
    assert router.circuits[ChannelName.SMS] is CircuitState.CLOSED
    state = await state_of(router, v.id)
    assert state.current is not None and state.current.phase is AttemptPhase.AWAITING
    result = await router.check(v.id, code_of(router, state))
    assert result.status == "valid"
    clock.now += 60
    await router.fire_due()
    assert sms_sends_to(twilio, US) == 1, "sent exactly once"


async def test_many_logins_waiting_on_one_circuit_each_get_one_sms(build: Any, clock: Clock) -> None:
    """After the cool-down one trial goes first; the others wait for its outcome and then send, once each."""
    sms_state = {"down": True}
    router, _, twilio = await build(
        tg=telegram_handler(reachable=False),
        sms=flaky_sms(sms_state),
        circuit=CircuitSettings(failures=1, cooldown=30),
    )
    with pytest.raises(AllProvidersFailed):
        await router.start("+12025550999")
    sms_state["down"] = False
    phones = [f"+1202555{i:04d}" for i in range(10, 16)]
    ids = [(await router.start(p)).id for p in phones]
    assert all(sms_sends_to(twilio, p) == 0 for p in phones)
    for _ in range(5):
        clock.now += 30
        await router.fire_due()
    assert [sms_sends_to(twilio, p) for p in phones] == [1] * len(phones)
    for vid in ids:
        state = await state_of(router, vid)
        assert (await router.check(vid, code_of(router, state))).status == "valid"


async def test_circuit_wait_is_bounded_by_max_wait_and_the_code_expiry(build: Any, clock: Clock) -> None:
    """With ``max_wait`` 0, or a cool-down that outlasts the code, the step ends as before (circuit_open)."""
    for settings in (
        {"circuit": CircuitSettings(failures=1, cooldown=30, max_wait=0)},
        {"circuit": CircuitSettings(failures=1, cooldown=120), "code_ttl": 60},
    ):
        router, _, twilio = await build(
            tg=telegram_handler(reachable=False), sms=flaky_sms({"down": True}), **settings
        )
        with pytest.raises(AllProvidersFailed):
            await router.start("+12025550999")
        with pytest.raises(AllProvidersFailed) as failed:
            await router.start(US)
        v = failed.value.verification
        assert v is not None and v.status == "failed", settings
        assert v.fallbacks[-1].reason == "circuit_open" and v.fallbacks[-1].to_channel is None
        assert sms_sends_to(twilio, US) == 0


async def test_rate_limits_do_not_open_the_circuit(build: Any) -> None:
    """A 429 is an answer about our pace or one number, not a provider outage: the circuit stays closed."""

    async def limited(method: str, arg: Any) -> Any:
        if method == "send":
            raise ProviderRateLimited("twilio error 20429 (HTTP 429)", provider="twilio", code="20429")
        return await sms_handler()(method, arg)

    router, _, twilio = await build(
        tg=telegram_handler(reachable=False), sms=limited, circuit=CircuitSettings(failures=2, cooldown=30)
    )
    for i in range(6):
        with pytest.raises(AllProvidersFailed) as failed:
            await router.start(f"+1202555{i:04d}")
        assert failed.value.causes["sms"] == "rate_limited"
    assert router.circuits[ChannelName.SMS] is CircuitState.CLOSED
    assert sum(1 for c in twilio.calls if c[0] == "send") == 6, "every start still asked the provider"
