"""The transition function of the lifecycle core (see :mod:`otp_router.core`).

``apply`` is total: an event that does not fit the state (a duplicate report,
a stale deadline, a probe answer for a step already left) returns the state
unchanged with ``changed=False`` instead of raising, because every shell may
see events twice (webhook retries, redelivered queue messages, two deadline
loops) and must be able to treat a repeat as a no-op.
"""

from __future__ import annotations

from decimal import Decimal

from otp_router.core import (
    IO_LEASE,
    SETTLE_DELAY,
    SETTLE_TRIES,
    Attempt,
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
    FallbackRecord,
    FellBack,
    Finished,
    LatencyObserved,
    Lookup,
    LookupDone,
    Probe,
    ProbeDone,
    ProbeFailed,
    ReportCode,
    Resend,
    ResendRefused,
    Revoke,
    Send,
    SendFailed,
    SendOk,
    SendUnconfirmed,
    Settle,
    Start,
    Status,
    Transition,
    VerificationState,
)
from otp_router.policy import Step
from otp_router.providers.base import Capabilities, DeliveryState
from otp_router.store.base import LedgerEntry, LedgerKind

__all__ = ["apply", "new_state"]

_FAILURE_REASON = {
    DeliveryState.EXPIRED: FallbackReason.EXPIRED,
    DeliveryState.REVOKED: FallbackReason.REVOKED,
    DeliveryState.UNDELIVERED: FallbackReason.UNDELIVERED,
    DeliveryState.FAILED: FallbackReason.UNDELIVERED,
}
#: Provider times come in whole seconds: one within this of ``now`` is no better than ``now``.
_PROVIDER_TIME_RESOLUTION = 1.0


def _delivered_at(event: Delivery, sent_at: float | None, now: float) -> float:
    """When a message was delivered: ``now``, unless the provider's own time says clearly earlier.

    A report that arrives at once (a webhook) is dated by our clock, finer
    than the provider's whole seconds; one read long after the fact (a poll
    at a deadline or while settling costs) by the provider's time, taken at
    the middle of its second and never before the send.
    """
    if event.at is None or event.at + _PROVIDER_TIME_RESOLUTION >= now:
        return now
    at = event.at + _PROVIDER_TIME_RESOLUTION / 2
    return at if sent_at is None else max(at, sent_at)


def new_state(
    *,
    verification_id: str,
    phone: str,
    region: str,
    code_digest: str,
    code_nonce: str = "",
    steps: tuple[Step, ...],
    now: float,
    code_ttl: float,
    max_attempts: int,
    max_resends: int = 2,
    resend_cooldown: float = 30.0,
    settle_delay: float = SETTLE_DELAY,
    lookup_delays: tuple[float, ...] = (),
    lookup_grace: float = 10.0,
    locale: str | None = None,
) -> VerificationState:
    """A fresh verification, before its first step (feed :class:`Start` next)."""
    if not steps:
        raise ValueError("a verification needs at least one step")
    return VerificationState(
        id=verification_id,
        region=region,
        phone=phone,
        code_digest=code_digest,
        code_nonce=code_nonce,
        created_at=now,
        expires_at=now + code_ttl,
        steps=steps,
        checks_left=max_attempts,
        max_resends=max_resends,
        resend_cooldown=resend_cooldown,
        settle_delay=settle_delay,
        lookup_delays=lookup_delays,
        lookup_grace=lookup_grace,
        locale=locale,
    )


def apply(state: VerificationState, event: Event, now: float) -> Transition:
    """Feed one event to the lifecycle.

    Args:
        state: Current state, as loaded.
        event: What happened.
        now: Unix time, supplied by the shell (the core reads no clock).

    Returns:
        The new state (with its deadline), the effects to carry out after the
        state is durably written, and the ledger entries to write with it.
    """
    result = _dispatch(state, event, now)
    new = _schedule_settle(result.state, now)
    deadline = _deadline(new)
    if deadline != new.deadline:
        new = new.model_copy(update={"deadline": deadline})
    return Transition(new, result.effects, result.ledger, changed=new != state)


