"""The verification lifecycle as a pure state machine.

``apply(state, event, now) -> Transition(state, effects, ledger)`` does no I/O,
reads no clock and draws no randomness: every shell (library call, worker,
webhook handler, deadline loop) loads a state, feeds one event, writes the new
state with compare-and-set *together with its ledger entries*, and only then
carries out the effects. Because the write comes first, a crash after it
re-runs nothing that was already decided, and a crash before it loses
nothing: the old state still holds its deadline.

Write-ahead phases make provider I/O crash-safe. Before a probe or a send the
attempt is persisted in phase ``probing``/``sending`` with a short I/O lease
as its deadline. If the process dies during the call, the deadline fires
later and the core decides what is safe:

* an interrupted probe is repeated (a probe sends nothing). Its answer was
  lost with its ``request_id``, but Telegram charged it in advance if the
  number is reachable: when the repeat says reachable, the lost one is booked
  too, as an estimate at the same fee (the lost id cannot be asked about);
* an interrupted send through a route whose sends are idempotent per probe
  reference (``Capabilities.idempotent_ref``: Telegram's ``request_id``) is
  re-issued with the same reference: the provider allows one message per
  reference, so this cannot produce a second message, and its "already
  sent" answer (:class:`~otp_router.errors.MessageAlreadySent`) means the
  first send went through (:class:`SendOk`, keep waiting for delivery);
* an interrupted send without such a reference (SMS) may or may not have
  left, so it is *not* repeated: the attempt is treated as sent with an
  unknown reference and the user can ask for a resend.

The core knows channels only by their capabilities (:class:`~otp_router.providers.base.Capabilities`,
carried by each :class:`~otp_router.policy.Step`), never by a route's or a
provider's name.

An ambiguous send through a route that can look messages up
(``Capabilities.lookup``: a 5xx or a timeout after the request was written,
or a crash during the call) is then resolved by *lookups*: at the delays in
``lookup_delays`` after the send began the core emits :class:`Lookup`, the
shell asks the provider whether the message exists and feeds the answer back
as :class:`LookupDone`. Found: its reference is recorded and the attempt
continues as a normal send. Provably not created (a complete listing, at
least ``lookup_grace`` seconds after the send began, shows nothing): a fresh
send is safe and the step falls back (or is repeated once). Still unknown
after the last lookup: the attempt stays as it is, and the user may resend.

An open circuit breaker delays a step, never ends the verification: the
shell refuses the call *before* any I/O and feeds :class:`ProbeFailed` /
:class:`SendFailed` with reason ``circuit_open`` and the moment the circuit
may let a call through (``retry_at``). With another step left, the workflow
falls back to it at once; on the last step the attempt waits (phase
``waiting``) and the probe or send is made afresh at ``retry_at``. That is
safe because the refused call never reached the provider: nothing was sent
or charged, so the fresh call cannot be a second message. The wait ends with
the code's expiry (or when the shell gives no ``retry_at``: its own bound).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from otp_router.policy import Step
from otp_router.providers.base import DeliveryState, route_name
from otp_router.store.base import LedgerEntry

__all__ = [
    "Attempt",
    "AttemptPhase",
    "Cancel",
    "CheckOutcome",
    "Checked",
    "CodeDelivered",
    "CodeEntered",
    "DeadlineReached",
    "Delivery",
    "Effect",
    "Event",
    "FallbackReason",
    "FellBack",
    "Finished",
    "LatencyObserved",
    "Lookup",
    "LookupDone",
    "Probe",
    "ProbeDone",
    "ProbeFailed",
    "ReportCode",
    "Resend",
    "ResendRefused",
    "Revoke",
    "Send",
    "SendFailed",
    "SendOk",
    "SendUnconfirmed",
    "Settle",
    "Start",
    "Status",
    "Transition",
    "VerificationState",
]

#: Seconds a probe or send may take before the core assumes the process died mid-call.
IO_LEASE = 60.0
#: First wait before asking a provider for the final cost of an attempt we left.
SETTLE_DELAY = 15.0
#: How many times to ask; after that the estimate stands (and is logged).
SETTLE_TRIES = 5

#: A route name as stored: the default routes come back as their ``ChannelName`` constants.
RouteName = Annotated[str, AfterValidator(route_name)]


class Status(enum.StrEnum):
    """Where a verification stands.

    A verification whose every step failed while some message it sent may
    still arrive (Telegram delivers until the message's ttl; an SMS may be
    late) stays ``pending`` until that message is reported failed or the code
    expires: the code it carries is the same, and a user who types it in time
    is verified.
    """

    PENDING = "pending"
    VERIFIED = "verified"
    EXPIRED = "expired"
    CANCELED = "canceled"
    FAILED = "failed"  # every channel failed and no message sent can still arrive
    TOO_MANY_ATTEMPTS = "too_many_attempts"

    @property
    def is_final(self) -> bool:
        """No event changes a final verification except late cost reports."""
        return self is not Status.PENDING


class AttemptPhase(enum.StrEnum):
    """Where one step's attempt stands."""

    PROBING = "probing"
    SENDING = "sending"
    AWAITING = "awaiting"  # sent, waiting for delivery or the step deadline
    #: The channel's circuit breaker refused the call before it was made: try again at ``retry_at``.
    WAITING = "waiting"
    DELIVERED = "delivered"
    FAILED = "failed"  # refused, failed, or fallen back from
    TIMED_OUT = "timed_out"  # last step reached its deadline; the code may still arrive


