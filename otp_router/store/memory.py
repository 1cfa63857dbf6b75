"""An in-process store for tests and single-process demos.

Nothing survives the process. Every method runs without awaiting anything
inside its critical section, so each is atomic with respect to other
coroutines on the same event loop; the lock is kept anyway so that the
atomicity does not silently depend on that detail if a method ever grows an
``await``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from otp_router.errors import ConcurrentUpdate, StoreError, VerificationNotFound
from otp_router.store.base import (
    ConversionCheck,
    ConversionRule,
    LedgerEntry,
    LimitReached,
    RateLimit,
    Record,
    RecordExists,
)
from otp_router.store.common import (
    check_claim_args,
    check_conversion_args,
    check_create_args,
    check_hit_args,
    check_latency_weight,
    conversion_blocks,
    conversion_buckets,
    dedup_entries,
    entry_to_fields,
    fresh_slots,
    retry_after,
)

__all__ = ["MemoryStore"]

# Drop rate-limit keys that have emptied out once this many hits have been seen,
# so a long-running demo does not keep one list per phone number forever.
_SWEEP_EVERY = 1000


class MemoryStore:
    """A :class:`~otp_router.store.base.Store` held in Python dicts.

    Use it in tests (``memory://``). It follows the same contract as the
    durable stores, checked by the shared conformance suite.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._records: dict[str, Record] = {}
        self._deadlines: dict[str, float] = {}
        self._idempotency: dict[str, str] = {}
        # Insertion order of a dict is the tie-breaker for equal timestamps.
        self._ledger: dict[str, LedgerEntry] = {}
        # key -> (window of its last hit, event times)
        self._hits: dict[str, tuple[float, list[float]]] = {}
        self._hit_count = 0
        # key -> bucket -> [started, verified]; key -> blocked until
        self._conversion: dict[str, dict[int, list[int]]] = {}
        self._conversion_blocks: dict[str, float] = {}
        #: Starts per key and grace slot (see ``fresh_slots``), only the last grace's worth.
        self._fresh: dict[str, dict[int, int]] = {}
        self._secrets: dict[str, str] = {}
        self._latency: dict[str, float] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def _append_ledger(self, entries: Sequence[LedgerEntry]) -> None:
        for entry in dedup_entries(entries):
            entry_to_fields(entry)  # same validation as the durable stores
            self._ledger.setdefault(entry.key, entry)

    def _set_deadline(self, record_id: str, deadline: float | None) -> None:
        if deadline is None:
            self._deadlines.pop(record_id, None)
        else:
            self._deadlines[record_id] = float(deadline)

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
        """Insert a new record at version 1 (see :meth:`Store.create`).

        Raises:
            RecordExists: ``record_id`` already exists (ids must be unique).
            LimitReached: A limit or the conversion guard refused.
            StoreError: The store is closed.
        """
        at = check_create_args(limits, conversion, now)
        for entry in ledger:
            entry_to_fields(entry)  # validate before writing anything
        async with self._lock:
            self._check_open()
            if idempotency_key is not None:
                existing_id = self._idempotency.get(idempotency_key)
                if existing_id is not None and existing_id in self._records:
                    return self._records[existing_id], False
            if record_id in self._records:
                raise RecordExists("a record with this id already exists")
            for limit in limits:
                wait = self._hit(limit.key, limit=limit.limit, window=limit.window, now=at)
                if wait is not None:
                    raise LimitReached(limit.key, wait)
            if conversion is not None and conversion.rules:
                blocked = self._conversion_start(
                    conversion.rules,
                    window=conversion.window,
                    cooldown=conversion.cooldown,
                    now=at,
                    grace=conversion.grace,
                )
                if blocked is not None:
                    raise LimitReached(*blocked)
            record = Record(id=record_id, version=1, data=data)
            self._records[record_id] = record
            if idempotency_key is not None:
                self._idempotency[idempotency_key] = record_id
            self._set_deadline(record_id, deadline)
            self._append_ledger(ledger)
            return record, True

    async def get(self, record_id: str) -> Record | None:
        """Load a record, or None."""
        async with self._lock:
            self._check_open()
            return self._records.get(record_id)

    async def cas(
        self,
        record_id: str,
        expected_version: int,
        data: str,
        *,
        deadline: float | None,
        ledger: Sequence[LedgerEntry] = (),
    ) -> Record:
        """Replace the record if its version is unchanged (see :meth:`Store.cas`).

        Raises:
            ConcurrentUpdate: The version moved on; nothing was written.
            VerificationNotFound: No such record.
        """
        async with self._lock:
            self._check_open()
            current = self._records.get(record_id)
            if current is None:
                raise VerificationNotFound("no verification with this id")
            if current.version != expected_version:
                raise ConcurrentUpdate("the record was changed by another writer")
            for entry in ledger:
                entry_to_fields(entry)
            record = Record(id=record_id, version=current.version + 1, data=data)
            self._records[record_id] = record
            self._set_deadline(record_id, deadline)
            self._append_ledger(ledger)
            return record

    async def claim_due(self, now: float, *, limit: int, lease: float) -> list[str]:
        """Claim up to ``limit`` due deadlines, earliest first (see :meth:`Store.claim_due`)."""
        check_claim_args(limit, lease)
        async with self._lock:
            self._check_open()
            due = sorted((d, rid) for rid, d in self._deadlines.items() if d <= now)[:limit]
            for _, rid in due:
                self._deadlines[rid] = now + lease
            return [rid for _, rid in due]

    async def next_deadline(self) -> float | None:
        """The earliest scheduled deadline, or None."""
        async with self._lock:
            self._check_open()
            return min(self._deadlines.values(), default=None)

    async def ledger(self, record_id: str | None = None) -> list[LedgerEntry]:
        """Ledger entries ordered by time, ties in insertion order."""
        async with self._lock:
            self._check_open()
            entries = [
                e for e in self._ledger.values() if record_id is None or e.verification_id == record_id
            ]
        # sorted() is stable, so equal times keep insertion order.
        return sorted(entries, key=lambda e: e.at)

    async def hit(self, key: str, *, limit: int, window: float, now: float) -> float | None:
        """Count one event against a sliding-window limit (see :meth:`Store.hit`)."""
        check_hit_args(limit, window)
        async with self._lock:
            self._check_open()
            return self._hit(key, limit=limit, window=window, now=now)

    def _hit(self, key: str, *, limit: int, window: float, now: float) -> float | None:
        """:meth:`hit` inside the lock."""
        self._hit_count += 1
        if self._hit_count % _SWEEP_EVERY == 0:
            self._sweep(now)
        _, previous = self._hits.get(key, (window, []))
        times = sorted(t for t in previous if t > now - window)
        self._hits[key] = (window, times)
        if len(times) >= limit:
            return retry_after(times, limit=limit, window=window, now=now)
        times.append(now)
        return None

    def _sweep(self, now: float) -> None:
        # Judge each key by its own window: a short per-country window must not
        # drop the history of a long per-phone window.
        for name in [k for k, (w, ts) in self._hits.items() if not ts or max(ts) <= now - w]:
            del self._hits[name]

    async def conversion_start(
        self,
        rules: Sequence[ConversionRule],
        *,
        window: float,
        cooldown: float,
        now: float,
        grace: float = 0.0,
    ) -> tuple[str, float] | None:
        """Count a start unless a key is blocked (see :meth:`Store.conversion_start`)."""
        check_conversion_args(rules, window, cooldown, grace)
        async with self._lock:
            self._check_open()
            return self._conversion_start(rules, window=window, cooldown=cooldown, now=now, grace=grace)

    def _conversion_start(
        self,
        rules: Sequence[ConversionRule],
        *,
        window: float,
        cooldown: float,
        now: float,
        grace: float = 0.0,
    ) -> tuple[str, float] | None:
        """:meth:`conversion_start` inside the lock."""
        current, oldest = conversion_buckets(window, now)
        slots = fresh_slots(grace, now)
        self._hit_count += 1
        if self._hit_count % _SWEEP_EVERY == 0:
            self._sweep_conversion(oldest, now)
        for rule in rules:
            until = self._conversion_blocks.get(rule.key)
            if until is not None and until > now:
                return rule.key, until - now
            buckets = self._buckets(rule.key, oldest)
            started = sum(b[0] for b in buckets.values())
            verified = sum(b[1] for b in buckets.values())
            fresh = 0
            if slots is not None:
                recent = self._fresh.get(rule.key, {})
                for stale in [slot for slot in recent if slot < slots[1]]:
                    del recent[stale]
                fresh = sum(recent.values())
            if conversion_blocks(rule, started, verified, fresh):
                self._conversion_blocks[rule.key] = now + cooldown
                return rule.key, cooldown
        for rule in rules:
            self._conversion.setdefault(rule.key, {}).setdefault(current, [0, 0])[0] += 1
            if slots is not None:
                recent = self._fresh.setdefault(rule.key, {})
                recent[slots[0]] = recent.get(slots[0], 0) + 1
        return None

    async def conversion_verified(self, keys: Sequence[str], *, window: float, now: float) -> None:
        """Count a verification on each key (see :meth:`Store.conversion_verified`)."""
        current, oldest = conversion_buckets(window, now)
        async with self._lock:
            self._check_open()
            for key in keys:
                self._buckets(key, oldest)
                self._conversion.setdefault(key, {}).setdefault(current, [0, 0])[1] += 1

    def _sweep_conversion(self, oldest: int, now: float) -> None:
        # Forget prefixes that went quiet, so one list per prefix ever seen is not kept forever.
        for key in list(self._conversion):
            if not self._buckets(key, oldest):
                del self._conversion[key]
        for key in [k for k in self._fresh if k not in self._conversion]:
            # Fresh counts never outlive the window of their key (grace < window).
            del self._fresh[key]
        for key in [k for k, until in self._conversion_blocks.items() if until <= now]:
            del self._conversion_blocks[key]

    def _buckets(self, key: str, oldest: int) -> dict[int, list[int]]:
        """A key's buckets, with those that left the window dropped."""
        buckets = self._conversion.get(key, {})
        for stale in [b for b in buckets if b < oldest]:
            del buckets[stale]
        return buckets

    async def get_or_set_secret(self, name: str, value: str) -> str:
        """Return the stored secret, storing ``value`` first if absent."""
        async with self._lock:
            self._check_open()
            return self._secrets.setdefault(name, value)

    async def add_latency(self, cell: str, weight: float) -> None:
        """Add ``weight`` to a latency cell (see :meth:`Store.add_latency`)."""
        check_latency_weight(weight)
        async with self._lock:
            self._check_open()
            self._latency[cell] = self._latency.get(cell, 0.0) + weight

    async def latency_cells(self) -> dict[str, float]:
        """Every latency cell and its weight."""
        async with self._lock:
            self._check_open()
            return dict(self._latency)

    async def drop_latency(self, cells: Sequence[str]) -> None:
        """Delete these latency cells."""
        async with self._lock:
            self._check_open()
            for cell in cells:
                self._latency.pop(cell, None)

    async def ping(self) -> None:
        """Raise :class:`~otp_router.errors.StoreError` once the store is closed."""
        self._check_open()

    async def aclose(self) -> None:
        """Close the store; later calls raise :class:`~otp_router.errors.StoreError`."""
        self._closed = True
