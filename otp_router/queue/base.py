"""The queue protocol, the message schema and poison-message detection.

Message schema
==============

A queue message asks the worker to start one verification. It is a JSON
object carried in a single field named ``data`` (a Redis stream entry field,
or the ``data`` column of the SQLite queue), so that a producer in any
language needs nothing but its Redis or SQLite client::

    {
      "phone": "+447400123456",          required; E.164, or national with default_region
      "idempotency_key": "login-42",     required; 1..200 characters
      "default_region": "GB",            optional; ISO 3166 alpha-2, for national numbers
      "locale": "en-GB",                 optional; the language a voice call reads the code in
      "metadata": {"user": 42},          optional; any JSON object, unused by the worker
      "verification_id": "v_…"           optional; the id the new verification gets
    }

The same schema ships as JSON Schema in
``otp_router/data/queue-message.schema.json``. Unknown fields are refused
(a typo such as ``"idempotencyKey"`` must not silently drop the key).

``verification_id`` is what :func:`otp_router.queue.enqueue` adds so the
producer knows the id before the worker runs (``v_`` and 16 to 64 of
``A-Za-z0-9_-``). Without it the worker derives the id from the key, as
before; a key already used keeps the id it was first given.

``idempotency_key`` is required because it is what makes redelivery safe:
a message delivered twice (a worker died after sending but before
acknowledging) calls ``router.start`` twice with the same key, and the
second call returns the existing verification and sends nothing.

Delivery semantics
==================

At least once. A consumer :meth:`~Queue.read`\\ s messages, which become
*pending* under its name; it :meth:`~Queue.ack`\\ s each one only after the
verification is durably stored (or definitively refused). A message left
pending longer than the visibility timeout, because its consumer died, is
handed to another consumer by :meth:`~Queue.reclaim`. A live consumer
working on a slow message keeps it with :meth:`~Queue.touch`.

Poison messages (unparsable, invalid, or refused by the router for a reason
that will not change) are moved to a dead-letter store with their reason by
:meth:`~Queue.dead_letter`, atomically with the acknowledgement.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from otp_router.errors import InputError
from otp_router.ids import VERIFICATION_ID_PATTERN
from otp_router.inputs import JsonInputError, decode_json, has_lone_surrogate

__all__ = [
    "MAX_MESSAGE_BYTES",
    "DeadLetter",
    "DeadLetterReason",
    "Delivery",
    "PoisonMessage",
    "Queue",
    "QueueMessage",
    "message_text",
    "parse_delivery",
    "parse_message",
    "stored_bytes",
]

#: Larger ``data`` values are dead-lettered unparsed (``too_large``).
MAX_MESSAGE_BYTES = 64 * 1024


class DeadLetterReason(enum.StrEnum):
    """Why a message was dead-lettered. Also the ``reason`` metric label."""

    BAD_JSON = "bad_json"  # no ``data`` field, not JSON, or not a JSON object (repeated key, too deep)
    BAD_ENCODING = "bad_encoding"  # not UTF-8 text (invalid bytes, a SQLite BLOB)
    TOO_LARGE = "too_large"
    INVALID_MESSAGE = "invalid_message"  # JSON that does not follow the schema
    INVALID_PHONE = "invalid_phone"
    UNSUPPORTED_COUNTRY = "unsupported_country"
    UNSUPPORTED_NUMBER_TYPE = "unsupported_number_type"  # premium rate, toll free… (toll-fraud policy)
    INVALID_INPUT = "invalid_input"  # any other input the router refused
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_DELIVERIES = "too_many_deliveries"


_JSON_REASONS = {"encoding": DeadLetterReason.BAD_ENCODING, "too_large": DeadLetterReason.TOO_LARGE}


class QueueMessage(BaseModel):
    """One request to start a verification (see the module docstring).

    Attributes:
        phone: The number, international format unless ``default_region`` is given.
        idempotency_key: Same key, same verification; makes redelivery harmless.
        default_region: Region for national-format numbers.
        locale: The user's language (BCP 47); a voice call reads the code in it.
        metadata: Free-form producer data; not used by the worker.
        verification_id: The id for the new verification (optional; see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    phone: str = Field(min_length=1, max_length=64)
    idempotency_key: str = Field(min_length=1, max_length=200)
    default_region: str | None = Field(default=None, pattern=r"^[A-Za-z]{2}$")
    locale: str | None = Field(default=None, min_length=1, max_length=35)
    metadata: dict[str, Any] | None = None
    verification_id: str | None = Field(default=None, pattern=VERIFICATION_ID_PATTERN)

    def to_json(self) -> str:
        """The ``data`` field value: compact JSON without unset optional fields."""
        return self.model_dump_json(exclude_none=True)


class PoisonMessage(Exception):
    """A message that can never be processed.

    Args:
        reason: Why, from :class:`DeadLetterReason`.
        detail: Human-readable detail without the message's values (it may
            contain a phone number), e.g. the names of the offending fields.
    """

    def __init__(self, reason: DeadLetterReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def parse_message(data: str | None) -> QueueMessage:
    """Validate a ``data`` field against the message schema.

    The JSON is decoded with :func:`otp_router.inputs.decode_json`, the same
    strict decoder the HTTP API uses: a repeated key, nesting deeper than
    :data:`~otp_router.inputs.MAX_JSON_DEPTH` levels, ``NaN`` or text that is
    not UTF-8 (a queue hands undecodable bytes over as lone surrogates) makes
    the message poison at once, never an error that would be retried.

    Args:
        data: The field's text, or None when the entry has no ``data`` field.

    Returns:
        The message.

    Raises:
        PoisonMessage: ``bad_json``, ``bad_encoding``, ``too_large`` or
            ``invalid_message``; its detail names fields and error types
            only, never values.
    """
    if data is None:
        raise PoisonMessage(DeadLetterReason.BAD_JSON, "the entry has no 'data' field")
    try:
        decoded = decode_json(data, max_bytes=MAX_MESSAGE_BYTES)
    except JsonInputError as exc:
        reason = _JSON_REASONS.get(exc.reason, DeadLetterReason.BAD_JSON)
        raise PoisonMessage(reason, f"data: {exc}") from None
    if not isinstance(decoded, dict):
        raise PoisonMessage(DeadLetterReason.BAD_JSON, "data is not a JSON object")
    try:
        return QueueMessage.model_validate(decoded)
    except ValidationError as exc:
        # pydantic's own message quotes the input; keep only where and what.
        problems = sorted(
            {f"{'.'.join(str(p) for p in err['loc']) or '<root>'}:{err['type']}" for err in exc.errors()}
        )
        raise PoisonMessage(DeadLetterReason.INVALID_MESSAGE, ", ".join(problems)) from None


def parse_delivery(delivery: Delivery) -> QueueMessage:
    """:func:`parse_message` for a delivery, refusing first what its queue could not read as text.

    Raises:
        PoisonMessage: As :func:`parse_message`; ``bad_encoding`` when the
            queue flagged the entry (e.g. a SQLite ``BLOB`` instead of text).
    """
    if delivery.unreadable is not None:
        raise PoisonMessage(DeadLetterReason.BAD_ENCODING, delivery.unreadable)
    return parse_message(delivery.data)


def message_text(message: QueueMessage | str) -> str:
    """The ``data`` value to enqueue for ``message``.

    Raises:
        InputError: ``message`` is text with a lone surrogate, which no queue
            can store as UTF-8 (refused here rather than failing inside a driver).
    """
    if isinstance(message, QueueMessage):
        return message.to_json()
    if not isinstance(message, str) or has_lone_surrogate(message):
        raise InputError("queue message data must be valid UTF-8 text")
    return message


def stored_bytes(text: str) -> bytes:
    """Bytes to store for a field a queue read with ``surrogateescape``: the original bytes again."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True, eq=False)
class Delivery:
    """A message handed to one consumer, pending until acknowledged.

    Attributes:
        id: The message id (stream entry id, or SQLite row id as text).
        fields: The entry's fields as enqueued; normally just ``data``.
        enqueued_at: Unix time the message was enqueued (the queue server's clock).
        attempt: 1 on first delivery, then one more each time it is reclaimed.
        unreadable: Set by the queue when the entry is not text at all (a
            SQLite ``BLOB``): why. Such a delivery is dead-lettered as
            ``bad_encoding`` without being parsed. Bytes that are not UTF-8
            reach ``fields`` decoded with ``surrogateescape``, so reading a
            bad entry never fails and dead-lettering stores the original bytes.
    """

    id: str
    fields: Mapping[str, str]
    enqueued_at: float
    attempt: int = 1
    unreadable: str | None = None

    @property
    def data(self) -> str | None:
        """The ``data`` field, or None when missing."""
        return self.fields.get("data")


@dataclass(frozen=True, slots=True, eq=False)
class DeadLetter:
    """A message moved aside because it could not be processed.

    Attributes:
        id: The dead letter's own id.
        message_id: The id the message had in the queue.
        fields: The message's original fields.
        reason: A :class:`DeadLetterReason` value.
        failed_at: Unix time it was dead-lettered.
        attempts: Deliveries it had had.
    """

    id: str
    message_id: str
    fields: Mapping[str, str]
    reason: str
    failed_at: float
    attempts: int


@runtime_checkable
class Queue(Protocol):
    """A durable work queue shared by producers and any number of worker processes."""

    async def enqueue(self, message: QueueMessage | str) -> str:
        """Append a message.

        Args:
            message: A validated message, or ready-made JSON text for ``data``
                (enqueued as is; the worker validates it).

        Returns:
            The message id.
        """
        ...

    async def read(self, consumer: str, count: int, block: float) -> list[Delivery]:
        """Take up to ``count`` never-delivered messages, oldest first.

        Each message is handed to exactly one consumer and stays pending under
        its name until :meth:`ack`, :meth:`dead_letter` or a :meth:`reclaim`.

        Args:
            consumer: This consumer's unique name.
            count: Most messages to take (at least 1).
            block: Seconds to wait for a message when there is none; 0 returns at once.
        """
        ...

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge and forget a processed message. Acknowledging twice is harmless."""
        ...

    async def reclaim(self, consumer: str, min_idle: float, count: int) -> list[Delivery]:
        """Take over up to ``count`` messages pending for longer than ``min_idle`` seconds.

        Their consumer is presumed dead. Each reclaimed delivery has its
        ``attempt`` increased.
        """
        ...

    async def touch(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of messages this consumer is still working on."""
        ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a message to the dead letters with ``reason``, acknowledging it in the same step."""
        ...

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters (for operators and tests)."""
        ...

    async def depth(self) -> int:
        """Messages waiting, not yet delivered to any consumer."""
        ...

    async def pending(self) -> int:
        """Messages delivered to a consumer and not yet acknowledged."""
        ...

    async def lag(self) -> float:
        """Age in seconds of the oldest waiting message; 0 when none waits."""
        ...

    async def heartbeat(self, worker: str, ttl: float) -> None:
        """Record that ``worker`` is alive; the record counts as fresh for ``ttl`` seconds."""
        ...

    async def last_heartbeat(self, worker: str) -> float | None:
        """Unix time of ``worker``'s last heartbeat if still fresh, else None."""
        ...

    async def clear_heartbeat(self, worker: str) -> None:
        """Forget ``worker``'s heartbeat (it stopped cleanly)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~otp_router.errors.StoreError` if the backend is unreachable."""
        ...

    async def aclose(self) -> None:
        """Release connections. Safe to call twice."""
        ...