class FallbackReason(enum.StrEnum):
    """Why the workflow left a step (a metric label: keep this set small)."""

    ABILITY_REFUSED = "ability_refused"
    PERMANENT_ERROR = "permanent_error"
    #: A call that never reached the provider (refused connection) failed on every retry.
    RETRIES_EXHAUSTED = "retries_exhausted"
    #: A 5xx, a dropped connection or an unreadable answer that may have been acted on: not repeated.
    PROVIDER_ERROR = "provider_error"
    #: No answer within the channel's timeout (the request may have been acted on).
    TIMEOUT = "timeout"
    #: ``FLOOD_WAIT_N`` / HTTP 429 asking for a longer wait than ``max_retry_after``, or still after retries.
    RATE_LIMITED = "rate_limited"
    DEADLINE = "deadline"
    EXPIRED = "expired"
    REVOKED = "revoked"
    UNDELIVERED = "undelivered"
    CIRCUIT_OPEN = "circuit_open"
    USER_RESEND = "user_resend"
    NOT_CREATED = "not_created"  # a lookup proved an ambiguous send never created the message


class CheckOutcome(enum.StrEnum):
    """Result of checking an entered code."""

    VALID = "valid"
    INVALID = "invalid"
    EXPIRED = "expired"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    NOT_FOUND = "not_found"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Attempt(_Model):
    """One step's attempt; at most one per step."""

    step: int
    channel: RouteName
    provider: str
    phase: AttemptPhase
    started_at: float
    #: When the current probe/send began: the I/O lease runs from here.
    io_since: float
    probe_ref: str | None = None
    ref: str | None = None
    sent_at: float | None = None
    delivered_at: float | None = None
    delivery: DeliveryState | None = None
    reason: str | None = None
    #: Net amount booked in the ledger for this attempt (charges minus refunds).
    cost: Decimal = Decimal(0)
    cost_final: bool = False
    refunded: bool = False
    #: Ledger entries written so far: makes each entry key unique and deterministic.
    entries: int = 0
    #: Request ids of probes for this step whose answer came after the step had
    #: moved on (a re-probe raced them). Telegram charged each in advance and
    #: never refunds a request without a message, so their fees stay booked.
    abandoned_probes: tuple[str, ...] = ()
    #: The part of ``cost`` that is such abandoned probe fees (never refunded).
    abandoned_cost: Decimal = Decimal(0)
    #: Probes of this step cut off without an answer (the process died during
    #: the call) and not yet booked. Their ``request_id`` is lost; a reachable
    #: number was charged for each in advance, which the next answer tells.
    lost_probes: int = 0
    #: Lost probes booked (as estimates) at the fee the next answer reported.
    lost_booked: int = 0
    #: Lookups started for an ambiguous send (see :class:`Lookup`).
    lookups: int = 0
    #: When the next lookup is due (or, while one runs, when to assume it was lost); None: none planned.
    lookup_at: float | None = None
    #: Phase ``waiting``: when to make the refused call again, and which (probing or sending).
    retry_at: float | None = None
    waiting_for: AttemptPhase | None = None
    #: Times this attempt met an open circuit and waited.
    waits: int = 0


