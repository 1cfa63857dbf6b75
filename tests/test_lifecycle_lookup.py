"""The pure lifecycle core resolving an ambiguous SMS send with message lookups."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from otp_router.core import (
    AttemptPhase,
    DeadlineReached,
    Event,
    FallbackReason,
    FellBack,
    Lookup,
    LookupDone,
    Resend,
    Send,
    SendUnconfirmed,
    Start,
    Status,
    Transition,
    VerificationState,
)
from otp_router.lifecycle import apply, new_state
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName, DeliveryState
from otp_router.store.base import LedgerKind
from tests.test_lifecycle import Lifecycle, costs, refs

SMS_ONLY = (Step(ChannelName.SMS, 120),)
SMS_THEN_TG = (Step(ChannelName.SMS, 120), Step(ChannelName.TELEGRAM, 30, probe=True))
DELAYS = (2.0, 10.0, 30.0)
GRACE = 30.0


def fresh(steps: tuple[Step, ...] = SMS_ONLY, delays: tuple[float, ...] = DELAYS) -> VerificationState:
    return new_state(
        verification_id="v1",
        phone="+15555550100",
        region="US",
        code_digest="digest",
        steps=steps,
        now=0.0,
        code_ttl=600.0,
        max_attempts=5,
        lookup_delays=delays,
        lookup_grace=GRACE,
    )


def run(state: VerificationState, *events: tuple[Event, float]) -> list[Transition]:
    out = []
    for event, now in events:
        t = apply(state, event, now)
        out.append(t)
        state = t.state
    return out


def ambiguous(steps: tuple[Step, ...] = SMS_ONLY) -> VerificationState:
    """An SMS send that began at 0 and answered 5xx at 1."""
    return run(fresh(steps), (Start(), 0), (SendUnconfirmed(0), 1))[-1].state


def test_unconfirmed_send_waits_as_sent_and_plans_the_first_lookup() -> None:
    """An ambiguous send is treated as sent (no second message) with a lookup due 2 s after it began."""
    t = apply(run(fresh(), (Start(), 0))[-1].state, SendUnconfirmed(0), 1)
    cur = t.state.current
    assert cur is not None and cur.phase is AttemptPhase.AWAITING and cur.ref is None
    assert cur.reason == "send_unconfirmed" and cur.sent_at == 1
    assert cur.lookup_at == 2.0 and t.state.deadline == 2.0
    assert t.effects == ()


def test_due_lookup_is_emitted_with_the_send_start() -> None:
    """At the lookup deadline the core emits Lookup(since=send start) and holds a lease, never a Send."""
    t = apply(ambiguous(), DeadlineReached(), 2)
    assert t.effects == (Lookup(0, ChannelName.SMS, 0.0),)
    cur = t.state.current
    assert cur is not None and cur.lookups == 1 and cur.lookup_at == 62.0
    assert cur.phase is AttemptPhase.AWAITING


def test_found_message_gets_its_reference_and_cost() -> None:
    """A found message becomes an ordinary sent attempt: its SID is the ref and its price is booked."""
    ts = run(
        ambiguous(),
        (DeadlineReached(), 2),
        (LookupDone(0, "SM1", True, DeliveryState.DELIVERED, Decimal("0.0079"), True), 3),
    )
    t = ts[-1]
    cur = t.state.current
    assert cur is not None and cur.ref == "SM1" and cur.lookup_at is None and cur.reason is None
    assert cur.phase is AttemptPhase.DELIVERED and cur.cost == Decimal("0.0079") and cur.cost_final
    assert [(e.kind, e.amount) for e in t.ledger] == [(LedgerKind.CHARGE, Decimal("0.0079"))]
    assert t.state.deadline == t.state.expires_at  # delivered: nothing left but the code's expiry


def test_absent_before_the_grace_looks_again() -> None:
    """An empty listing before the grace period proves nothing (list lag): the next lookup is planned."""
    ts = run(ambiguous(), (DeadlineReached(), 2), (LookupDone(0, None, True), 3))
    cur = ts[-1].state.current
    assert cur is not None and cur.phase is AttemptPhase.AWAITING and cur.lookup_at == 10.0
    assert not any(isinstance(e, Send) for e in ts[-1].effects)


def test_absent_after_the_grace_repeats_the_last_step_once() -> None:
    """Provably never created: the SMS step is repeated (one new send), the lost attempt costs nothing."""
    state = ambiguous()
    for at in (2, 10, 30):
        state = run(state, (DeadlineReached(), at), (LookupDone(0, None, True), at + 0.5))[-1].state
    assert state.status is Status.PENDING
    assert [a.phase for a in state.attempts] == [AttemptPhase.FAILED, AttemptPhase.SENDING]
    assert state.attempts[0].sent_at is None and state.attempts[0].reason == "not_created"
    assert state.fallbacks[-1].reason is FallbackReason.NOT_CREATED
    assert state.total_cost == 0 and not state.unsettled()


def test_resend_after_proof_is_one_send_effect() -> None:
    """The proof of loss produces exactly one Send, on the same channel, as a new step."""
    state = run(ambiguous(), (DeadlineReached(), 30))[-1].state
    t = apply(state, LookupDone(0, None, True), 31)
    assert [e for e in t.effects if isinstance(e, Send)] == [Send(1, ChannelName.SMS, 120, None, 1)]
    assert FellBack(ChannelName.SMS, ChannelName.SMS, FallbackReason.NOT_CREATED) in t.effects


def test_second_proof_of_loss_fails_the_verification() -> None:
    """The same-channel repeat happens once; a second lost send ends the verification as failed."""
    state = run(ambiguous(), (DeadlineReached(), 30), (LookupDone(0, None, True), 31))[-1].state
    state = run(state, (SendUnconfirmed(1), 32), (DeadlineReached(), 61))[-1].state
    t = apply(state, LookupDone(1, None, True), 62)
    assert t.state.status is Status.FAILED
    assert not any(isinstance(e, Send) for e in t.effects)


def test_absent_with_a_next_step_falls_back_to_it() -> None:
    """With a later step in the policy, a proven loss moves on to it instead of repeating SMS."""
    state = run(ambiguous(SMS_THEN_TG), (DeadlineReached(), 30))[-1].state
    t = apply(state, LookupDone(0, None, True), 31)
    assert t.state.current is not None and t.state.current.channel is ChannelName.TELEGRAM
    assert len(t.state.steps) == 2


def test_unknown_after_every_lookup_stays_as_sent() -> None:
    """Lookups that keep failing leave the attempt waiting (no second code), reason send_unknown."""
    state = ambiguous()
    for at in (2, 10, 30):
        state = run(state, (DeadlineReached(), at), (LookupDone(0, None, False), at + 0.5))[-1].state
    cur = state.current
    assert cur is not None and cur.phase is AttemptPhase.AWAITING and cur.ref is None
    assert cur.reason == "send_unknown" and cur.lookup_at is None and cur.lookups == 3
    assert state.deadline == 121 and len(state.attempts) == 1
    later = apply(state, DeadlineReached(), 121).state.current
    assert later is not None and later.phase is AttemptPhase.TIMED_OUT  # as any unanswered last step


def test_user_can_resend_while_unknown() -> None:
    """The user may ask for a resend after the cooldown even while the outcome is unknown."""
    state = run(ambiguous(), (DeadlineReached(), 2), (LookupDone(0, None, False), 3))[-1].state
    t = apply(state, Resend(), 40)
    assert t.state.fallbacks[-1].reason is FallbackReason.USER_RESEND
    assert any(isinstance(e, Send) for e in t.effects)


def test_lost_lookup_answer_is_retried_then_abandoned() -> None:
    """A lookup whose answer never comes (crash) is repeated at the lease, within the planned count."""
    state = ambiguous((Step(ChannelName.SMS, 500),))
    emitted = 0
    at = 2.0
    for _ in range(6):
        t = apply(state, DeadlineReached(), at)
        emitted += sum(isinstance(e, Lookup) for e in t.effects)
        state = t.state
        at = state.deadline if state.deadline is not None else at
    assert emitted == len(DELAYS)
    cur = state.current
    assert cur is not None and cur.reason == "send_unknown" and cur.lookup_at is None


def test_late_found_answer_after_resend_books_the_charge() -> None:
    """A message found after the user moved on still gets its ref, so its price is settled later."""
    state = run(ambiguous(), (DeadlineReached(), 2))[-1].state
    state = apply(state, Resend(), 40).state
    t = apply(state, LookupDone(0, "SM1", True, DeliveryState.SENT), 41)
    assert t.state.attempts[0].ref == "SM1"
    assert [a.ref for a in t.state.unsettled()] == ["SM1"]


def test_duplicate_or_stray_answers_change_nothing() -> None:
    """An answer for an attempt that never had a lookup, or already has a ref, is a no-op."""
    state = ambiguous()
    assert apply(state, LookupDone(0, "SM1", True), 1.5).changed is False  # no lookup started yet
    found = run(state, (DeadlineReached(), 2), (LookupDone(0, "SM1", True), 3))[-1].state
    assert apply(found, LookupDone(0, "SM2", True), 4).changed is False
    assert apply(found, LookupDone(0, None, True), 40).changed is False


def test_interrupted_sms_send_is_looked_up() -> None:
    """A crash during an SMS send leaves it unconfirmed with lookups planned from the send start."""
    t = run(fresh(), (Start(), 0), (DeadlineReached(), 60))[-1]
    cur = t.state.current
    assert cur is not None and cur.reason == "send_unconfirmed" and cur.lookup_at == 2.0
    assert kinds(apply(t.state, DeadlineReached(), 60).effects) == ["Lookup"]


def test_no_lookups_configured_keeps_the_old_behaviour() -> None:
    """With no lookup delays an ambiguous send just waits, as before."""
    state = run(fresh(delays=()), (Start(), 0), (SendUnconfirmed(0), 1))[-1].state
    cur = state.current
    assert cur is not None and cur.lookup_at is None and state.deadline == 121


def test_lookup_deadline_does_not_fall_back_early() -> None:
    """A lookup deadline on a non-last step never triggers the step's fallback before deliver_within."""
    t = apply(ambiguous(SMS_THEN_TG), DeadlineReached(), 2)
    assert not any(isinstance(e, FellBack) for e in t.effects)
    assert t.state.current is not None and t.state.current.channel is ChannelName.SMS


