"""The pure lifecycle core: examples for each path, then properties over random event sequences."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from otp_router.core import (
    AttemptPhase,
    Cancel,
    Checked,
    CheckOutcome,
    CodeDelivered,
    CodeEntered,
    DeadlineReached,
    Delivery,
    Effect,
    Event,
    FallbackReason,
    FellBack,
    Finished,
    LatencyObserved,
    Probe,
    ProbeDone,
    ProbeFailed,
    Resend,
    ResendRefused,
    Revoke,
    Send,
    SendFailed,
    SendOk,
    Settle,
    Start,
    Status,
    Transition,
    VerificationState,
)
from otp_router.lifecycle import apply, new_state
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName, DeliveryState
from otp_router.store.base import LedgerKind

TG_COST = Decimal("0.01")
SMS_COST = Decimal("0.0083")


def fresh(steps: tuple[Step, ...] | None = None, *, max_attempts: int = 5) -> VerificationState:
    return new_state(
        verification_id="v1",
        phone="+15555550100",
        region="US",
        code_digest="digest",
        steps=steps or Policy().steps,
        now=0.0,
        code_ttl=600.0,
        max_attempts=max_attempts,
    )


def run(state: VerificationState, *events: tuple[Event, float]) -> list[Transition]:
    out = []
    for event, now in events:
        t = apply(state, event, now)
        out.append(t)
        state = t.state
    return out


def kinds(effects: tuple[Effect, ...]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_start_probes_telegram_first() -> None:
    """Starting a verification probes Telegram and sets an I/O lease deadline."""
    t = apply(fresh(), Start(), 0.0)
    assert t.effects == (Probe(0, ChannelName.TELEGRAM),)
    assert t.state.current is not None and t.state.current.phase is AttemptPhase.PROBING
    assert t.state.deadline == 60.0


def test_telegram_delivered_then_valid_code() -> None:
    """The happy path: probe, send, delivered, valid code; cost booked once."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (Delivery("r1", DeliveryState.DELIVERED, TG_COST, cost_final=True), 3),
        (CodeEntered(True), 10),
    )
    assert kinds(ts[1].effects) == ["Send"]
    assert [e.amount for t in ts for e in t.ledger] == [TG_COST]
    assert ts[3].state.current is not None and ts[3].state.current.phase is AttemptPhase.DELIVERED
    final = ts[-1]
    assert final.state.status is Status.VERIFIED
    assert Checked(CheckOutcome.VALID, 5) in final.effects
    assert final.state.deadline is None
    assert final.state.total_cost == TG_COST


def test_not_on_telegram_falls_back_to_sms_at_once() -> None:
    """A refused ability check moves to SMS with reason ability_refused, charging nothing."""
    ts = run(fresh(), (Start(), 0), (ProbeDone(0, False, reason="PHONE_NUMBER_NOT_FOUND"), 1))
    effects = ts[-1].effects
    assert FellBack(ChannelName.TELEGRAM, ChannelName.SMS, FallbackReason.ABILITY_REFUSED) in effects
    sends = [e for e in effects if isinstance(e, Send)]
    assert sends and sends[0].channel is ChannelName.SMS
    assert ts[-1].ledger == ()


