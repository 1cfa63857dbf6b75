"""The library API: the imperative shell around the lifecycle core.

Every public call does the same three things: load the verification, feed one
event to :func:`otp_router.lifecycle.apply`, write the new state with
compare-and-set (ledger entries in the same atomic write), and only then carry
out the effects. Effects that call a provider produce the next event, which
goes through the same loop. Nothing is sent before the decision to send it is
durably stored, so a crash at any point is recovered by the stored deadline
(see :mod:`otp_router.core`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from otp_router.accounting import paid_twice
from otp_router.circuit import CircuitBreaker, CircuitState
from otp_router.codes import code_digest, codes_match, derive_code, new_nonce, validate_code
from otp_router.config import Settings
from otp_router.core import (
    IO_LEASE,
    Cancel,
    Checked,
    CheckOutcome,
    CodeDelivered,
    CodeEntered,
    DeadlineReached,
    Delivery,
    Event,
    FallbackReason,
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
from otp_router.crashpoints import crash_point
from otp_router.errors import (
    AllProvidersFailed,
    ConcurrentUpdate,
    ConfigError,
    IdempotencyConflict,
    InputError,
    InvalidRecipient,
    MessageAlreadySent,
    OtpRouterError,
    ProviderError,
    ProviderPermanentError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderTransientError,
    RateLimited,
    StoreError,
    UnsupportedNumberType,
    VerificationNotFound,
)
from otp_router.ids import is_verification_id, keyed_id, random_id
from otp_router.inputs import check_text
from otp_router.instrument import InstrumentedChannel
from otp_router.latency import LearnedDeadlines, observation, stale_cells
from otp_router.lifecycle import apply, new_state
from otp_router.logs import bind
from otp_router.logs import event as log_event
from otp_router.metrics import Metrics, NullMetrics, get_metrics
from otp_router.models import CheckResult, Verification
from otp_router.phone import PhoneNumber, number_prefix, parse_phone
from otp_router.policy import Policy, Step
from otp_router.prices import SmsPrices
from otp_router.providers.base import Channel, SendRequest, StatusResult, SupportsLookup, route_name
from otp_router.store.base import (
    ConversionCheck,
    ConversionRule,
    LimitReached,
    RateLimit,
    Record,
    RecordExists,
    Store,
)

__all__ = ["OtpRouter", "ResendNotAllowed"]

log = logging.getLogger("otp_router")

#: Longest verification id accepted from a caller; ours have 24 or 34 characters.
_MAX_ID_LENGTH = 128

_T = TypeVar("_T")

#: True inside deadline handlers and deferred follow-up work: provider calls there are bounded.
_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("otp_router_background", default=False)

#: Compare-and-set retries before a write is reported as failed (heavy contention on one id).
_CAS_TRIES = 20
#: Seconds a provider call's outcome is held while the store is unreachable (well
#: inside the I/O lease, so no other process takes the attempt over meanwhile).
STORE_HOLD = IO_LEASE / 2

#: A stored record and its parsed state, passed along a chain of events so that
#: each step neither re-reads nor re-parses what the previous step just wrote.
_Snap = tuple[Record, VerificationState]


def _check_id(verification_id: object) -> str:
    """A caller's verification id, refused before it reaches the store if it cannot be one.

    Store keys must be valid UTF-8 (Redis and SQLite refuse lone surrogates with
    an encoding error, not a lookup miss), so this is an input error, never a 500.
    """
    return check_text(verification_id, name="verification id", max_length=_MAX_ID_LENGTH)


def _transient_reason(exc: ProviderTransientError) -> FallbackReason:
    """The fallback reason for a transient failure that ends a step.

    Only a call that never reached the provider was retried until the limit
    (``retries_exhausted``); a 5xx, a timeout or a dropped connection may have
    been acted on and is not repeated, and a long rate-limit wait is not
    waited out. Each gets its own reason so a dashboard tells them apart.
    """
    if isinstance(exc, ProviderRateLimited):
        return FallbackReason.RATE_LIMITED
    if exc.not_performed:
        return FallbackReason.RETRIES_EXHAUSTED
    if isinstance(exc, ProviderTimeout):
        return FallbackReason.TIMEOUT
    return FallbackReason.PROVIDER_ERROR


def _health_failure(exc: ProviderTransientError) -> bool:
    """Whether a transient failure says the provider as a whole is failing (circuit breaker input).

    A 5xx, a timeout, a refused or dropped connection and an unreadable answer
    do: every number would meet them. A rate limit (HTTP 429, ``FLOOD_WAIT``)
    does not: the provider answered, about our pace or about one number, and
    opening a channel-wide circuit on it would stop logins the provider would
    serve. Permanent errors (4xx refusals) never reach here.
    """
    return not isinstance(exc, ProviderRateLimited)


def _delivery(report: StatusResult) -> Delivery:
    """The core event for a provider's status report (webhook or poll)."""
    return Delivery(
        report.ref, report.state, report.cost, report.refunded, report.cost_is_final, at=report.updated_at
    )


def _lookup_of(channel: Channel) -> SupportsLookup | None:
    """The channel as a message lookup, or None when it cannot look messages up."""
    if isinstance(channel, InstrumentedChannel):
        return channel if channel.supports_lookup else None
    return channel if isinstance(channel, SupportsLookup) else None


def _sent_or_raise(verification: Verification) -> Verification:
    """What ``start()`` returns: the verification, unless no channel could send its code.

    Only ``failed`` raises: a verification that ended otherwise (verified,
    canceled, expired) was sent, and an idempotent repeat reports it as it is.
    """
    if verification.status is not Status.FAILED:
        return verification
    causes: dict[str, str] = {}
    for fallback in verification.fallbacks:
        # In the order tried; a channel tried twice keeps its first reason.
        causes.setdefault(fallback.from_channel, fallback.reason)
    summary = ", ".join(f"{channel}: {reason}" for channel, reason in causes.items()) or "no channel"
    raise AllProvidersFailed(
        f"no channel could send the code ({summary})",
        causes,
        verification_id=verification.id,
        verification=verification,
    )