class _Builder:
    """Collects effects and ledger entries while a transition is computed."""

    def __init__(self, state: VerificationState) -> None:
        self.state = state
        self.effects: list[Effect] = []
        self.ledger: list[LedgerEntry] = []

    def done(self) -> Transition:
        return Transition(self.state, tuple(self.effects), tuple(self.ledger))

    def put_attempt(self, attempt: Attempt) -> None:
        attempts = tuple(attempt if a.step == attempt.step else a for a in self.state.attempts)
        self.state = self.state.model_copy(update={"attempts": attempts})

    def book(self, attempt: Attempt, target: Decimal, *, estimate: bool, now: float) -> Attempt:
        """Bring the attempt's booked cost to ``target`` with one ledger entry for the difference.

        ``estimate`` marks a cost we computed ourselves (SMS price table) rather
        than one the provider reported.
        """
        delta = target - attempt.cost
        if delta == 0:
            return attempt
        if delta < 0:
            kind = LedgerKind.REFUND
        elif estimate:
            kind = LedgerKind.ESTIMATE
        else:
            kind = LedgerKind.CHARGE
        self.ledger.append(
            LedgerEntry(
                # Deterministic and unique: the n-th entry of this step of this verification.
                # A replayed event that lost its CAS race produces the same key and is dropped.
                key=f"{self.state.id}/{attempt.step}/{attempt.entries}",
                verification_id=self.state.id,
                channel=str(attempt.channel),
                provider=attempt.provider,
                region=self.state.region,
                kind=kind,
                amount=delta,
                currency="USD",
                at=now,
            )
        )
        return attempt.model_copy(update={"cost": target, "entries": attempt.entries + 1})

    def finish(self, status: Status, now: float) -> None:
        update: dict[str, object] = {"status": status, "finished_at": now}
        if status is Status.VERIFIED:
            update["verified_at"] = now
        self.state = self.state.model_copy(update=update)
        self.effects.append(Finished(status))

    def begin_step(self, index: int, now: float) -> None:
        """Start step ``index``, or fail the verification when there is none left."""
        state = self.state
        if now >= state.expires_at:
            self.finish(Status.EXPIRED, now)
            return
        if index >= len(state.steps):
            self.state = state.model_copy(update={"step": index})
            # Out of steps. A message already sent may still arrive (Telegram until its
            # ttl, a slow SMS) with the same code: stay checkable until the code expires.
            if not _may_still_arrive(self.state):
                self.finish(Status.FAILED, now)
            return
        step = state.steps[index]
        attempt = Attempt(
            step=index,
            channel=step.channel,
            provider=step.provider,
            phase=AttemptPhase.PROBING if step.probe else AttemptPhase.SENDING,
            started_at=now,
            io_since=now,
        )
        self.state = state.model_copy(update={"step": index, "attempts": (*state.attempts, attempt)})
        if step.probe:
            self.effects.append(Probe(index, step.channel))
        else:
            self.effects.append(self.send_effect(attempt, resume=False))

    def send_effect(self, attempt: Attempt, *, resume: bool) -> Send:
        sends_before = sum(1 for a in self.state.attempts if a.step < attempt.step and a.sent_at)
        return Send(
            step=attempt.step,
            channel=attempt.channel,
            ttl=self.state.steps[attempt.step].ttl,
            probe_ref=attempt.probe_ref,
            attempt=sends_before + 1,
            resume=resume,
        )

    def fall_back(self, attempt: Attempt, reason: FallbackReason, now: float, detail: str | None) -> None:
        """Leave the current step for ``reason`` and begin the next one."""
        self.put_attempt(
            attempt.model_copy(update={"phase": AttemptPhase.FAILED, "reason": detail or reason})
        )
        nxt = attempt.step + 1
        to_channel = self.state.steps[nxt].channel if nxt < len(self.state.steps) else None
        record = FallbackRecord(from_channel=attempt.channel, to_channel=to_channel, reason=reason, at=now)
        self.state = self.state.model_copy(update={"fallbacks": (*self.state.fallbacks, record)})
        self.effects.append(FellBack(attempt.channel, to_channel, reason))
        self.begin_step(nxt, now)