def test_deadline_falls_back_and_late_refund_is_booked() -> None:
    """No delivery by the step deadline → SMS; Telegram's later refund books a negative entry."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (DeadlineReached(), 31),  # too early: deliver_within=30 counts from sent_at=2
        (DeadlineReached(), 32),
        (SendOk(1, "SM1", SMS_COST, estimate=True), 33),
        (Delivery("r1", DeliveryState.EXPIRED, TG_COST, refunded=True), 34),
        (Delivery("SM1", DeliveryState.DELIVERED, SMS_COST, cost_final=True), 35),
    )
    assert not ts[3].changed
    assert FellBack(ChannelName.TELEGRAM, ChannelName.SMS, FallbackReason.DEADLINE) in ts[4].effects
    assert not any(isinstance(e, Revoke) for t in ts for e in t.effects), "revoking would forfeit the refund"
    ledger = [e for t in ts for e in t.ledger]
    assert [(e.channel, e.kind, e.amount) for e in ledger] == [
        ("telegram", LedgerKind.CHARGE, TG_COST),
        ("sms", LedgerKind.ESTIMATE, SMS_COST),
        ("telegram", LedgerKind.REFUND, -TG_COST),
    ]
    assert ts[-1].state.total_cost == SMS_COST
    assert len({e.key for e in ledger}) == len(ledger)


def test_unsettled_cost_is_fetched_after_the_end() -> None:
    """A finished verification with an attempt whose cost may change wakes up to settle it, then stops."""
    s = run(
        fresh((Step(ChannelName.SMS, 60),)),
        (Start(), 0),
        (SendOk(0, "SM1", SMS_COST, estimate=True), 1),
        (CodeEntered(True), 5),
    )[-1].state
    assert s.status is Status.VERIFIED and s.deadline == s.settle_at == 20.0
    t = apply(s, DeadlineReached(), 20.0)
    assert Settle(0, ChannelName.SMS, "SM1") in t.effects
    done = apply(t.state, Delivery("SM1", DeliveryState.DELIVERED, Decimal("0.0079"), cost_final=True), 21)
    assert done.state.deadline is None and done.state.total_cost == Decimal("0.0079")


def test_sms_price_replaces_estimate() -> None:
    """The final Twilio price replaces the estimate with one correcting entry."""
    ts = run(
        fresh((Step(ChannelName.SMS, 60),)),
        (Start(), 0),
        (SendOk(0, "SM1", Decimal("0.0100"), estimate=True), 1),
        (Delivery("SM1", DeliveryState.DELIVERED, Decimal("0.0079"), cost_final=True), 2),
        (Delivery("SM1", DeliveryState.DELIVERED, Decimal("0.0079"), cost_final=True), 3),
    )
    amounts = [e.amount for t in ts for e in t.ledger]
    assert amounts == [Decimal("0.0100"), Decimal("-0.0021")]
    assert ts[-1].state.total_cost == Decimal("0.0079")
    assert not ts[-1].changed


def test_expired_report_falls_back_with_reason() -> None:
    """An `expired` report before the deadline falls back with reason expired."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (Delivery("r1", DeliveryState.EXPIRED, TG_COST, refunded=True), 5),
    )
    assert FellBack(ChannelName.TELEGRAM, ChannelName.SMS, FallbackReason.EXPIRED) in ts[-1].effects


def test_wrong_then_right_code_and_attempt_limit() -> None:
    """Wrong codes count down; the right one verifies; the limit locks the verification."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    t = apply(s, CodeEntered(False), 3)
    assert Checked(CheckOutcome.INVALID, 4) in t.effects
    t2 = apply(t.state, CodeEntered(True), 4)
    assert t2.state.status is Status.VERIFIED
    locked = s
    for _ in range(5):
        last = apply(locked, CodeEntered(False), 5)
        locked = last.state
    assert locked.status is Status.TOO_MANY_ATTEMPTS
    assert Checked(CheckOutcome.TOO_MANY_ATTEMPTS, 0) in last.effects
    assert Checked(CheckOutcome.TOO_MANY_ATTEMPTS, 0) in apply(locked, CodeEntered(True), 6).effects


def test_code_is_single_use_and_expires() -> None:
    """After verification a code is no longer valid; after expiry, neither."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    verified = apply(s, CodeEntered(True), 3).state
    assert Checked(CheckOutcome.EXPIRED, 5) in apply(verified, CodeEntered(True), 4).effects
    late = apply(s, CodeEntered(True), 601)
    assert late.state.status is Status.EXPIRED
    assert Checked(CheckOutcome.EXPIRED, 5) in late.effects


def test_interrupted_telegram_send_resumes_with_same_request_id() -> None:
    """A send interrupted by a crash is re-issued with the probe's request_id (never a new message)."""
    ts = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1", TG_COST), 1), (DeadlineReached(), 61))
    sends = [e for e in ts[-1].effects if isinstance(e, Send)]
    assert sends == [Send(0, ChannelName.TELEGRAM, 30, "r1", 1, resume=True)]