class FallbackRecord(_Model):
    """A move from one step to the next, with its reason."""

    from_channel: RouteName
    to_channel: RouteName | None
    reason: FallbackReason
    at: float


class VerificationState(_Model):
    """Everything known about one verification. Never holds the code itself."""

    id: str
    region: str
    # Kept out of reprs: states end up in logs and tracebacks.
    phone: str = Field(repr=False)
    code_digest: str = Field(repr=False)
    #: Random value the code is derived from (with the code secret); the code itself is never stored.
    code_nonce: str = Field(default="", repr=False)
    created_at: float
    expires_at: float
    status: Status = Status.PENDING
    steps: tuple[Step, ...]
    step: int = 0
    attempts: tuple[Attempt, ...] = ()
    fallbacks: tuple[FallbackRecord, ...] = ()
    checks_left: int
    resends: int = 0
    max_resends: int = 2
    resend_cooldown: float = 30.0
    finished_at: float | None = None
    verified_at: float | None = None
    deadline: float | None = None
    #: When to next ask providers for final costs of attempts no longer in play.
    settle_at: float | None = None
    settle_tries: int = 0
    settle_delay: float = SETTLE_DELAY
    #: Seconds after an ambiguous send began at which to look the message up.
    lookup_delays: tuple[float, ...] = ()
    #: A lookup finding nothing proves "not created" only this long after the send began.
    lookup_grace: float = 10.0
    #: The user's language (BCP 47) if the caller gave one (a voice step reads the code in it).
    locale: str | None = None

    @property
    def current(self) -> Attempt | None:
        """The attempt of the current step, if started."""
        return self.attempts[-1] if self.attempts and self.attempts[-1].step == self.step else None

    @property
    def channel(self) -> str | None:
        """Channel in use (the current attempt's), or None before the first attempt."""
        return self.attempts[-1].channel if self.attempts else None

    @property
    def total_cost(self) -> Decimal:
        """Net cost of this verification so far."""
        return sum((a.cost for a in self.attempts), Decimal(0))

    def unsettled(self) -> tuple[Attempt, ...]:
        """Sent attempts no longer in play whose cost may still change (refund, final price)."""
        live = self.current if self.status is Status.PENDING else None
        return tuple(
            a
            for a in self.attempts
            if a is not live and a.ref is not None and a.sent_at is not None and not a.cost_final
        )

    def attempt_for_ref(self, ref: str) -> Attempt | None:
        """The attempt whose provider reference (or probe reference) is ``ref``."""
        for attempt in self.attempts:
            if ref in (attempt.ref, attempt.probe_ref):
                return attempt
        return None


# --- events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the first step (emitted once, right after creation)."""


@dataclass(frozen=True, slots=True)
class ProbeDone:
    """The channel answered the reachability check."""

    step: int
    reachable: bool
    ref: str | None = None
    cost: Decimal | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeFailed:
    """The reachability check itself failed (error, retries exhausted, circuit open).

    ``retry_at``: with reason ``circuit_open``, when the circuit may let the
    probe through (the last step then waits for it instead of ending).
    """

    step: int
    reason: FallbackReason
    detail: str | None = None
    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class SendOk:
    """The provider accepted the message (``ref`` None: outcome unknown but maybe sent).

    ``estimate`` is True when ``cost`` comes from our price table, not the provider.
    """

    step: int
    ref: str | None
    cost: Decimal | None = None
    estimate: bool = False


@dataclass(frozen=True, slots=True)
class SendUnconfirmed:
    """The send may or may not have created the message, and the provider can be asked.

    The attempt waits as if sent (no second message) while lookups resolve it.
    """

    step: int


@dataclass(frozen=True, slots=True)
class LookupDone:
    """Answer to a :class:`Lookup`.

    ``ref`` set: the message exists (with its current ``state`` and ``cost``).
    ``ref`` None and ``certain``: the provider listed every candidate and none
    is ours. ``ref`` None and not ``certain``: still unknown (lookup failed).
    """

    step: int
    ref: str | None
    certain: bool
    state: DeliveryState | None = None
    cost: Decimal | None = None
    cost_final: bool = False