def _dispatch(state: VerificationState, event: Event, now: float) -> Transition:
    b = _Builder(state)
    match event:
        case Start():
            if state.status is Status.PENDING and not state.attempts:
                b.begin_step(0, now)
        case ProbeDone():
            _probe_done(b, event, now)
        case ProbeFailed(step=step, reason=reason, detail=detail, retry_at=retry_at):
            cur = state.current
            if (
                state.status is Status.PENDING
                and cur
                and cur.step == step
                and cur.phase is AttemptPhase.PROBING
            ):
                _step_failed(b, cur, reason, detail, retry_at, now)
        case SendOk():
            _send_ok(b, event, now)
        case SendUnconfirmed():
            _send_unconfirmed(b, event, now)
        case LookupDone():
            _lookup_done(b, event, now)
        case SendFailed(step=step, reason=reason, detail=detail, retry_at=retry_at):
            cur = state.current
            if cur and cur.step == step and cur.phase is AttemptPhase.SENDING:
                if state.status is Status.PENDING:
                    _step_failed(b, cur, reason, detail, retry_at, now)
                else:
                    b.put_attempt(cur.model_copy(update={"phase": AttemptPhase.FAILED, "reason": reason}))
        case Delivery():
            _delivery(b, event, now)
        case DeadlineReached():
            _deadline_reached(b, now)
        case CodeEntered(matches=matches):
            _code_entered(b, matches, now)
        case Cancel():
            if state.status is Status.PENDING:
                cur = state.current
                if cur and cur.ref and cur.phase is AttemptPhase.AWAITING and _caps(state, cur).revoke:
                    b.effects.append(Revoke(cur.step, cur.channel, cur.ref))
                b.finish(Status.CANCELED, now)
        case Resend():
            _resend(b, now)
    return b.done()


def _step_failed(
    b: _Builder, cur: Attempt, reason: FallbackReason, detail: str | None, retry_at: float | None, now: float
) -> None:
    """A probe or send of the current step failed: fall back, or wait out an open circuit.

    An open circuit is a channel-wide pause, not an answer about this number.
    With another step left, that step is tried at once; on the last step the
    attempt waits until ``retry_at`` and makes the same call afresh (nothing
    was sent: the circuit refused before any I/O). Without a ``retry_at``
    (the shell's wait bound is spent), or if it falls after the code's expiry,
    the step ends as any failed step does.
    """
    last = cur.step + 1 >= len(b.state.steps)
    in_time = retry_at is not None and retry_at < b.state.expires_at
    if reason is FallbackReason.CIRCUIT_OPEN and last and in_time and retry_at is not None:
        b.put_attempt(
            cur.model_copy(
                update={
                    "phase": AttemptPhase.WAITING,
                    "waiting_for": cur.phase,
                    "retry_at": max(retry_at, now),
                    "waits": cur.waits + 1,
                    "reason": reason.value,
                }
            )
        )
        return
    b.fall_back(cur, reason, now, detail)


def _probe_done(b: _Builder, event: ProbeDone, now: float) -> None:
    cur = b.state.current
    if not (cur and cur.step == event.step and cur.phase is AttemptPhase.PROBING):
        _late_probe(b, event, now)
        return
    if event.cost:
        # Telegram charges a reachable probe in advance; the send that follows is free.
        cur = b.book(cur, cur.cost + event.cost, estimate=False, now=now)
        if event.reachable and cur.lost_probes:
            # Probes cut off by a crash reached a number that is reachable: each was
            # charged the same fee in advance, and no refund comes without a message.
            lost = event.cost * cur.lost_probes
            cur = b.book(cur, cur.cost + lost, estimate=True, now=now)
            cur = cur.model_copy(
                update={
                    "abandoned_cost": cur.abandoned_cost + lost,
                    "lost_booked": cur.lost_booked + cur.lost_probes,
                    "lost_probes": 0,
                }
            )
    if b.state.status is not Status.PENDING:
        b.put_attempt(cur.model_copy(update={"phase": AttemptPhase.FAILED, "probe_ref": event.ref}))
        return
    if event.reachable:
        cur = cur.model_copy(update={"phase": AttemptPhase.SENDING, "probe_ref": event.ref, "io_since": now})
        b.put_attempt(cur)
        b.effects.append(b.send_effect(cur, resume=False))
    else:
        b.fall_back(cur, FallbackReason.ABILITY_REFUSED, now, event.reason)