def kinds(effects: tuple[object, ...]) -> list[str]:
    return [type(e).__name__ for e in effects]


class LifecycleWithLookups(Lifecycle):
    """The core's random-sequence machine, with ambiguous sends and lookup answers mixed in."""

    def __init__(self) -> None:
        super().__init__()
        # Restart from a state that plans lookups (the parent began without them).
        self.state = fresh(Policy().steps).model_copy(update={"checks_left": 3})
        self.sends.clear()
        self.absorb(apply(self.state, Start(), self.now))

    @rule(dt=st.floats(0, 40))
    def send_unconfirmed(self, dt: float) -> None:
        self.feed(SendUnconfirmed(self.state.step), dt)

    @rule(dt=st.floats(0, 40), ref=st.one_of(st.none(), refs), certain=st.booleans(), cost=costs)
    def lookup_done(self, dt: float, ref: str | None, certain: bool, cost: Decimal | None) -> None:
        self.feed(LookupDone(self.state.step, ref, certain or ref is not None, None, cost), dt)

    @invariant()
    def lookups_stay_within_the_plan(self) -> None:
        assert all(a.lookups <= len(DELAYS) for a in self.state.attempts)

    @invariant()
    def a_lost_send_is_never_charged(self) -> None:
        # Proven by a lookup, for the SMS sends lookups exist for. The generic machine may also
        # feed SendFailed(NOT_CREATED) to a probed Telegram step (its probe fee stays booked) and
        # probe answers to an SMS step (booked as abandoned or lost-probe fees): neither is the
        # send's own charge, which is what this property is about.
        for attempt in self.state.attempts:
            if attempt.channel is ChannelName.SMS and attempt.reason == "not_created" and attempt.lookups:
                assert attempt.ref is None
                if attempt.lost_booked == 0:
                    assert attempt.cost == attempt.abandoned_cost


TestLifecycleWithLookups = LifecycleWithLookups.TestCase
TestLifecycleWithLookups.settings = hsettings(max_examples=150, stateful_step_count=30, deadline=None)
