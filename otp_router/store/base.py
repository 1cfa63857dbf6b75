"""The storage protocol: verification records, deadlines, ledger, limits.

A store keeps each verification as an opaque JSON document with a version
number. Every change is a compare-and-set on that version, so two processes
applying events to one verification never both win: the loser gets
:class:`~otp_router.errors.ConcurrentUpdate`, reloads and re-applies.

Cost ledger entries are written *in the same atomic step* as the state change
that caused them, so a crash can never leave a charge recorded without its
state (or the reverse), and each entry has a unique key so a replayed event
never books a cost twice.

Deadlines: at most one per verification. :meth:`Store.claim_due` hands each
due deadline to exactly one caller by pushing it forward by a lease; the
caller then reschedules or clears it with its CAS write. A caller that dies
mid-way loses its lease and the deadline fires again after the lease, where
the version check makes the retry harmless.

Latency cells: named float counters that every process adds to, for the
learned delivery-latency estimate (:mod:`otp_router.latency`). Adding is one
atomic increment with no read, so concurrent writers never lose an update.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from otp_router.errors import OtpRouterError, StoreError

__all__ = [
    "ConversionCheck",
    "ConversionRule",
    "LedgerEntry",
    "LedgerKind",
    "LimitReached",
    "RateLimit",
    "Record",
    "RecordExists",
    "Store",
]


class LedgerKind(enum.StrEnum):
    """What a ledger entry books."""

    CHARGE = "charge"  # a final, provider-confirmed cost
    ESTIMATE = "estimate"  # provisional cost (SMS before its price is known)
    REFUND = "refund"  # negative amount: Telegram refund, or an estimate replaced by the real price


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One line of the cost ledger.

    Attributes:
        key: Unique key; adding an entry whose key exists is a no-op.
        verification_id: The verification it belongs to.
        channel: ``telegram`` or ``sms``.
        provider: ``telegram`` or ``twilio``.
        region: ISO region of the number (for cost by country).
        kind: Charge, estimate or refund.
        amount: Signed amount (refunds are negative).
        currency: ISO 4217.
        at: Unix time.
    """

    key: str
    verification_id: str
    channel: str
    provider: str
    region: str
    kind: LedgerKind
    amount: Decimal
    currency: str
    at: float


@dataclass(frozen=True, slots=True)
class Record:
    """A stored verification document and its version."""

    id: str
    version: int
    data: str