def _late_probe(b: _Builder, event: ProbeDone, now: float) -> None:
    """Book a charged probe answer that arrived after its step moved on.

    It happens when a probe outlived its I/O lease and the recovery probed
    again: the step went on with one ``request_id`` and this one is abandoned.
    Telegram charged it in advance and refunds nothing for a request without
    a message, so the ledger must carry it too.
    """
    attempt = next((a for a in b.state.attempts if a.step == event.step), None)
    if (
        attempt is None
        or not event.cost
        or event.ref is None
        or event.ref in (attempt.probe_ref, *attempt.abandoned_probes)
    ):
        return
    refs = (*attempt.abandoned_probes, event.ref)
    if attempt.lost_booked:
        # One of the probes believed lost answered after all: it is booked already.
        b.put_attempt(
            attempt.model_copy(update={"abandoned_probes": refs, "lost_booked": attempt.lost_booked - 1})
        )
        return
    attempt = b.book(attempt, attempt.cost + event.cost, estimate=False, now=now)
    b.put_attempt(
        attempt.model_copy(
            update={"abandoned_probes": refs, "abandoned_cost": attempt.abandoned_cost + event.cost}
        )
    )


def _send_ok(b: _Builder, event: SendOk, now: float) -> None:
    cur = b.state.current
    if not (cur and cur.step == event.step and cur.phase is AttemptPhase.SENDING):
        return
    if event.cost is not None and cur.abandoned_cost + event.cost > cur.cost:
        cur = b.book(cur, cur.abandoned_cost + event.cost, estimate=event.estimate, now=now)
    # The provider may have sent even if the verification ended meanwhile: keep the
    # reference so late reports still book refunds and prices.
    ref = event.ref or cur.probe_ref
    cur = cur.model_copy(update={"phase": AttemptPhase.AWAITING, "ref": ref, "sent_at": now})
    b.put_attempt(cur)


def _next_lookup(state: VerificationState, attempt: Attempt) -> float | None:
    """When the attempt's next lookup is due (None: every planned lookup was made)."""
    if attempt.lookups >= len(state.lookup_delays):
        return None
    return attempt.io_since + state.lookup_delays[attempt.lookups]


def _send_unconfirmed(b: _Builder, event: SendUnconfirmed, now: float) -> None:
    cur = b.state.current
    if not (cur and cur.step == event.step and cur.phase is AttemptPhase.SENDING):
        return
    # Treated as sent (no second message, no other channel) until a lookup says otherwise.
    cur = cur.model_copy(
        update={"phase": AttemptPhase.AWAITING, "sent_at": now, "reason": "send_unconfirmed"}
    )
    if b.state.status is Status.PENDING:
        cur = cur.model_copy(update={"lookup_at": _next_lookup(b.state, cur)})
    b.put_attempt(cur)


def _start_lookup(b: _Builder, cur: Attempt, now: float) -> None:
    """Emit the next lookup, or give up when the last one's answer never came."""
    if cur.lookups >= len(b.state.lookup_delays):
        b.put_attempt(cur.model_copy(update={"lookup_at": None, "reason": "send_unknown"}))
        return
    # The lease: if the answer is lost (crash), look again then; a lookup is a read.
    b.put_attempt(cur.model_copy(update={"lookups": cur.lookups + 1, "lookup_at": now + IO_LEASE}))
    b.effects.append(Lookup(cur.step, cur.channel, cur.io_since))


def _lookup_done(b: _Builder, event: LookupDone, now: float) -> None:
    state = b.state
    attempt = next((a for a in state.attempts if a.step == event.step), None)
    if attempt is None or attempt.ref is not None or attempt.lookups == 0 or attempt.sent_at is None:
        return
    if event.ref is not None:
        # Found: from here on it is an ordinary sent message (callbacks, polls, settling).
        b.put_attempt(attempt.model_copy(update={"ref": event.ref, "lookup_at": None, "reason": None}))
        if event.state is not None or event.cost is not None:
            report = Delivery(
                event.ref, event.state or DeliveryState.UNKNOWN, event.cost, False, event.cost_final
            )
            _delivery(b, report, now)
        return
    live = (
        state.status is Status.PENDING
        and state.current is not None
        and state.current.step == attempt.step
        and attempt.phase is AttemptPhase.AWAITING
    )
    if not live:
        # Nothing is sent again for an attempt no longer in play; the lookup only books
        # what the provider charged. Absent (past the grace): nothing to book. Unknown:
        # ask again at the next delay, while there is one.
        proven = event.certain and now - attempt.io_since >= state.lookup_grace
        b.put_attempt(
            attempt.model_copy(update={"lookup_at": None if proven else _next_lookup(state, attempt)})
        )
        return
    if event.certain and now - attempt.io_since >= state.lookup_grace:
        _not_created(b, attempt, now)
        return
    nxt = _next_lookup(state, attempt)
    reason = attempt.reason if nxt is not None else "send_unknown"
    b.put_attempt(attempt.model_copy(update={"lookup_at": nxt, "reason": reason}))


