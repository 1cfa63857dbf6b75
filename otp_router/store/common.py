"""Helpers shared by the store backends: argument checks and ledger encoding.

Backends that cannot hold Python objects (SQLite, Redis) store a ledger entry
as flat text fields. Amounts are written with ``str(Decimal)`` and read back
with ``Decimal(text)``, which round-trips exactly (value *and* exponent, so
``Decimal("0.0100")`` stays ``0.0100``); timestamps use ``repr(float)``,
which round-trips every double exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal

from otp_router.store.base import ConversionCheck, ConversionRule, LedgerEntry, LedgerKind, RateLimit

__all__ = [
    "CONVERSION_BUCKETS",
    "LEDGER_FIELDS",
    "check_claim_args",
    "check_conversion_args",
    "check_create_args",
    "check_hit_args",
    "check_latency_weight",
    "conversion_blocks",
    "conversion_buckets",
    "dedup_entries",
    "entry_from_fields",
    "entry_to_fields",
    "float_text",
    "fresh_slots",
    "retry_after",
]

#: Text fields of an encoded ledger entry, in a fixed order.
LEDGER_FIELDS = (
    "key",
    "verification_id",
    "channel",
    "provider",
    "region",
    "kind",
    "amount",
    "currency",
    "at",
)


def float_text(value: float) -> str:
    """Encode a float as text that parses back to the identical double.

    Args:
        value: Any finite or infinite float.

    Returns:
        ``repr(float(value))``, which Python, SQLite and Redis all parse exactly.
    """
    return repr(float(value))


def entry_to_fields(entry: LedgerEntry) -> dict[str, str]:
    """Encode a ledger entry as text fields (see :data:`LEDGER_FIELDS`).

    Args:
        entry: The entry to encode.

    Returns:
        One string per field; the amount as its exact decimal text.

    Raises:
        TypeError: The amount is not a :class:`~decimal.Decimal` (a float
            would silently lose exactness).
    """
    if not isinstance(entry.amount, Decimal):
        raise TypeError("LedgerEntry.amount must be a decimal.Decimal")
    return {
        "key": entry.key,
        "verification_id": entry.verification_id,
        "channel": entry.channel,
        "provider": entry.provider,
        "region": entry.region,
        "kind": LedgerKind(entry.kind).value,
        "amount": str(entry.amount),
        "currency": entry.currency,
        "at": float_text(entry.at),
    }


def entry_from_fields(fields: Mapping[str, str]) -> LedgerEntry:
    """Decode text fields written by :func:`entry_to_fields`.

    Args:
        fields: A mapping holding at least every name in :data:`LEDGER_FIELDS`.

    Returns:
        The ledger entry, with its amount as an exact :class:`~decimal.Decimal`.
    """
    return LedgerEntry(
        key=fields["key"],
        verification_id=fields["verification_id"],
        channel=fields["channel"],
        provider=fields["provider"],
        region=fields["region"],
        kind=LedgerKind(fields["kind"]),
        amount=Decimal(fields["amount"]),
        currency=fields["currency"],
        at=float(fields["at"]),
    )


def dedup_entries(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """Drop entries whose key repeats an earlier one in the same batch (first wins).

    Args:
        entries: Entries in the order the caller gave them.

    Returns:
        The entries with unique keys, order kept.
    """
    seen: set[str] = set()
    unique: list[LedgerEntry] = []
    for entry in entries:
        if entry.key not in seen:
            seen.add(entry.key)
            unique.append(entry)
    return unique


def check_claim_args(limit: int, lease: float) -> None:
    """Validate :meth:`Store.claim_due` arguments.

    Raises:
        ValueError: ``limit`` below 1 or a lease that is not positive.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not lease > 0:
        raise ValueError("lease must be positive")