def test_resumed_send_that_already_went_out_awaits_telegram_delivery() -> None:
    """Recovery after a crash once Telegram accepted: the resumed send is answered "already sent"
    (SendOk with the probe's id), the step waits for Telegram, nothing falls back, nothing is booked twice."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (DeadlineReached(), 61),
        (SendOk(0, "r1", None), 62),
    )
    final = ts[-1].state
    cur = final.current
    assert cur is not None and cur.channel is ChannelName.TELEGRAM
    assert cur.phase is AttemptPhase.AWAITING and cur.ref == "r1"
    assert final.fallbacks == () and not any(isinstance(e, Send) for e in ts[-1].effects)
    assert [e.amount for t in ts for e in t.ledger] == [TG_COST]
    delivered = apply(final, Delivery("r1", DeliveryState.DELIVERED, TG_COST, cost_final=True), 63)
    assert delivered.state.current is not None and delivered.state.current.phase is AttemptPhase.DELIVERED
    assert delivered.ledger == ()


def test_probe_lost_in_a_crash_is_booked_when_the_repeat_says_reachable() -> None:
    """The process died during the probe: its answer and request_id are lost. The repeated probe says
    reachable, so the lost one was charged in advance too: booked as an estimate at the same fee."""
    s = run(fresh(), (Start(), 0), (DeadlineReached(), 61))[-1].state
    assert [e for e in apply(s, Start(), 61).effects] == []
    t = apply(s, ProbeDone(0, True, "r2", TG_COST), 62)
    assert [(e.kind, e.amount) for e in t.ledger] == [
        (LedgerKind.CHARGE, TG_COST),
        (LedgerKind.ESTIMATE, TG_COST),
    ]
    assert t.state.current is not None and t.state.current.probe_ref == "r2"
    # An unreachable number is never charged, for the lost probe either.
    refused = apply(s, ProbeDone(0, False, reason="PHONE_NUMBER_NOT_FOUND"), 62)
    assert refused.ledger == ()


def test_probe_answer_after_a_re_probe_is_booked_and_not_used() -> None:
    """A probe that outlived its lease was re-probed; both answers arrive. Telegram charged both in
    advance: the first answer drives the step and books both fees; the second is not booked again."""
    s = run(fresh(), (Start(), 0), (DeadlineReached(), 61))[-1].state
    first = apply(s, ProbeDone(0, True, "r1", TG_COST), 62)
    assert [e for e in first.effects if isinstance(e, Send)] == [Send(0, ChannelName.TELEGRAM, 30, "r1", 1)]
    assert sum(e.amount for e in first.ledger) == 2 * TG_COST
    second = apply(first.state, ProbeDone(0, True, "r2", TG_COST), 63)
    assert second.ledger == ()
    assert not any(isinstance(e, Send) for e in second.effects)
    cur = second.state.current
    assert cur is not None and cur.probe_ref == "r1" and cur.abandoned_probes == ("r2",)
    assert cur.cost == 2 * TG_COST
    assert not apply(second.state, ProbeDone(0, True, "r2", TG_COST), 64).changed
    # The message is refunded (not delivered within ttl); the abandoned probe's fee is not.
    sent = apply(second.state, SendOk(0, "r1", TG_COST), 64).state
    assert sent.current is not None and sent.current.cost == 2 * TG_COST
    refunded = apply(sent, Delivery("r1", DeliveryState.EXPIRED, TG_COST, refunded=True), 100)
    assert [e.amount for e in refunded.ledger] == [-TG_COST]
    assert refunded.state.attempts[0].cost == TG_COST


def test_probe_answer_after_the_step_was_left_is_still_booked() -> None:
    """A charged probe answer arriving after the verification moved to SMS is booked on its step."""
    s = run(fresh(), (Start(), 0), (DeadlineReached(), 61))[-1].state
    s = apply(s, ProbeFailed(0, FallbackReason.RETRIES_EXHAUSTED), 62).state
    late = apply(s, ProbeDone(0, True, "r9", TG_COST), 63)
    assert [e.amount for e in late.ledger] == [TG_COST]
    assert late.state.attempts[0].abandoned_probes == ("r9",)
    assert late.state.current is not None and late.state.current.channel is ChannelName.SMS


def test_interrupted_sms_send_is_not_repeated() -> None:
    """An SMS send interrupted by a crash is assumed sent, never repeated blindly."""
    ts = run(fresh((Step(ChannelName.SMS, 60),)), (Start(), 0), (DeadlineReached(), 60))
    assert not any(isinstance(e, Send) for e in ts[-1].effects)
    cur = ts[-1].state.current
    assert cur is not None and cur.phase is AttemptPhase.AWAITING and cur.reason == "send_unconfirmed"


def test_all_channels_failing_fails_the_verification() -> None:
    """Permanent errors on every step end in status failed with each reason recorded."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeFailed(0, FallbackReason.CIRCUIT_OPEN), 1),
        (SendFailed(1, FallbackReason.PERMANENT_ERROR, "21211"), 2),
    )
    final = ts[-1].state
    assert final.status is Status.FAILED
    assert [f.reason for f in final.fallbacks] == [
        FallbackReason.CIRCUIT_OPEN,
        FallbackReason.PERMANENT_ERROR,
    ]