def _not_created(b: _Builder, attempt: Attempt, now: float) -> None:
    """The provider proved the message was never created: nothing reached the user.

    Sending again cannot give the user a second code, so the step falls back
    to the next one; on the last step it is repeated once (a second proof of
    loss in one verification means the provider is failing: the workflow ends).
    """
    state = b.state
    b.put_attempt(attempt.model_copy(update={"sent_at": None, "lookup_at": None}))
    repeated = any(f.reason is FallbackReason.NOT_CREATED for f in state.fallbacks)
    if attempt.step + 1 >= len(state.steps) and not repeated:
        b.state = b.state.model_copy(update={"steps": (*state.steps, state.steps[attempt.step])})
    cur = b.state.current
    assert cur is not None
    b.fall_back(cur, FallbackReason.NOT_CREATED, now, "not_created")


def _delivery(b: _Builder, event: Delivery, now: float) -> None:
    attempt = b.state.attempt_for_ref(event.ref)
    if attempt is None:
        return
    if event.cost is not None or event.refunded:
        # Abandoned probe fees stay: a refund gives back only the message's own fee.
        target = attempt.abandoned_cost + (Decimal(0) if event.refunded else (event.cost or Decimal(0)))
        if not (attempt.cost_final and not event.refunded):
            attempt = b.book(attempt, target, estimate=False, now=now)
        attempt = attempt.model_copy(
            update={
                "refunded": attempt.refunded or event.refunded,
                "cost_final": attempt.cost_final or event.cost_final or event.refunded,
            }
        )
    previous = attempt.delivery
    settled = previous is not None and (previous.is_delivered or previous.is_failed)
    # Delivery states only move forward; a late "sent" never undoes "delivered".
    if settled and not (previous is DeliveryState.DELIVERED and event.state is DeliveryState.READ):
        b.put_attempt(attempt)
        return
    if event.state is DeliveryState.UNKNOWN:
        b.put_attempt(attempt)
        return
    attempt = attempt.model_copy(update={"delivery": event.state})
    if event.state.is_delivered and attempt.delivered_at is None:
        delivered_at = _delivered_at(event, attempt.sent_at, now)
        attempt = attempt.model_copy(update={"delivered_at": delivered_at})
        b.effects.append(CodeDelivered(attempt.channel, delivered_at - b.state.created_at))
        if attempt.sent_at is not None:
            b.effects.append(LatencyObserved(attempt.channel, delivered_at - attempt.sent_at, delivered_at))
        if attempt.phase in (AttemptPhase.AWAITING, AttemptPhase.TIMED_OUT, AttemptPhase.SENDING):
            attempt = attempt.model_copy(update={"phase": AttemptPhase.DELIVERED})
    elif event.state.is_failed and event.state is not DeliveryState.REVOKED and attempt.sent_at is not None:
        # Never arriving is part of the latency distribution (the mass past every
        # deadline). A revoked message says nothing about delivery: we withdrew it.
        b.effects.append(LatencyObserved(attempt.channel, None, now))
    b.put_attempt(attempt)
    is_current = b.state.current is not None and b.state.current.step == attempt.step
    if (
        event.state.is_failed
        and is_current
        and b.state.status is Status.PENDING
        and attempt.phase in (AttemptPhase.AWAITING, AttemptPhase.TIMED_OUT)
    ):
        b.fall_back(attempt, _FAILURE_REASON[event.state], now, event.state.value)
    elif (
        event.state.is_failed
        and b.state.status is Status.PENDING
        and _out_of_steps(b.state)
        and not _may_still_arrive(b.state)
    ):
        # Every step failed earlier and this was the last message that could still arrive.
        b.finish(Status.FAILED, now)