@dataclass(frozen=True, slots=True)
class SendFailed:
    """The provider did not send: permanent error, retries exhausted or circuit open.

    ``retry_at`` as for :class:`ProbeFailed`.
    """

    step: int
    reason: FallbackReason
    detail: str | None = None
    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery report (callback or poll) for the attempt with this reference.

    ``at`` is the provider's own time of the state, if it gave one.
    """

    ref: str
    state: DeliveryState
    cost: Decimal | None = None
    refunded: bool = False
    cost_final: bool = False
    at: float | None = None


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    """The stored deadline was claimed by a deadline loop."""


@dataclass(frozen=True, slots=True)
class CodeEntered:
    """The user entered a well-formed code; ``matches`` is the shell's HMAC comparison."""

    matches: bool


@dataclass(frozen=True, slots=True)
class Cancel:
    """The application gave up on this verification."""


@dataclass(frozen=True, slots=True)
class Resend:
    """The user asked for the code again."""


Event = (
    Start
    | ProbeDone
    | ProbeFailed
    | SendOk
    | SendUnconfirmed
    | LookupDone
    | SendFailed
    | Delivery
    | DeadlineReached
    | CodeEntered
    | Cancel
    | Resend
)


# --- effects --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """Ask ``channel`` whether the number can receive."""

    step: int
    channel: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send the code through ``channel``; ``resume`` re-issues an interrupted send by probe id."""

    step: int
    channel: str
    ttl: int
    probe_ref: str | None
    attempt: int
    resume: bool = False


@dataclass(frozen=True, slots=True)
class Revoke:
    """Withdraw an undelivered message."""

    step: int
    channel: str
    ref: str


@dataclass(frozen=True, slots=True)
class ReportCode:
    """Tell the provider which code the user entered (the shell holds the code)."""

    channel: str
    ref: str


@dataclass(frozen=True, slots=True)
class Settle:
    """Ask the provider for the final state and cost of an attempt no longer in play."""

    step: int
    channel: str
    ref: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the provider whether an ambiguous send to the verification's number created a message.

    ``since`` is when the send began (Unix time): only messages created from
    then on can be ours.
    """

    step: int
    channel: str
    since: float


@dataclass(frozen=True, slots=True)
class FellBack:
    """Informational: the workflow moved on (for metrics and logs)."""

    from_channel: str
    to_channel: str | None
    reason: FallbackReason


@dataclass(frozen=True, slots=True)
class Finished:
    """Informational: the verification reached a final status."""

    status: Status


@dataclass(frozen=True, slots=True)
class Checked:
    """Result of a code check, for the caller."""

    outcome: CheckOutcome
    attempts_left: int


@dataclass(frozen=True, slots=True)
class CodeDelivered:
    """Informational: a channel reported the code delivered ``seconds`` after the start."""

    channel: str
    seconds: float


@dataclass(frozen=True, slots=True)
class LatencyObserved:
    """Record one delivery outcome in the learned latency estimate (:mod:`otp_router.latency`).

    ``seconds`` runs from the send accepted to the delivery; None for a
    message that will never arrive (expired, undelivered, failed). ``at`` is
    when the outcome happened.
    """

    channel: str
    seconds: float | None
    at: float


@dataclass(frozen=True, slots=True)
class ResendRefused:
    """The resend request was refused by policy; ``retry_after`` None means never."""

    reason: str
    retry_after: float | None


Effect = (
    Probe
    | Send
    | Revoke
    | ReportCode
    | Settle
    | Lookup
    | FellBack
    | Finished
    | Checked
    | CodeDelivered
    | LatencyObserved
    | ResendRefused
)


@dataclass(frozen=True, slots=True)
class Transition:
    """What :func:`apply` decided."""

    state: VerificationState
    effects: tuple[Effect, ...] = ()
    ledger: tuple[LedgerEntry, ...] = ()
    #: False when the event changed nothing (duplicate report, stale deadline…).
    changed: bool = True