def test_late_telegram_code_verifies_after_sms_step_began() -> None:
    """Telegram delivering after the fallback to SMS: the same code verifies."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (DeadlineReached(), 32),
        (SendOk(1, "SM1", SMS_COST, estimate=True), 33),
        (Delivery("r1", DeliveryState.DELIVERED, TG_COST, cost_final=True), 40),
        (CodeEntered(True), 45),
    )
    assert ts[-1].state.status is Status.VERIFIED
    assert Checked(CheckOutcome.VALID, 5) in ts[-1].effects
    assert ts[-1].state.total_cost == TG_COST + SMS_COST  # the paid-twice case


def test_late_code_verifies_after_the_last_step_failed() -> None:
    """Every step failed but Telegram's message may still arrive: it stays checkable, and verifies."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (DeadlineReached(), 32),  # fall back to SMS
        (SendOk(1, "SM1", SMS_COST, estimate=True), 33),
        (Delivery("SM1", DeliveryState.UNDELIVERED), 40),  # the last step fails
        (Delivery("r1", DeliveryState.DELIVERED, TG_COST), 50),  # Telegram delivers late
    )
    waiting = ts[-2].state
    assert waiting.status is Status.PENDING and waiting.current is None
    # Nothing to do but ask providers how the sent messages fared, until the code expires.
    assert waiting.deadline == waiting.settle_at == 47.0
    settle = apply(waiting, DeadlineReached(), 47.0)
    assert Settle(0, ChannelName.TELEGRAM, "r1") in settle.effects
    assert settle.state.status is Status.PENDING and not any(isinstance(e, Send) for e in settle.effects)
    refused = apply(waiting, Resend(), 100)
    assert ResendRefused("every channel failed", None) in refused.effects
    wrong = apply(ts[-1].state, CodeEntered(False), 55)
    assert Checked(CheckOutcome.INVALID, 4) in wrong.effects
    right = apply(wrong.state, CodeEntered(True), 56)
    assert right.state.status is Status.VERIFIED and Checked(CheckOutcome.VALID, 4) in right.effects
    assert Checked(CheckOutcome.EXPIRED, 4) in apply(right.state, CodeEntered(True), 57).effects
    expired = apply(waiting, DeadlineReached(), 600)
    assert expired.state.status is Status.EXPIRED


def test_failed_once_no_sent_message_can_arrive() -> None:
    """Out of steps, the verification fails when the last message that could arrive is reported failed."""
    s = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (DeadlineReached(), 32),
        (SendOk(1, "SM1", SMS_COST, estimate=True), 33),
        (Delivery("SM1", DeliveryState.UNDELIVERED), 40),
    )[-1].state
    t = apply(s, Delivery("r1", DeliveryState.EXPIRED, TG_COST, refunded=True), 33)
    assert t.state.status is Status.FAILED and Finished(Status.FAILED) in t.effects
    assert Checked(CheckOutcome.EXPIRED, 5) in apply(t.state, CodeEntered(True), 34).effects


def test_resend_respects_cooldown_and_moves_on() -> None:
    """A resend is refused during the cooldown, then moves to the next step."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    early = apply(s, Resend(), 10)
    assert not early.changed and isinstance(early.effects[0], ResendRefused)
    assert early.effects[0].retry_after == 22
    later = apply(s, Resend(), 40)
    assert FellBack(ChannelName.TELEGRAM, ChannelName.SMS, FallbackReason.USER_RESEND) in later.effects


def test_cancel_revokes_undelivered_telegram() -> None:
    """Cancel ends the verification and revokes an undelivered Telegram message."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    t = apply(s, Cancel(), 3)
    assert t.state.status is Status.CANCELED
    assert Revoke(0, ChannelName.TELEGRAM, "r1") in t.effects