def _deadline_reached(b: _Builder, now: float) -> None:
    state = b.state
    if state.deadline is None or now < state.deadline:
        return
    if state.settle_at is not None and now >= state.settle_at:
        for attempt in state.unsettled():
            assert attempt.ref is not None
            b.effects.append(Settle(attempt.step, attempt.channel, attempt.ref))
        tries = state.settle_tries + 1
        # Back off: providers fill in prices and refunds minutes, not seconds, later.
        nxt = now + state.settle_delay * 2**tries if tries < SETTLE_TRIES else None
        b.state = state.model_copy(update={"settle_tries": tries, "settle_at": nxt})
        state = b.state
    for attempt in state.attempts:
        # An ambiguous send no longer in play (the user verified with its code before
        # the first lookup, or the step was left) is still looked up, so that what the
        # provider charged for it is booked. A lookup is a read: repeating it is safe.
        if (
            attempt.ref is None
            and attempt.lookup_at is not None
            and now >= attempt.lookup_at
            and not _is_live(state, attempt)
        ):
            _start_lookup(b, attempt, now)
    state = b.state
    if state.status is not Status.PENDING:
        return
    if now >= state.expires_at:
        b.finish(Status.EXPIRED, now)
        return
    if _out_of_steps(state):
        # Every step failed; only waiting for a late message until the code expires.
        return
    cur = state.current
    if cur is None:
        # Created but Start was never applied (crash right after creation).
        b.begin_step(0, now)
        return
    match cur.phase:
        case AttemptPhase.PROBING:
            # The process died during the probe: probing again sends nothing. The lost
            # probe is booked once the new answer says whether it was charged.
            b.put_attempt(cur.model_copy(update={"io_since": now, "lost_probes": cur.lost_probes + 1}))
            b.effects.append(Probe(cur.step, cur.channel))
        case AttemptPhase.SENDING if _caps(state, cur).idempotent_ref and cur.probe_ref:
            # Same probe reference: the provider sends at most one message per reference
            # (Telegram's request_id), so this is safe.
            cur = cur.model_copy(update={"io_since": now})
            b.put_attempt(cur)
            b.effects.append(b.send_effect(cur, resume=True))
        case AttemptPhase.SENDING:
            # Unknown whether it left; sending again could deliver two codes. Assume sent.
            sent = cur.model_copy(
                update={"phase": AttemptPhase.AWAITING, "sent_at": cur.io_since, "reason": "send_unconfirmed"}
            )
            if _caps(state, cur).lookup:
                # The provider can be asked whether the message exists (see _lookup_done).
                sent = sent.model_copy(update={"lookup_at": _next_lookup(state, sent)})
            b.put_attempt(sent)
        case AttemptPhase.WAITING if cur.retry_at is not None and now >= cur.retry_at:
            # The circuit refused the call before any I/O, so nothing left and nothing was
            # charged: making the probe or send now cannot give the user a second message.
            probe = state.steps[cur.step].probe and not cur.probe_ref
            phase = cur.waiting_for or (AttemptPhase.PROBING if probe else AttemptPhase.SENDING)
            resumed = {"phase": phase, "io_since": now, "retry_at": None, "waiting_for": None, "reason": None}
            cur = cur.model_copy(update=resumed)
            b.put_attempt(cur)
            if phase is AttemptPhase.PROBING:
                b.effects.append(Probe(cur.step, cur.channel))
            else:
                b.effects.append(b.send_effect(cur, resume=False))
        case AttemptPhase.AWAITING if cur.ref is None and cur.lookup_at is not None and now >= cur.lookup_at:
            _start_lookup(b, cur, now)
        case AttemptPhase.AWAITING if (
            cur.sent_at is not None and now < cur.sent_at + state.steps[cur.step].deliver_within
        ):
            # An earlier deadline (a lookup lease, settling) fired, not this step's.
            pass
        case AttemptPhase.AWAITING:
            # No revoke: Telegram refunds a message not delivered within its ttl by
            # itself, while a revoked one is never refunded; and if it does arrive
            # late, its code still verifies.
            if cur.step + 1 < len(state.steps):
                b.fall_back(cur, FallbackReason.DEADLINE, now, None)
            else:
                b.put_attempt(cur.model_copy(update={"phase": AttemptPhase.TIMED_OUT}))
        case _:
            pass


def _code_entered(b: _Builder, matches: bool, now: float) -> None:
    state = b.state
    if state.status is Status.TOO_MANY_ATTEMPTS:
        b.effects.append(Checked(CheckOutcome.TOO_MANY_ATTEMPTS, 0))
        return
    if state.status is not Status.PENDING:
        # Codes are single use: after verification, or once over, no code is valid.
        b.effects.append(Checked(CheckOutcome.EXPIRED, state.checks_left))
        return
    if now >= state.expires_at:
        b.finish(Status.EXPIRED, now)
        b.effects.append(Checked(CheckOutcome.EXPIRED, state.checks_left))
        return
    for attempt in state.attempts:
        if _caps(state, attempt).report_code and attempt.ref and attempt.sent_at is not None:
            b.effects.append(ReportCode(attempt.channel, attempt.ref))
    if matches:
        b.finish(Status.VERIFIED, now)
        b.effects.append(Checked(CheckOutcome.VALID, state.checks_left))
        return
    left = state.checks_left - 1
    b.state = b.state.model_copy(update={"checks_left": left})
    if left <= 0:
        b.finish(Status.TOO_MANY_ATTEMPTS, now)
        b.effects.append(Checked(CheckOutcome.TOO_MANY_ATTEMPTS, 0))
    else:
        b.effects.append(Checked(CheckOutcome.INVALID, left))