@dataclass(frozen=True, slots=True)
class ConversionRule:
    """A conversion guard on one key (a number prefix or a country).

    Attributes:
        key: What is counted, e.g. ``"conv-country:GB"``.
        min_started: Starts in the window before the ratio is judged (at least 1).
        min_ratio: Verified ÷ started below which the key is blocked.
    """

    key: str
    min_started: int
    min_ratio: float


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A sliding-window limit checked and counted by :meth:`Store.create` (as :meth:`Store.hit` does).

    Attributes:
        key: What is counted, e.g. ``"phone:<keyed hash>"``.
        limit: Events allowed per window (at least 1).
        window: Window length in seconds.
    """

    key: str
    limit: int
    window: float


@dataclass(frozen=True, slots=True)
class ConversionCheck:
    """A conversion-guard start for :meth:`Store.create` (see :meth:`Store.conversion_start`)."""

    rules: tuple[ConversionRule, ...]
    window: float
    cooldown: float
    grace: float = 0.0


class LimitReached(OtpRouterError):
    """:meth:`Store.create` refused: a rate limit or the conversion guard said no.

    Attributes:
        key: The refusing :class:`RateLimit` or :class:`ConversionRule` key.
        retry_after: Seconds until that key would accept again.
    """

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__("a rate limit or the conversion guard refused the start")
        self.key = key
        self.retry_after = retry_after


class RecordExists(StoreError):
    """:meth:`Store.create` found a record with the new id (and no idempotency key naming it)."""


@runtime_checkable
class Store(Protocol):
    """Durable state shared by the library, the worker and webhook handlers."""

    async def create(
        self,
        record_id: str,
        data: str,
        *,
        idempotency_key: str | None = None,
        deadline: float | None = None,
        ledger: Sequence[LedgerEntry] = (),
        limits: Sequence[RateLimit] = (),
        conversion: ConversionCheck | None = None,
        now: float | None = None,
    ) -> tuple[Record, bool]:
        """Insert a new record at version 1, atomically with its idempotency key.

        One atomic step (one round trip on Redis, one transaction on SQLite),
        in this order:

        1. ``idempotency_key`` already taken: return that record; nothing is
           counted or written.
        2. ``record_id`` taken: raise :class:`RecordExists`; nothing is counted.
        3. Each of ``limits`` in order is checked and counted as :meth:`hit`
           does; the first one that is full raises :class:`LimitReached`
           (the limits before it stay counted, the record is not written).
        4. ``conversion``, as :meth:`conversion_start`; a refusal raises
           :class:`LimitReached` (the limits stay counted).
        5. The record, its idempotency key, deadline and ledger entries are written.

        Args:
            now: The time the limits and the conversion guard count at;
                required when either is given.

        Returns:
            ``(record, True)`` when created; ``(existing_record, False)`` when
            ``idempotency_key`` is already taken (nothing is written then).

        Raises:
            RecordExists: ``record_id`` is taken.
            LimitReached: A limit or the conversion guard refused.
            ValueError: A limit or rule is invalid, or ``now`` is missing.
        """
        ...

    async def get(self, record_id: str) -> Record | None:
        """Load a record, or None."""
        ...

    async def cas(
        self,
        record_id: str,
        expected_version: int,
        data: str,
        *,
        deadline: float | None,
        ledger: Sequence[LedgerEntry] = (),
    ) -> Record:
        """Replace the record if its version is still ``expected_version``.

        Atomically also sets (or with None clears) its deadline and appends the
        ledger entries (skipping keys already present).

        Raises:
            ConcurrentUpdate: The version moved on; nothing was written.
            VerificationNotFound: No such record.
        """
        ...

    async def claim_due(self, now: float, *, limit: int, lease: float) -> list[str]:
        """Claim up to ``limit`` deadlines due at ``now``; each goes to one caller.

        A claimed deadline is moved to ``now + lease`` so that it fires again
        if the claimer never writes the record back.
        """
        ...

    async def next_deadline(self) -> float | None:
        """The earliest scheduled deadline, for the loop to sleep until."""
        ...

    async def ledger(self, record_id: str | None = None) -> list[LedgerEntry]:
        """Ledger entries of one verification, or all of them (ordered by time)."""
        ...

    async def hit(self, key: str, *, limit: int, window: float, now: float) -> float | None:
        """Count one event against a sliding-window limit.

        Returns:
            None when under the limit (the event is counted), else the seconds
            until the oldest event leaves the window (the event is not counted).
        """
        ...

    async def conversion_start(
        self,
        rules: Sequence[ConversionRule],
        *,
        window: float,
        cooldown: float,
        now: float,
        grace: float = 0.0,
    ) -> tuple[str, float] | None:
        """Count one start on every rule's key, unless one of the keys is blocked.

        In one atomic step, for each rule in order: a key blocked until after
        ``now`` refuses; a key with at least ``min_started`` starts in the
        window and fewer than ``min_ratio * mature`` verifications is blocked
        until ``now + cooldown`` and refuses. A refusal counts nothing. Counts
        are kept in time buckets of ``window / 12``, so the window slides in
        steps of that size.

        ``mature`` is the starts in the window older than ``grace`` seconds:
        those that had time to be verified. A start younger than that is no
        evidence yet (its user may be typing the code), so a fresh burst of
        real users is not judged before any of them could have verified;
        verifications count whenever they happen. Starts are told fresh in
        slots of ``grace / 12`` (one partly fresh slot counts as fresh). With
        ``grace`` 0 every start in the window is judged.

        Returns:
            None when the start was counted, else the refusing key and the
            seconds until its block ends.
        """
        ...

    async def conversion_verified(self, keys: Sequence[str], *, window: float, now: float) -> None:
        """Count one verification on each key (see :meth:`conversion_start`)."""
        ...

    async def get_or_set_secret(self, name: str, value: str) -> str:
        """Return the stored secret ``name``, storing ``value`` first if absent."""
        ...

    async def add_latency(self, cell: str, weight: float) -> None:
        """Add ``weight`` to the latency cell ``cell`` (a missing cell counts as 0), atomically."""
        ...

    async def latency_cells(self) -> dict[str, float]:
        """Every latency cell and its weight."""
        ...

    async def drop_latency(self, cells: Sequence[str]) -> None:
        """Delete these latency cells (missing ones are ignored)."""
        ...

    async def ping(self) -> None:
        """Raise if the backend is unreachable."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