def test_duplicate_report_is_a_no_op() -> None:
    """The same delivery report twice changes nothing the second time."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    once = apply(s, Delivery("r1", DeliveryState.DELIVERED), 3)
    twice = apply(once.state, Delivery("r1", DeliveryState.DELIVERED), 4)
    assert once.changed and not twice.changed and twice.effects == ()


def test_state_round_trips_through_json() -> None:
    """The stored JSON form loads back to an equal state, Decimals exact."""
    s = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1", TG_COST), 1))[-1].state
    again = VerificationState.model_validate_json(s.model_dump_json())
    assert again == s and again.total_cost == TG_COST


# --- properties -----------------------------------------------------------

refs = st.sampled_from(["r0", "r1", "SM0", "SM1", "nope"])
costs = st.sampled_from([None, Decimal("0.01"), Decimal("0.0083"), Decimal("0.05")])


class Lifecycle(RuleBasedStateMachine):
    """Random event sequences against one verification."""

    def __init__(self) -> None:
        super().__init__()
        self.state = fresh(max_attempts=3)
        self.now = 0.0
        self.digest = self.state.code_digest
        self.sends: Counter[int] = Counter()
        self.booked: Counter[int] = Counter()
        self.booked_amount: dict[int, Decimal] = {}
        self.keys: set[str] = set()
        self.fallbacks = 0
        t = apply(self.state, Start(), self.now)
        self.absorb(t)

    def absorb(self, t: Transition) -> None:
        before = self.state
        for effect in t.effects:
            if isinstance(effect, Send | Probe):
                assert not before.status.is_final, "no send or probe after a final status"
            if isinstance(effect, Send):
                if effect.resume:
                    assert effect.channel is ChannelName.TELEGRAM and effect.probe_ref
                else:
                    self.sends[effect.step] += 1
            if isinstance(effect, FellBack):
                assert effect.reason in FallbackReason
                self.fallbacks += 1
        for entry in t.ledger:
            assert entry.key not in self.keys, "ledger keys are unique"
            self.keys.add(entry.key)
            step = int(entry.key.rsplit("/", 2)[1])
            self.booked_amount[step] = self.booked_amount.get(step, Decimal(0)) + entry.amount
        if before.status.is_final:
            assert t.state.status is before.status, "a final status never changes"
        self.state = t.state

    def feed(self, event: Event, dt: float) -> None:
        self.now += dt
        self.absorb(apply(self.state, event, self.now))

    @rule(dt=st.floats(0, 40), reachable=st.booleans(), ref=refs, cost=costs)
    def probe_done(self, dt: float, reachable: bool, ref: str, cost: Decimal | None) -> None:
        self.feed(ProbeDone(self.state.step, reachable, ref, cost if reachable else None), dt)

    @rule(dt=st.floats(0, 40), reason=st.sampled_from(list(FallbackReason)))
    def probe_failed(self, dt: float, reason: FallbackReason) -> None:
        self.feed(ProbeFailed(self.state.step, reason), dt)

    @rule(dt=st.floats(0, 40), ref=refs, cost=costs, estimate=st.booleans())
    def send_ok(self, dt: float, ref: str, cost: Decimal | None, estimate: bool) -> None:
        before = self.state.current
        self.feed(SendOk(self.state.step, ref, cost, estimate), dt)
        if before is not None and before.phase is AttemptPhase.SENDING and cost:
            # Every charged send is booked: the attempt carries at least that cost (plus the fees of
            # probes it abandoned), in the ledger too.
            after = next(a for a in self.state.attempts if a.step == before.step)
            assert after.cost == max(before.cost, before.abandoned_cost + cost)
            assert self.booked_amount[before.step] == after.cost

    @rule(dt=st.floats(0, 40), reason=st.sampled_from(list(FallbackReason)))
    def send_failed(self, dt: float, reason: FallbackReason) -> None:
        self.feed(SendFailed(self.state.step, reason), dt)

    @rule(
        dt=st.floats(0, 40),
        ref=refs,
        state=st.sampled_from(list(DeliveryState)),
        cost=costs,
        refunded=st.booleans(),
        final=st.booleans(),
    )
    def delivery(
        self, dt: float, ref: str, state: DeliveryState, cost: Decimal | None, refunded: bool, final: bool
    ) -> None:
        self.feed(Delivery(ref, state, cost, refunded, final), dt)

    @rule(dt=st.floats(0, 200))
    def deadline(self, dt: float) -> None:
        self.feed(DeadlineReached(), dt)

    @rule(dt=st.floats(0, 40), matches=st.booleans())
    def code(self, dt: float, matches: bool) -> None:
        self.feed(CodeEntered(matches), dt)

    @rule(dt=st.floats(0, 5))
    def cancel(self, dt: float) -> None:
        self.feed(Cancel(), dt)

    @rule(dt=st.floats(0, 60))
    def resend(self, dt: float) -> None:
        self.feed(Resend(), dt)

    @invariant()
    def at_most_one_send_per_step(self) -> None:
        assert all(n <= 1 for n in self.sends.values())

    @invariant()
    def code_never_changes(self) -> None:
        assert self.state.code_digest == self.digest

    @invariant()
    def ledger_matches_attempt_costs(self) -> None:
        for attempt in self.state.attempts:
            assert self.booked_amount.get(attempt.step, Decimal(0)) == attempt.cost

    @invariant()
    def failed_only_when_no_code_can_arrive(self) -> None:
        if self.state.status is Status.FAILED:
            assert all(
                a.sent_at is None or (a.delivery is not None and a.delivery.is_failed)
                for a in self.state.attempts
            ), "a verification whose code may still arrive must stay checkable"

    @invariant()
    def every_fallback_has_a_reason(self) -> None:
        assert len(self.state.fallbacks) == self.fallbacks
        assert all(f.reason in FallbackReason for f in self.state.fallbacks)

    @invariant()
    def deadline_only_while_work_is_left(self) -> None:
        if self.state.status.is_final:
            # A finished verification wakes up only to settle costs, or to look up an
            # ambiguous send whose charge is not booked yet.
            lookups = [a.lookup_at for a in self.state.attempts if a.ref is None and a.lookup_at is not None]
            wake = [t for t in (self.state.settle_at, *lookups) if t is not None]
            assert self.state.deadline == min(wake, default=None)
            assert (self.state.settle_at is not None) == (
                bool(self.state.unsettled()) and self.state.settle_tries < 5
            )
        else:
            assert self.state.deadline is not None and self.state.deadline <= self.state.expires_at


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = hsettings(max_examples=300, stateful_step_count=30, deadline=None)


def test_state_repr_hides_phone_and_code_material() -> None:
    """A state's repr (logs, tracebacks) shows neither the number nor the digest or nonce."""
    s = fresh().model_copy(update={"code_nonce": "nonce-value"})
    text = repr(s) + str(s)
    assert "+15555550100" not in text and "digest" not in text and "nonce-value" not in text