def _resend(b: _Builder, now: float) -> None:
    state = b.state
    cur = state.current
    if state.status is not Status.PENDING:
        b.effects.append(ResendRefused("verification is over", None))
        return
    if _out_of_steps(state):
        b.effects.append(ResendRefused("every channel failed", None))
        return
    if state.resends >= state.max_resends:
        b.effects.append(ResendRefused("no resends left", None))
        return
    if cur is None or cur.sent_at is None:
        b.effects.append(ResendRefused("the code is still being sent", state.resend_cooldown))
        return
    ready_at = cur.sent_at + state.resend_cooldown
    if now < ready_at:
        b.effects.append(ResendRefused("too soon after the last send", ready_at - now))
        return
    b.state = state.model_copy(update={"resends": state.resends + 1})
    if cur.step + 1 >= len(state.steps):
        # Last step: repeat it as a new step, so each step still sends at most once.
        b.state = b.state.model_copy(update={"steps": (*state.steps, state.steps[cur.step])})
    b.fall_back(cur, FallbackReason.USER_RESEND, now, None)


def _caps(state: VerificationState, attempt: Attempt) -> Capabilities:
    """What the adapter of the attempt's step can do."""
    return state.steps[attempt.step].capabilities


def _is_live(state: VerificationState, attempt: Attempt) -> bool:
    """Whether ``attempt`` is the current step of a pending verification."""
    cur = state.current
    return state.status is Status.PENDING and cur is not None and cur.step == attempt.step


def _lookups_due(state: VerificationState) -> float | None:
    """The earliest planned lookup of an ambiguous send, in play or not (None: none planned)."""
    times = [a.lookup_at for a in state.attempts if a.ref is None and a.lookup_at is not None]
    return min(times, default=None)


def _out_of_steps(state: VerificationState) -> bool:
    """Every step was tried and left (the verification may still wait for a late message)."""
    return state.step >= len(state.steps)


def _may_still_arrive(state: VerificationState) -> bool:
    """Some message was sent and is not known to have failed: its code may still reach the user.

    "Sent" includes an unconfirmed send (it may have left). A delivered
    message counts too: the user has the code and may type it late.
    """
    return any(
        a.sent_at is not None and not (a.delivery is not None and a.delivery.is_failed)
        for a in state.attempts
    )


def _schedule_settle(state: VerificationState, now: float) -> VerificationState:
    """Keep ``settle_at`` set exactly while some attempt's cost is still open."""
    open_costs = bool(state.unsettled()) and state.settle_tries < SETTLE_TRIES
    if open_costs and state.settle_at is None:
        return state.model_copy(update={"settle_at": now + state.settle_delay})
    if not open_costs and state.settle_at is not None:
        return state.model_copy(update={"settle_at": None})
    return state


def _deadline(state: VerificationState) -> float | None:
    """The single next moment this verification needs attention, or None when done."""
    # Settling costs and looking up ambiguous sends (in play or not) go on after the end.
    later = [t for t in (state.settle_at, _lookups_due(state)) if t is not None]
    if state.status is not Status.PENDING:
        return min(later, default=None)
    cur = state.current
    at = state.expires_at
    if _out_of_steps(state):
        pass  # waiting for a late message: nothing to do before the code expires
    elif cur is None:
        return min(state.created_at + IO_LEASE, at)
    elif cur.phase in (AttemptPhase.PROBING, AttemptPhase.SENDING):
        at = min(at, cur.io_since + IO_LEASE)
    elif cur.phase is AttemptPhase.WAITING and cur.retry_at is not None:
        at = min(at, cur.retry_at)
    elif cur.phase is AttemptPhase.AWAITING and cur.sent_at is not None:
        at = min(at, cur.sent_at + state.steps[cur.step].deliver_within)
    return min([at, *later])