class ResendNotAllowed(OtpRouterError):
    """A user-requested resend was refused by the policy.

    Args:
        message: Why.
        retry_after: Seconds until a resend would be accepted; None if never.
    """

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OtpRouter:
    """Send login codes Telegram-first with SMS fallback, and check them.

    Build it with :meth:`from_settings` (reads ``OTP_ROUTER_*``) or explicitly,
    and use it as an async context manager: it then owns its HTTP client and
    runs the deadline loop that performs fallbacks at step deadlines.

    Args:
        store: Where verifications, deadlines and the ledger live.
        channels: Adapters by route name (open names a policy's steps use:
            ``"telegram"``, ``"sms"``, ``"sms_backup"``, a user's own).
        settings: Code length/ttl, attempt limits, rate limits, public URL.
        policy: The routing workflow.
        prices: Price table, for the SMS-only comparison metric.
        metrics: Metrics sink (default: the process-wide Prometheus metrics).
        clock: Wall clock (Unix seconds); injectable for tests.
        http_client: A client this router owns and closes in :meth:`aclose`.
        run_deadlines: Whether ``async with`` starts the deadline loop.
    """

    def __init__(
        self,
        *,
        store: Store,
        channels: Mapping[str, Channel],
        settings: Settings | None = None,
        policy: Policy | None = None,
        prices: SmsPrices | None = None,
        metrics: Metrics | NullMetrics | None = None,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        run_deadlines: bool = True,
    ) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.policy = policy or Policy.load(
            self.settings.policy_file, routes={*self.settings.routes, *map(str, channels)}
        )
        self.prices = prices or SmsPrices.load(self.settings.prices_file)
        self.metrics = metrics if metrics is not None else get_metrics()
        self.channels: dict[str, Channel] = {
            route_name(name): InstrumentedChannel(channel, self.metrics) for name, channel in channels.items()
        }
        self.clock = clock
        self._http = http_client
        self._run_deadlines = run_deadlines
        self._secret: bytes | None = (
            self.settings.code_secret.get_secret_value().encode() if self.settings.code_secret else None
        )
        self._circuits = {name: self._breaker(name) for name in self.channels}
        for name in self._circuits:
            # Export "closed" from the start, so a healthy channel is visible on dashboards.
            self.metrics.circuit_state(name, int(CircuitState.CLOSED))
        self._background: set[asyncio.Task[None]] = set()
        #: Deadline handlers in flight (each also in ``_background``).
        self._deadline_tasks: set[asyncio.Task[None]] = set()
        self._deadline_slots = asyncio.Semaphore(self.settings.deadline_concurrency)
        self._learned = LearnedDeadlines()
        #: Clock time of the last latency refresh (None: never); see _resolve_auto().
        self._learned_at: float | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()

    # --- construction and lifetime --------------------------------------

    def _breaker(self, name: str) -> CircuitBreaker:
        def on_change(state: CircuitState) -> None:
            self.metrics.circuit_state(name, int(state))

        # The router's clock, not a monotonic one: a step refused by an open circuit
        # stores the moment to try again as a deadline, which is in this clock's time.
        return CircuitBreaker(
            failures=self.settings.circuit.failures,
            cooldown=self.settings.circuit.cooldown,
            clock=self.clock,
            on_change=on_change,
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> OtpRouter:
        """Build the router, its shared HTTP client, channels and store from settings.

        Raises:
            ConfigError: Settings are invalid or incomplete; the message names
                every such variable (:meth:`Settings.router_problems`).
        """
        from otp_router.http import create_http_client
        from otp_router.providers.registry import AdapterContext, build_channels
        from otp_router.store import open_store

        settings = settings or Settings.load(require_providers=True)
        problems = settings.router_problems()
        if problems:
            # Every missing credential at once, before anything is built or sent.
            raise ConfigError("invalid settings: " + "; ".join(problems))
        metrics = kwargs.pop("metrics", None) or get_metrics()
        prices = kwargs.pop("prices", None) or SmsPrices.load(settings.prices_file)
        client = create_http_client(settings.http)
        context = AdapterContext(client, prices, lambda provider: metrics.retry_hook(provider, "call"))
        channels = build_channels(settings.routes, settings, context)
        return cls(
            store=open_store(settings.store_url),
            channels=channels,
            settings=settings,
            prices=prices,
            metrics=metrics,
            http_client=client,
            **kwargs,
        )

    async def __aenter__(self) -> Self:
        await self.open()
        if self._run_deadlines:
            self._loop_task = asyncio.create_task(self.run_deadlines(), name="otp-router-deadlines")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Resolve the code secret (creating and storing one if none is configured)."""
        if self._secret is None:
            stored = await self.store.get_or_set_secret("code_secret", secrets.token_hex(32))
            log_event(
                log,
                logging.WARNING,
                "code_secret_from_store",
                hint="set OTP_ROUTER_CODE_SECRET in production: store contents alone must not reveal codes",
            )
            self._secret = stored.encode()
        if self._uses_auto():
            await self.refresh_latency()

    async def aclose(self) -> None:
        """Stop the deadline loop, wait for background reports, close owned resources."""
        self._stopping.set()
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        await self.wait_idle()
        for channel in self.channels.values():
            await channel.aclose()
        await self.store.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def refresh_latency(self) -> None:
        """Reload the shared latency estimate from the store (and drop cells too old to matter).

        :meth:`open` does it once, and :meth:`start` again in the background
        when the copy is older than ``latency_refresh`` seconds; a store error
        keeps the previous copy.
        """
        now = self.clock()
        self._learned_at = now
        try:
            cells = await self.store.latency_cells()
            stale = stale_cells(cells, now)
            if stale:
                # Any process may drop them: dropping is idempotent, and they weigh under 2**-32.
                await self.store.drop_latency(stale)
        except (StoreError, OSError) as exc:
            log_event(log, logging.WARNING, "latency_refresh_failed", error=type(exc).__name__)
            return
        self._learned.update(cells, now)

    async def wait_idle(self) -> None:
        """Wait for background work to finish: code reports, revokes, deadline handlers and
        the follow-ups of delivery reports (see :meth:`apply_report`)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            raise RuntimeError("call open() or use 'async with router' first")
        return self._secret

    # --- public API --------------------------------------------------------

    async def start(
        self,
        phone: str,
        *,
        idempotency_key: str | None = None,
        default_region: str | None = None,
        verification_id: str | None = None,
        locale: str | None = None,
    ) -> Verification:
        """Send a code to ``phone``: Telegram first, falling back as the policy says.

        Returns once a channel accepted the message: the result is always a
        verification whose code is on its way (``pending``) or already used.
        When every channel refused it, the failed verification is stored and
        :class:`AllProvidersFailed` is raised instead. ``created`` on the
        result tells a new verification from an idempotent repeat. Deadline
        fallbacks happen later, in the deadline loop.

        Args:
            phone: The number, international format unless ``default_region`` is given.
            idempotency_key: Same key, same verification: nothing is sent again.
            default_region: Region for national-format numbers.
            verification_id: The id to give a new verification, with an
                ``idempotency_key`` only: what a queue message carries, so the
                producer that enqueued it knows the id in advance (see
                :func:`otp_router.queue.enqueue`). A key already used keeps
                the id it was first given.
            locale: The user's language (BCP 47, e.g. ``fr-FR``): a voice step reads
                the code in it where the voice speaks it.

        Raises:
            InvalidPhoneNumber: Unparseable or invalid number (nothing sent or stored).
            UnsupportedCountry: The policy allows no channel for the number's country.
            UnsupportedNumberType: No channel may send to this type of number
                (premium rate, toll free, VoIP…; see ``Settings.fraud``).
            RateLimited: Too many starts for this number, prefix or country, or
                the conversion guard blocks its prefix or country (``scope`` says which).
            IdempotencyConflict: The key was used for another number.
            AllProvidersFailed: No channel could send the code (also for an
                idempotent repeat of such a start). The failed verification is
                stored; the exception carries its id and each channel's reason.
        """
        if default_region is not None:
            check_text(default_region, name="default_region", max_length=8)
        if locale is not None:
            check_text(locale, name="locale", max_length=35)
        number = parse_phone(phone, default_region=default_region)
        steps = self.policy.steps_for(number.region)
        steps = tuple(self._bind(s) for s in steps if s.channel in self.channels)
        if not steps:
            raise InputError(f"no configured channel can reach region {number.region}")
        steps = self._steps_for_type(number, steps)
        steps = self._resolve_auto(steps, number.region)
        now = self.clock()
        vid = self._new_id(idempotency_key, verification_id)
        nonce = new_nonce()
        code = derive_code(self.secret, vid, nonce, self.settings.code_length)
        state = new_state(
            verification_id=vid,
            phone=number.e164,
            region=number.region,
            code_digest=code_digest(self.secret, vid, code),
            code_nonce=nonce,
            steps=steps,
            now=now,
            code_ttl=self.settings.code_ttl,
            max_attempts=self.settings.max_attempts,
            max_resends=self.policy.max_resends,
            resend_cooldown=self.policy.resend_cooldown,
            settle_delay=self.settings.settle_delay,
            lookup_delays=self.settings.sms_lookup.delays,
            lookup_grace=self.settings.sms_lookup.grace,
            locale=locale,
        )
        # Created already in its first step's write-ahead phase (probing or sending):
        # one write fewer, and a crash right after it is recovered by the I/O lease.
        first = apply(state, Start(), now)
        limits, scopes = self._limits(number)
        rules = self._conversion_rules(number)
        fraud = self.settings.fraud
        conversion = (
            ConversionCheck(
                tuple(rules), fraud.conversion_window, fraud.block_cooldown, grace=fraud.conversion_grace
            )
            if rules
            else None
        )
        # One store round trip: the idempotent replay, the rate limits, the
        # conversion guard and the new record. A replay returns the stored
        # verification and counts nothing. Retry safety: a start that fails
        # after the limits were counted and is retried counts twice, which only
        # makes the limits stricter by one start.
        try:
            record, created = await self.store.create(
                vid,
                first.state.model_dump_json(),
                idempotency_key=idempotency_key,
                deadline=first.state.deadline,
                ledger=first.ledger,
                limits=limits,
                conversion=conversion,
                now=now,
            )
        except LimitReached as refused:
            raise self._refusal(refused, scopes, number) from None
        except RecordExists:
            # The deterministic id of an idempotency key whose store entry
            # expired (Redis keeps them a day): the verification is still there.
            existing = await self.store.get(vid) if idempotency_key is not None else None
            if existing is None:
                raise
            return _sent_or_raise(self._same_phone(existing, number.e164))
        if not created:
            return _sent_or_raise(self._same_phone(record, number.e164))
        self.metrics.verification_started(number.region)
        self.metrics.sms_only_cost(number.region, self.prices.sms(number.region))
        self._observe(state, first, now)
        _, latest = await self._carry_out(first, None, (record, first.state))
        self._wakeup.set()
        return _sent_or_raise(dataclasses.replace(Verification.from_state(latest), created=True))

    async def check(self, verification_id: str, code: str) -> CheckResult:
        """Check an entered code.

        Returns:
            ``valid``; ``invalid`` with attempts left; ``expired``;
            ``too_many_attempts``; or ``not_found`` for an unknown id.

        Raises:
            InvalidCode: The code is not all digits or has the wrong length
                (no attempt is used up, nothing is written).
        """
        _check_id(verification_id)
        entered = validate_code(code, self.settings.code_length)
        record = await self.store.get(verification_id)
        if record is None:
            self.metrics.code_check(CheckOutcome.NOT_FOUND)
            return CheckResult(verification_id, CheckOutcome.NOT_FOUND, 0, None)
        state = VerificationState.model_validate_json(record.data)
        matches = codes_match(self.secret, verification_id, entered, state.code_digest)
        transition, (_, latest) = await self._feed(
            verification_id, CodeEntered(matches), snap=(record, state), entered_code=entered
        )
        checked = next(e for e in transition.effects if isinstance(e, Checked))
        if any(isinstance(e, Finished) and e.status is Status.VERIFIED for e in transition.effects):
            await self._count_verified(latest)
        return CheckResult(
            verification_id, checked.outcome, checked.attempts_left, Verification.from_state(latest)
        )

    async def get(self, verification_id: str) -> Verification:
        """The current state of a verification.

        Raises:
            VerificationNotFound: Unknown id.
            InputError: Not an id at all (control characters, too long, not a string).
        """
        return Verification.from_state(await self._load(_check_id(verification_id)))

    async def cancel(self, verification_id: str) -> Verification:
        """Give up on a verification (an undelivered Telegram message is revoked)."""
        _, (_, latest) = await self._feed(_check_id(verification_id), Cancel())
        return Verification.from_state(latest)

    async def resend(self, verification_id: str) -> Verification:
        """The user did not get the code: move to the next channel (or repeat the last).

        Raises:
            ResendNotAllowed: Too soon, no resends left, or the verification is over.
        """
        transition, (_, latest) = await self._feed(_check_id(verification_id), Resend())
        refused = [e for e in transition.effects if isinstance(e, ResendRefused)]
        if refused:
            raise ResendNotAllowed(refused[0].reason, refused[0].retry_after)
        return Verification.from_state(latest)

    async def apply_report(self, verification_id: str, report: StatusResult) -> bool:
        """Apply a provider delivery report (webhook). Returns False for a duplicate.

        Returns as soon as the report is stored. What it sets off (a fallback
        probe or send after a failed delivery, a revoke) runs afterwards in a
        task of the router's own, so a slow provider never slows the webhook's
        answer; :meth:`wait_idle` waits for it and :meth:`aclose` does too.

        Raises:
            VerificationNotFound: Unknown id.
        """
        transition, _ = await self._feed(_check_id(verification_id), _delivery(report), defer=True)
        return transition.changed

    async def ledger_total(self, verification_id: str | None = None) -> Decimal:
        """Net cost booked in the ledger, for one verification or all."""
        return sum((e.amount for e in await self.store.ledger(verification_id)), Decimal(0))

    # --- deadlines ------------------------------------------------------------

    async def fire_due(self, *, limit: int = 200) -> int:
        """Claim every due deadline (up to ``limit``), handle them concurrently and wait for all.

        Returns:
            How many were claimed.
        """
        tasks = await self._claim_due(limit)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _claim_due(self, limit: int) -> list[asyncio.Task[None]]:
        """Claim up to ``limit`` due deadlines and start one task per deadline.

        Each handler runs on its own, at most ``deadline_concurrency`` at once,
        and each provider call inside it is bounded by ``deadline_call_timeout``:
        one hanging provider call delays its own verification only. The claim
        lease outlasts a handler's first write (one bounded call away), so no
        other process takes a deadline that is still being handled.
        """
        now = self.clock()
        lease = max(30.0, 2 * self.settings.deadline_call_timeout)
        due = await self.store.claim_due(now, limit=limit, lease=lease)
        tasks = []
        for vid in due:
            task = asyncio.create_task(self._handle_deadline(vid, now))
            self._background.add(task)
            self._deadline_tasks.add(task)
            task.add_done_callback(self._deadline_done)
            tasks.append(task)
        return tasks

    def _deadline_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        self._deadline_tasks.discard(task)
        # A slot is free: the loop may claim more.
        self._wakeup.set()

    async def _handle_deadline(self, vid: str, claimed_at: float) -> None:
        _BACKGROUND.set(True)  # this task's own context: bounds its provider calls
        async with self._deadline_slots:
            await self._on_deadline(vid, claimed_at)

    async def run_deadlines(self, *, poll_interval: float = 1.0) -> None:
        """Fire deadlines until :meth:`aclose`. Every process may run this loop:
        the store hands each deadline to exactly one of them.

        The loop never waits for a handler: it claims as many due deadlines as
        there are free slots (``deadline_concurrency``), starts them, and goes
        back to claiming, so a slow one never holds back the rest.
        """
        while not self._stopping.is_set():
            self._wakeup.clear()
            free = self.settings.deadline_concurrency - len(self._deadline_tasks)
            if free <= 0:
                # Nothing can be claimed until a handler finishes (and sets the wakeup): no store calls.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=poll_interval)
                continue
            nxt: float | None = None
            try:
                batch = min(free, 200)
                if len(await self._claim_due(batch)) == batch:
                    continue  # perhaps more are due
                nxt = await self.store.next_deadline()
            except (StoreError, OSError) as exc:
                log_event(log, logging.WARNING, "deadline_loop_store_error", error=type(exc).__name__)
            wait = poll_interval if nxt is None else min(poll_interval, max(0.0, nxt - self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(wait, 0.005))

    async def _on_deadline(self, vid: str, claimed_at: float) -> None:
        with bind(verification=vid):
            await self._deadline_bound(vid, claimed_at)

    async def _deadline_bound(self, vid: str, claimed_at: float) -> None:
        try:
            record = await self.store.get(vid)
            if record is None:
                return
            state = VerificationState.model_validate_json(record.data)
            snap: _Snap = (record, state)
            if state.deadline is not None:
                self.metrics.deadline_fired(max(0.0, claimed_at - state.deadline))
            cur = state.current
            if (
                # With a public URL, delivery reports arrive by webhook (Telegram retries a
                # failed one up to 10 times); without one, ask the provider at the deadline.
                not self.settings.public_url
                and state.status is Status.PENDING
                and cur is not None
                and cur.ref is not None
                and cur.delivered_at is None
                and state.deadline is not None
                and (cur.sent_at or 0) + state.steps[cur.step].deliver_within <= self.clock()
            ):
                snap = await self._poll(snap, cur.channel, cur.ref)
            await self._feed(vid, DeadlineReached(), snap=snap, force_write=True)
        except Exception:  # the loop must survive any single verification's failure
            log_event(log, logging.ERROR, "deadline_failed", exc_info=True)

    async def _poll(self, snap: _Snap, channel_name: str, ref: str) -> _Snap:
        """Read a message's status from its provider and apply it as a delivery report."""
        channel = self.channels.get(channel_name)
        if channel is None:
            return snap
        try:
            report = await self._bounded(channel.status(ref), channel.provider)
        except ProviderError as exc:
            log_event(log, logging.INFO, "status_poll_failed", channel=channel_name, error=type(exc).__name__)
            return snap
        _, latest = await self._feed(snap[1].id, _delivery(report), snap=snap)
        return latest

    # --- the event loop of one verification ------------------------------------

    async def _load(self, vid: str) -> VerificationState:
        record = await self.store.get(vid)
        if record is None:
            raise VerificationNotFound(f"no verification with id {vid!r}")
        return VerificationState.model_validate_json(record.data)

    async def _feed(
        self,
        vid: str,
        event: Event,
        *,
        snap: _Snap | None = None,
        entered_code: str | None = None,
        force_write: bool = False,
        defer: bool = False,
        hold: bool = False,
    ) -> tuple[Transition, _Snap]:
        """Apply ``event`` with compare-and-set, then carry out the effects.

        Args:
            vid: Verification id.
            event: What happened.
            snap: The record and its parsed state, when the caller already has
                them (saves a read and a parse; a stale one only costs a CAS retry).
            entered_code: The code being checked, for the report to Telegram.
            force_write: Write even when nothing changed (restores a claimed deadline).
            defer: Carry out the effects in a background task (:meth:`_follow_up`)
                and return right after the write.
            hold: ``event`` is a provider call's outcome: wait out a store outage
                (bounded) instead of losing it (see :meth:`_cas`).

        Returns:
            The transition of ``event`` itself, and the newest record and state
            known after its effects (and their follow-up events) were carried out
            (with ``defer``: the state just written).
        """
        for _ in range(_CAS_TRIES):
            if snap is None:
                record = await self.store.get(vid)
                if record is None:
                    raise VerificationNotFound(f"no verification with id {vid!r}")
                snap = (record, VerificationState.model_validate_json(record.data))
            record, before = snap
            now = self.clock()
            transition = apply(before, event, now)
            if not transition.changed and not force_write:
                self._observe(before, transition, now)
                return transition, snap
            try:
                written = await self._cas(vid, record.version, transition, hold=hold)
            except ConcurrentUpdate:
                # Someone else changed it: re-apply the event to the fresh state.
                snap = None
                continue
            self._observe(before, transition, now)
            if defer:
                self._follow_up(transition, (written, transition.state))
                return transition, (written, transition.state)
            return transition, await self._carry_out(transition, entered_code, (written, transition.state))
        raise StoreError(f"verification {vid!r} is changing too fast to update")

    async def _cas(self, vid: str, version: int, t: Transition, *, hold: bool) -> Record:
        """Compare-and-set ``t``; with ``hold``, retry through a store outage for up to ``STORE_HOLD`` s.

        The outcome of a provider call (a probe's request_id and charge, a
        send's reference) exists only in memory until written. Raising at once
        would leave the attempt in its write-ahead phase until its I/O lease
        runs out (a minute of a user waiting for a code that is already on its
        way). Retrying the same compare-and-set is safe: if an earlier try was
        applied and only its answer was lost, the version has moved on and the
        retry fails with ConcurrentUpdate, the caller re-reads, and re-applying
        the event to a state that already holds it changes nothing (ledger keys
        are deterministic, so nothing is booked twice).
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + (STORE_HOLD if hold else 0.0)
        pause = 0.05
        while True:
            try:
                return await self.store.cas(
                    vid, version, t.state.model_dump_json(), deadline=t.state.deadline, ledger=t.ledger
                )
            except ConcurrentUpdate:
                raise
            except StoreError as exc:
                if loop.time() + pause > until:
                    raise
                if pause == 0.05:
                    log_event(
                        log, logging.WARNING, "store_unavailable_holding_outcome", error=type(exc).__name__
                    )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _observe(self, before: VerificationState, t: Transition, now: float) -> None:
        state = t.state
        for effect in t.effects:
            match effect:
                case FellBack():
                    to = str(effect.to_channel) if effect.to_channel else "none"
                    self.metrics.fallback(str(effect.from_channel), to, effect.reason.value)
                case Finished(status=status):
                    channel = str(state.channel) if state.channel else "none"
                    self.metrics.verification_finished(status.value, channel, state.region)
                    if status is Status.VERIFIED:
                        self.metrics.time_to_verify(channel, now - state.created_at)
                case CodeDelivered():
                    self.metrics.time_to_code(str(effect.channel), effect.seconds, state.region)
                case Checked():
                    self.metrics.code_check(effect.outcome.value)
                case _:
                    pass
        for entry in t.ledger:
            self.metrics.cost(entry.channel, entry.region, entry.amount)
        old = {a.step: a.delivery for a in before.attempts}
        for attempt in state.attempts:
            if attempt.delivery is not None and old.get(attempt.step) != attempt.delivery:
                self.metrics.delivery(str(attempt.channel), attempt.delivery.value)
        # Counted on the one written transition that makes the verification pay
        # twice (a replayed event that lost its CAS race is not observed twice).
        twice = paid_twice(state)
        if twice is not None:
            was = paid_twice(before)
            extra = twice.extra - (was.extra if was is not None else Decimal(0))
            if was is None or extra > 0:
                self.metrics.paid_twice(state.region, extra, new_user=was is None)

    async def _carry_out(self, t: Transition, entered_code: str | None, snap: _Snap) -> _Snap:
        """Perform the effects of a written transition; returns the newest snapshot.

        The verification's id and region are bound to every log line of the
        effects (and of the tasks they start), once, here.
        """
        with bind(verification=snap[1].id, region=snap[1].region):
            return await self._carry_out_effects(t, entered_code, snap)

    async def _carry_out_effects(self, t: Transition, entered_code: str | None, snap: _Snap) -> _Snap:
        for effect in t.effects:
            match effect:
                case Probe():
                    snap = await self._probe(snap, effect)
                case Send():
                    snap = await self._send(snap, effect)
                case Settle():
                    snap = await self._poll(snap, effect.channel, effect.ref)
                case Lookup():
                    snap = await self._lookup(snap, effect)
                case Revoke():
                    self._spawn(self._revoke(effect))
                case LatencyObserved():
                    self._spawn(self._record_latency(snap[1].region, effect))
                case ReportCode() if entered_code is not None:
                    self._spawn(self._report_code(effect, entered_code))
                case _:
                    pass
        return snap

    def _follow_up(self, t: Transition, snap: _Snap) -> None:
        """Carry out a stored transition's effects in a task of the router's own.

        For delivery reports: a webhook is answered once its report is stored,
        and the fallback probe or send the report sets off runs here, outside
        the request (a slow Twilio inside it would make Telegram's webhook slow
        and Telegram retry it). The task is tracked in ``_background`` and
        awaited by :meth:`aclose`; like a deadline handler it takes a slot of
        ``deadline_concurrency`` and every provider call in it is bounded.

        Crash safety: the transition already written put the next step in its
        write-ahead phase (probing or sending), whose deadline is the I/O
        lease. If this process dies before or during the task, nothing is lost
        and nothing is sent twice: when the lease runs out, the deadline loop
        of any process picks the verification up and resumes the step exactly
        as after a crash in the middle of :meth:`start` (same Telegram
        ``request_id``; an SMS that may have left is not sent blindly again).
        """
        if not t.effects:
            return
        crash_point("webhook.applied")
        self._spawn(self._run_follow_up(t, snap))

    async def _run_follow_up(self, t: Transition, snap: _Snap) -> None:
        _BACKGROUND.set(True)  # this task's own context: bounds its provider calls
        async with self._deadline_slots:
            try:
                await self._carry_out(t, None, snap)
            except Exception:  # a store or provider failure: the stored deadline takes over
                log_event(log, logging.ERROR, "report_follow_up_failed", exc_info=True)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _probe(self, snap: _Snap, effect: Probe) -> _Snap:
        channel = self.channels[effect.channel]
        with bind(channel=effect.channel, provider=channel.provider):
            return await self._probe_bound(snap, effect)

    async def _probe_bound(self, snap: _Snap, effect: Probe) -> _Snap:
        state = snap[1]
        channel, circuit = self.channels[effect.channel], self._circuits[effect.channel]
        event: Event
        if not circuit.allow():
            retry_at = self._circuit_retry_at(state, circuit)
            event = ProbeFailed(effect.step, FallbackReason.CIRCUIT_OPEN, retry_at=retry_at)
        else:
            crash_point("probe")
            try:
                result = await self._bounded(channel.probe(state.phone), channel.provider)
            except ProviderPermanentError as exc:
                circuit.success()
                event = ProbeFailed(effect.step, FallbackReason.PERMANENT_ERROR, exc.code or exc.reason)
            except ProviderTransientError as exc:
                self._count_health(circuit, exc)
                event = ProbeFailed(effect.step, _transient_reason(exc), exc.code or exc.reason)
            else:
                crash_point("probe.answered")
                circuit.success()
                if result.remaining_balance is not None:
                    self.metrics.telegram_balance(result.remaining_balance)
                if not result.reachable:
                    self.metrics.send(str(effect.channel), channel.provider, "unreachable", state.region)
                event = ProbeDone(effect.step, result.reachable, result.ref, result.cost, result.reason)
        _, latest = await self._feed(state.id, event, snap=snap, hold=True)
        return latest

    async def _send(self, snap: _Snap, effect: Send) -> _Snap:
        channel = self.channels[effect.channel]
        with bind(channel=effect.channel, provider=channel.provider):
            return await self._send_bound(snap, effect)

    async def _send_bound(self, snap: _Snap, effect: Send) -> _Snap:
        state = snap[1]
        channel, circuit = self.channels[effect.channel], self._circuits[effect.channel]
        request = SendRequest(
            phone=state.phone,
            code=derive_code(self.secret, state.id, state.code_nonce, self.settings.code_length),
            ttl=effect.ttl,
            probe_ref=effect.probe_ref,
            callback_url=self._callback_url(effect.channel, state.id),
            payload=state.id,
            attempt=effect.attempt,
            region=state.region,
            locale=state.locale,
        )
        event: Event
        outcome = "failed"
        if not circuit.allow():
            # Refused before any I/O: nothing was sent, so the step may wait and send afresh.
            retry_at = self._circuit_retry_at(state, circuit)
            event = SendFailed(effect.step, FallbackReason.CIRCUIT_OPEN, retry_at=retry_at)
        else:
            crash_point(f"send.{effect.channel}")
            try:
                result = await self._bounded(channel.send(request), channel.provider)
                crash_point(f"send.{effect.channel}.accepted")
            except ProviderTransientError as exc:
                self._count_health(circuit, exc)
                event = await self._unconfirmed_send(effect, exc, channel, request)
                outcome = "accepted" if isinstance(event, SendOk | SendUnconfirmed) else "failed"
            except MessageAlreadySent as exc:
                circuit.success()
                event = self._already_sent(effect, request, exc)
                outcome = "accepted" if isinstance(event, SendOk) else "rejected"
            except ProviderPermanentError as exc:
                circuit.success()
                outcome = "unreachable" if isinstance(exc, InvalidRecipient) else "rejected"
                event = SendFailed(effect.step, FallbackReason.PERMANENT_ERROR, exc.code or exc.reason)
            else:
                circuit.success()
                outcome = "accepted"
                if result.remaining_balance is not None:
                    self.metrics.telegram_balance(result.remaining_balance)
                event = SendOk(effect.step, result.ref, result.cost, estimate=result.cost_is_estimate)
        self.metrics.send(str(effect.channel), channel.provider, outcome, state.region)
        _, latest = await self._feed(state.id, event, snap=snap, hold=True)
        return latest

    @staticmethod
    def _count_health(circuit: CircuitBreaker, exc: ProviderTransientError) -> None:
        """Feed a transient failure to the channel's circuit: a failure only if provider-wide."""
        if _health_failure(exc):
            circuit.failure()
        else:
            circuit.success()  # an answer (rate limit): the provider is up

    def _circuit_retry_at(self, state: VerificationState, circuit: CircuitBreaker) -> float | None:
        """When a step refused by an open circuit may try again; None once its wait bound is spent.

        The bound is ``circuit.max_wait`` seconds from the step's start; the
        core also never waits past the code's expiry (see ``AttemptPhase.WAITING``).
        """
        cur = state.current
        now = self.clock()
        at = now + max(circuit.retry_in(), 0.05)
        if cur is None or at - cur.started_at > self.settings.circuit.max_wait:
            return None
        log.info(
            "circuit open: verification %s step %d waits %.1f s for %s",
            state.id,
            cur.step,
            at - now,
            cur.channel,
        )
        return at

    async def _unconfirmed_send(
        self, effect: Send, exc: ProviderTransientError, channel: Channel, request: SendRequest
    ) -> Event:
        """A send failed in a way that may or may not have sent the message.

        With a probe ``request_id`` (Telegram) the answer is certain: re-issue the
        send with the same id. Telegram allows one message per id, so either this
        one goes out (the first never did) or it answers ``MESSAGE_ALREADY_SENT``
        (the first did). Without such an id (SMS) we cannot know, so we assume it
        may have been sent: no second message and no fallback to another channel
        (which would also be a second code). The verification stays pending so a
        code that did arrive still verifies; the user can ask for a resend.
        """
        if exc.not_performed:
            return SendFailed(effect.step, _transient_reason(exc), exc.code or exc.reason)
        if request.probe_ref is not None:
            try:
                result = await self._bounded(channel.send(request), channel.provider)
            except MessageAlreadySent as again:
                return self._already_sent(effect, request, again)
            except ProviderError as again:
                reason = (
                    _transient_reason(again)
                    if isinstance(again, ProviderTransientError)
                    else FallbackReason.PERMANENT_ERROR
                )
                return SendFailed(effect.step, reason, again.code or again.reason)
            return SendOk(effect.step, result.ref, result.cost, estimate=result.cost_is_estimate)
        if _lookup_of(channel) is not None and self.settings.sms_lookup.delays:
            # Not re-sent here: the deadline loop first asks the provider whether the
            # message exists (Lookup effects), and sends again only once it provably does not.
            return SendUnconfirmed(effect.step)
        return SendOk(effect.step, None, None)

    @staticmethod
    def _already_sent(effect: Send, request: SendRequest, exc: MessageAlreadySent) -> Event:
        """The provider already sent a message under this request's id.

        The id is ours (from our probe), and only this step of this verification
        sends with it, so the message that went out is this step's own: an earlier
        send that the process did not live to record, or one whose answer was
        lost. The step is sent; wait for its delivery like any other (a fallback
        now would make the user pay twice). Its fee was booked with the probe.
        """
        if request.probe_ref is None:
            # Without an id of ours the answer cannot be about our message.
            return SendFailed(effect.step, FallbackReason.PERMANENT_ERROR, exc.code or exc.reason)
        return SendOk(effect.step, request.probe_ref, None)

    async def _bounded(self, call: Awaitable[_T], provider: str) -> _T:
        """In deadline and follow-up work, await one provider call for at most ``deadline_call_timeout``.

        Giving up is a :class:`ProviderTimeout` that may have been performed,
        exactly like a read timeout of the HTTP client: a send cut off here is
        resolved as an ambiguous send (the same request id for Telegram, never
        a blind second SMS), a poll cut off here just did not answer. Calls made
        for a caller of :meth:`start` keep the adapters' own limits.
        """
        if not _BACKGROUND.get():
            return await call
        try:
            return await asyncio.wait_for(call, self.settings.deadline_call_timeout)
        except TimeoutError:
            raise ProviderTimeout(
                f"{provider}: no answer within {self.settings.deadline_call_timeout:g} s",
                provider=provider,
                not_performed=False,
            ) from None

    async def _record_latency(self, region: str, effect: LatencyObserved) -> None:
        """Add one delivery outcome to the shared estimate: one increment, no read.

        Carried out after the write that recorded the delivery, so a crash in
        between loses this one observation (a blur, not an error), and a
        replayed report cannot count it twice (the stored state already has it).
        """
        cell, weight = observation(str(effect.channel), region, effect.seconds, effect.at)
        try:
            await self.store.add_latency(cell, weight)
        except (StoreError, OSError) as exc:
            log_event(log, logging.INFO, "latency_observation_lost", error=type(exc).__name__)

    def _uses_auto(self) -> bool:
        """Whether any workflow step (default or a country's) has a learned deadline."""
        steps = list(self.policy.steps)
        for rule in self.policy.countries.values():
            steps += rule.steps.values()
        return any(step.auto is not None for step in steps)

    def _resolve_auto(self, steps: tuple[Step, ...], region: str) -> tuple[Step, ...]:
        """``steps`` with learned deadlines in place of ``auto``, from the in-process copy (no I/O).

        Starts a background refresh of that copy when it is older than
        ``latency_refresh``, so the hot path never waits for the store.
        """
        if all(step.auto is None for step in steps):
            return steps
        now = self.clock()
        if self._learned_at is None or now - self._learned_at >= self.settings.latency_refresh:
            # Marked now, so concurrent starts spawn one refresh, not one each.
            self._learned_at = now
            self._spawn(self.refresh_latency())
        resolved = self._learned.resolve(steps, region, self.policy, self.prices)
        for step, chosen in zip(steps, resolved, strict=True):
            if step.auto is not None:
                self.metrics.learned_deadline(str(chosen.channel), region, chosen.deliver_within)
        return resolved

    async def _lookup(self, snap: _Snap, effect: Lookup) -> _Snap:
        """Ask the provider whether an ambiguous send created its message; feed the answer."""
        state = snap[1]
        channel = self.channels.get(effect.channel)
        lookup = _lookup_of(channel) if channel is not None else None
        event: LookupDone
        if channel is None or lookup is None:
            event = LookupDone(effect.step, None, certain=False)
        else:
            try:
                # A lookup runs in the deadline loop: bounded like any call made there.
                found = await self._bounded(lookup.find_sent(state.phone, effect.since), channel.provider)
            except ProviderError as exc:
                # Still unknown: the core looks again later, or leaves the attempt as it is.
                event = LookupDone(effect.step, None, certain=False)
                log_event(log, logging.INFO, "message_lookup_failed", error=type(exc).__name__)
            else:
                if found is None:
                    event = LookupDone(effect.step, None, certain=True)
                else:
                    event = LookupDone(
                        effect.step, found.ref, True, found.state, found.cost, found.cost_is_final
                    )
        outcome = "found" if event.ref else ("absent" if event.certain else "unknown")
        log_event(
            log,
            logging.INFO,
            "message_lookup",
            verification=state.id,
            channel=effect.channel,
            step=effect.step,
            outcome=outcome,
        )
        _, latest = await self._feed(state.id, event, snap=snap)
        return latest

    async def _revoke(self, effect: Revoke) -> None:
        with contextlib.suppress(ProviderError):
            await self.channels[effect.channel].revoke(effect.ref)

    async def _report_code(self, effect: ReportCode, code: str) -> None:
        # Best effort: Telegram's conversion statistics, never a reason to fail a check.
        with contextlib.suppress(ProviderError):
            await self.channels[effect.channel].report_code(effect.ref, code)

    def _callback_url(self, channel: str, vid: str) -> str | None:
        """The adapter's delivery-report URL under the public base (None: the router polls)."""
        base = self.settings.public_url
        if not base:
            return None
        make: Callable[[str, str], str | None] | None = getattr(self.channels[channel], "callback_url", None)
        return make(base, vid) if make is not None else None

    # --- helpers -------------------------------------------------------------

    def _new_id(self, idempotency_key: str | None, given: str | None = None) -> str:
        if idempotency_key is None:
            if given is not None:
                # Without a key, a second start with this id could not find the first one.
                raise InputError("verification_id needs an idempotency_key")
            return random_id()
        check_text(idempotency_key, name="idempotency_key", max_length=200)
        if given is not None:
            if not is_verification_id(given):
                raise InputError("verification_id must look like v_ and 16 to 64 of A-Z a-z 0-9 _ -")
            return given
        # Deterministic id: a repeated key finds the first verification with one read.
        return keyed_id(self.secret, idempotency_key)

    def _same_phone(self, record: Record, e164: str) -> Verification:
        state = VerificationState.model_validate_json(record.data)
        if state.phone != e164:
            raise IdempotencyConflict("idempotency_key was already used for another phone number")
        return Verification.from_state(state)

    def _bind(self, step: Step) -> Step:
        """``step`` with the provider and capabilities of the channel configured for its route.

        The stored verification keeps them, so its crash recovery follows what
        the adapter that sent it can do. A ttl outside the adapter's range is
        brought into it (the adapter would clamp it anyway).
        """
        channel = self.channels[step.channel]
        caps = channel.capabilities
        if step.provider == channel.provider and step.caps == caps:
            return step
        return dataclasses.replace(step, provider=channel.provider, caps=caps, ttl=caps.clamp_ttl(step.ttl))

    def _steps_for_type(self, number: PhoneNumber, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        """The steps whose channel may send to this type of number (toll-fraud policy).

        Raises:
            UnsupportedNumberType: No step is left; nothing was sent or stored.
        """
        fraud = self.settings.fraud
        allowed = tuple(s for s in steps if number.number_type in fraud.number_types_for(str(s.channel)))
        if not allowed:
            self.metrics.fraud_block("number_type")
            raise UnsupportedNumberType(
                f"{number.number_type} numbers are not sent codes (region {number.region})",
                number_type=number.number_type,
            )
        return allowed

    def _hashed(self, kind: str, value: str) -> str:
        # Keyed hash: limit keys must not put phone numbers (or their prefixes) in the store's key space.
        return f"{kind}:" + hashlib.sha256(self.secret + value.encode()).hexdigest()[:32]

    def _limits(self, number: PhoneNumber) -> tuple[list[RateLimit], dict[str, str]]:
        """The velocity limits of a start, in the order they are checked, and each key's scope."""
        limits = self.settings.limits
        out: list[RateLimit] = []
        scopes: dict[str, str] = {}
        if limits.per_phone:
            key = self._hashed("phone", number.e164)
            out.append(RateLimit(key, limits.per_phone, limits.per_phone_window))
            scopes[key] = "phone"
        if limits.per_prefix:
            # SMS pumping walks through one operator range: many numbers, one prefix.
            key = self._hashed("prefix", number_prefix(number, self.settings.fraud.prefix_digits))
            out.append(RateLimit(key, limits.per_prefix, limits.per_prefix_window))
            scopes[key] = "prefix"
        if limits.per_country:
            key = f"country:{number.region}"
            out.append(RateLimit(key, limits.per_country, limits.per_country_window))
            scopes[key] = "country"
        return out, scopes

    def _conversion_rules(self, number: PhoneNumber) -> list[ConversionRule]:
        """The conversion guard's rules for a number: its prefix, then its country."""
        fraud = self.settings.fraud
        if not fraud.min_conversion:
            return []
        rules = []
        if fraud.prefix_min_started:
            key = self._hashed("conv-prefix", number_prefix(number, fraud.prefix_digits))
            rules.append(ConversionRule(key, fraud.prefix_min_started, fraud.min_conversion))
        if fraud.country_min_started:
            key = f"conv-country:{number.region}"
            rules.append(ConversionRule(key, fraud.country_min_started, fraud.min_conversion))
        return rules

    def _refusal(self, refused: LimitReached, scopes: Mapping[str, str], number: PhoneNumber) -> RateLimited:
        """The error for a start the store refused: a velocity limit or the conversion guard.

        The conversion guard judges and counts in the same store call as the
        limits, so many workers share one view and a refused start is not
        counted. A replay of a stored verification returns before any of it.
        """
        region, wait = number.region, refused.retry_after
        scope = scopes.get(refused.key)
        if scope is not None:
            self.metrics.rate_limited(scope)
            if scope == "phone":
                return RateLimited("too many codes for this number", retry_after=wait, scope=scope)
            if scope == "prefix":
                message = f"too many codes for this number's prefix (region {region})"
                return RateLimited(message, retry_after=wait, scope=scope)
            return RateLimited(f"too many codes for region {region}", retry_after=wait, scope=scope)
        by_prefix = refused.key.startswith("conv-prefix:")
        scope = "prefix_conversion" if by_prefix else "country_conversion"
        self.metrics.fraud_block(scope)
        what = "this number's prefix" if by_prefix else "this country"
        log_event(
            log, logging.WARNING, "conversion_guard_refused", scope=scope, region=region, retry_after_s=wait
        )
        return RateLimited(
            f"too few verifications complete for {what} (region {region}): suspected SMS pumping",
            retry_after=wait,
            scope=scope,
        )

    async def _count_verified(self, state: VerificationState) -> None:
        """Count a verified code for the conversion guard of its prefix and country.

        Best effort: the verification is already stored as verified, and a lost
        count only makes the guard slightly stricter for that prefix.
        """
        try:
            rules = self._conversion_rules(parse_phone(state.phone))
            if rules:
                window = self.settings.fraud.conversion_window
                await self.store.conversion_verified([r.key for r in rules], window=window, now=self.clock())
        except (StoreError, OSError, InputError) as exc:
            log_event(log, logging.WARNING, "conversion_count_failed", error=type(exc).__name__)

    @property
    def circuits(self) -> Mapping[str, CircuitState]:
        """Current circuit state per channel."""
        return {name: breaker.state for name, breaker in self._circuits.items()}