@pytest.mark.parametrize(
    ("provider_time", "now", "delivered_at"),
    [
        (None, 9.0, 9.0),  # no provider time: ours
        (8.0, 8.6, 8.6),  # a prompt report: our finer clock beats whole seconds
        (5.0, 40.0, 5.5),  # a late poll: the middle of the provider's second
        (1.0, 40.0, 2.0),  # never before the send was accepted
    ],
)
def test_delivery_time_and_latency(provider_time: float | None, now: float, delivered_at: float) -> None:
    """A delivery is dated by the provider's time only when reported clearly later; its latency is kept."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (Delivery("r1", DeliveryState.DELIVERED, at=provider_time), now),
    )
    last = ts[-1]
    assert last.state.attempts[0].delivered_at == delivered_at
    assert CodeDelivered(ChannelName.TELEGRAM, delivered_at) in last.effects
    assert LatencyObserved(ChannelName.TELEGRAM, delivered_at - 2, delivered_at) in last.effects


def test_only_the_first_outcome_of_a_message_is_observed() -> None:
    """Expired is observed as never delivered, once; a revoked message or a repeated report adds nothing."""
    ts = run(
        fresh(),
        (Start(), 0),
        (ProbeDone(0, True, "r1", TG_COST), 1),
        (SendOk(0, "r1", TG_COST), 2),
        (Delivery("r1", DeliveryState.EXPIRED), 33),
        (Delivery("r1", DeliveryState.EXPIRED), 34),
    )
    assert [e for e in ts[3].effects if isinstance(e, LatencyObserved)] == [
        LatencyObserved(ChannelName.TELEGRAM, None, 33)
    ]
    assert not any(isinstance(e, LatencyObserved) for e in ts[4].effects)
    revoked = run(fresh(), (Start(), 0), (ProbeDone(0, True, "r1"), 1), (SendOk(0, "r1"), 2))[-1].state
    t = apply(revoked, Delivery("r1", DeliveryState.REVOKED), 5)
    assert not any(isinstance(e, LatencyObserved) for e in t.effects)