def check_hit_args(limit: int, window: float) -> None:
    """Validate :meth:`Store.hit` arguments.

    A limit of 0 means "disabled" in the settings; callers skip ``hit`` then,
    so reaching a store with it is a bug worth failing loudly on.

    Raises:
        ValueError: ``limit`` below 1 or a window that is not positive.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not window > 0:
        raise ValueError("window must be positive")


def check_latency_weight(weight: float) -> None:
    """Validate a :meth:`Store.add_latency` weight.

    Raises:
        ValueError: The weight is negative, infinite or NaN (one bad write
            would poison a shared estimate for every process).
    """
    if not 0 <= weight < float("inf"):
        raise ValueError("latency weight must be a finite, non-negative number")


#: Time buckets per conversion window: the window slides in steps of ``window / 12``.
CONVERSION_BUCKETS = 12


def conversion_buckets(window: float, now: float) -> tuple[int, int]:
    """The bucket ``now`` falls in, and the oldest bucket still inside the window.

    Args:
        window: Window length in seconds.
        now: Current time.

    Returns:
        ``(current, oldest)``; buckets ``oldest..current`` make up the window.
    """
    current = math.floor(now * CONVERSION_BUCKETS / window)
    return current, current - CONVERSION_BUCKETS + 1


def fresh_slots(grace: float, now: float) -> tuple[int, int] | None:
    """The grace slot ``now`` falls in, and the oldest slot that may hold a start younger than ``grace``.

    Starts are counted again per slot of ``grace / CONVERSION_BUCKETS``
    seconds, so that the conversion guard can tell the ones that had time to
    be verified from fresh ones. None when ``grace`` is 0 (nothing is fresh).
    """
    if grace <= 0:
        return None
    current = math.floor(now * CONVERSION_BUCKETS / grace)
    return current, current - CONVERSION_BUCKETS


def conversion_blocks(rule: ConversionRule, started: int, verified: int, fresh: int = 0) -> bool:
    """Whether a key with these counts must be blocked (see :meth:`Store.conversion_start`).

    ``fresh`` of the ``started`` are too young to judge: the ratio is taken
    over the rest, while the minimum volume counts them all.
    """
    mature = max(started - fresh, 0)
    return started >= rule.min_started and verified < rule.min_ratio * mature


def check_conversion_args(
    rules: Sequence[ConversionRule], window: float, cooldown: float, grace: float = 0.0
) -> None:
    """Validate :meth:`Store.conversion_start` arguments.

    Raises:
        ValueError: A rule with ``min_started`` below 1 or a ratio outside 0..1,
            a window or cooldown that is not positive and finite, or a grace
            that is negative or not shorter than the window.
    """
    if not (0 <= grace < window):
        raise ValueError("grace must be at least 0 and shorter than the window")
    for rule in rules:
        if rule.min_started < 1:
            raise ValueError("min_started must be at least 1")
        if not 0 <= rule.min_ratio <= 1:
            raise ValueError("min_ratio must be between 0 and 1")
    for name, value in (("window", window), ("cooldown", cooldown)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive")


def check_create_args(
    limits: Sequence[RateLimit], conversion: ConversionCheck | None, now: float | None
) -> float:
    """Validate the limit arguments of :meth:`Store.create` before anything is written.

    Returns:
        ``now`` (``0.0`` when there is nothing to count, so it is unused).

    Raises:
        ValueError: ``now`` is missing while a limit or a conversion check is
            given, or one of them is invalid (as for :meth:`Store.hit` and
            :meth:`Store.conversion_start`).
    """
    for limit in limits:
        check_hit_args(limit.limit, limit.window)
    if conversion is not None:
        check_conversion_args(conversion.rules, conversion.window, conversion.cooldown, conversion.grace)
    if not limits and (conversion is None or not conversion.rules):
        return 0.0
    if now is None:
        raise ValueError("now is required with limits or a conversion check")
    return now


def retry_after(times: Sequence[float], *, limit: int, window: float, now: float) -> float:
    """Seconds until one more event fits in a full sliding window.

    Args:
        times: Event times still inside the window, ascending; at least ``limit``.
        limit: Events allowed per window.
        window: Window length in seconds.
        now: Current time.

    Returns:
        When the event that must leave for a slot to open leaves the window,
        relative to ``now``. Usually that is the oldest event; if the limit was
        lowered since the events were counted, a later one.
    """
    blocking = times[len(times) - limit]
    return blocking + window - now
