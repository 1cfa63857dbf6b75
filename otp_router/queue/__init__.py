"""Work queues for the standalone worker: pick one with :func:`open_queue` and a URL.

==========================================  ===========================================
URL                                         Queue
==========================================  ===========================================
``redis://host:6379/0?prefix=name``         :class:`RedisStreamQueue` (also ``rediss://``,
                                            ``unix://``); ``group=`` names the consumer group
``sqlite:///relative/path.db``              :class:`SqliteQueue`, relative to the working
                                            directory (``sqlite:////abs/path.db``: absolute)
==========================================  ===========================================

Unset ``OTP_ROUTER_QUEUE_URL`` follows the store (:func:`queue_url_for`): a
Redis store gets the Redis queue on the same server and prefix, a SQLite
store ``sqlite:///otp-router.db`` gets ``sqlite:///otp-router.queue.db``.

The message schema and delivery semantics are described in
:mod:`otp_router.queue.base`. Producers in Python use :func:`enqueue`; others
``XADD`` or ``INSERT`` the JSON themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from otp_router.config import Settings
from otp_router.errors import ConfigError, InputError
from otp_router.ids import producer_id
from otp_router.inputs import check_text
from otp_router.phone import parse_phone
from otp_router.queue.base import (
    MAX_MESSAGE_BYTES,
    DeadLetter,
    DeadLetterReason,
    Delivery,
    PoisonMessage,
    Queue,
    QueueMessage,
    parse_message,
)
from otp_router.queue.redis import RedisStreamQueue
from otp_router.queue.sqlite import SqliteQueue
from otp_router.sqlite_common import parse_sqlite_url

__all__ = [
    "MAX_MESSAGE_BYTES",
    "DeadLetter",
    "DeadLetterReason",
    "Delivery",
    "Enqueued",
    "PoisonMessage",
    "Queue",
    "QueueMessage",
    "RedisStreamQueue",
    "SqliteQueue",
    "enqueue",
    "open_queue",
    "parse_message",
    "queue_url_for",
]

_VAR = "OTP_ROUTER_QUEUE_URL"


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What :func:`enqueue` returns.

    Attributes:
        verification_id: The id the worker gives the verification: pass it to
            ``check``/``get`` once the worker has started it (``get`` raises
            ``VerificationNotFound`` until then).
        message_id: The queue's id for the message (Redis stream entry id, SQLite row id).
    """

    verification_id: str
    message_id: str


def queue_url_for(settings: Settings) -> str:
    """The queue URL: ``settings.queue_url``, or one derived from ``settings.store_url``.

    Raises:
        ConfigError: No queue URL and a store (``memory://``) that no other
            process can share, so no queue can be derived from it.
    """
    if settings.queue_url:
        return settings.queue_url
    parts = urlsplit(settings.store_url)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return settings.store_url
    if scheme == "sqlite":
        folder, _, name = parts.path.rpartition("/")
        if not name:
            raise ConfigError(f"{_VAR}: cannot derive a queue file from OTP_ROUTER_STORE_URL; set it")
        stem, dot, suffix = name.rpartition(".")
        queue_name = f"{stem}.queue.{suffix}" if dot and stem else f"{name}.queue"
        # Built by hand: urlunsplit() would drop the empty host and turn "sqlite:///" into "sqlite:/".
        query = f"?{parts.query}" if parts.query else ""
        return f"{parts.scheme}://{folder}/{queue_name}{query}"
    raise ConfigError(f"{_VAR} is not set and cannot be derived from a {scheme}:// store; set it")


def open_queue(url: str) -> Queue:
    """Build the queue a URL names. No connection is made until first use.

    Args:
        url: A Redis or SQLite URL (see the table in this module's docstring).

    Returns:
        A new queue; the caller owns it and must ``await queue.aclose()``.

    Raises:
        ConfigError: Unknown scheme, malformed URL, or the ``redis`` extra is
            missing. The message names ``OTP_ROUTER_QUEUE_URL`` but never
            repeats the URL, which may hold a password.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStreamQueue(url)
    if scheme == "sqlite":
        return _open_sqlite(url)
    raise ConfigError(f"{_VAR}: unknown scheme {scheme!r}; use redis://host:port/db or sqlite:///path")


def _open_sqlite(url: str) -> SqliteQueue:
    path, busy_timeout, synchronous = parse_sqlite_url(url, var=_VAR, example="otp-router.queue.db")
    return SqliteQueue(path, busy_timeout=busy_timeout, synchronous=synchronous)


async def enqueue(
    settings_or_url: Settings | str,
    phone: str,
    *,
    idempotency_key: str,
    default_region: str | None = None,
    locale: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Enqueued:
    """Ask the worker to start a verification for ``phone``.

    Opens the queue, appends one message and closes it again; to enqueue
    many, use :func:`open_queue` and :meth:`Queue.enqueue` with
    :class:`QueueMessage` objects.

    Args:
        settings_or_url: Settings (uses :func:`queue_url_for`) or a queue URL.
        phone: The number, international format unless ``default_region`` is given.
        idempotency_key: Required: redelivered or re-enqueued messages with the
            same key start one verification, never a second send.
        default_region: Region for national-format numbers.
        locale: The user's language (BCP 47): a voice step reads the code in it.
        metadata: Free-form JSON object, carried along.

    Returns:
        The verification id the worker will use and the message id. The id
        is derived from ``idempotency_key`` (keyed with the code secret when
        ``settings_or_url`` is settings that have one, see
        :func:`otp_router.ids.producer_id`) and carried in the message, so
        enqueueing the same key again yields the same id, and the worker
        finds the first verification.

    Raises:
        InvalidPhoneNumber: The number cannot be parsed (checked here so a
            typo fails at the producer, not in the dead letters).
        InputError: Another field does not follow the message schema.
        StoreError: The queue backend failed.
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InputError("invalid queue message field(s): metadata must be a mapping")
    try:
        message = QueueMessage(
            phone=phone,
            idempotency_key=idempotency_key,
            default_region=default_region,
            locale=locale,
            metadata=None if metadata is None else dict(metadata),
        )
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"]) for err in exc.errors()})
        raise InputError(f"invalid queue message field(s): {', '.join(fields)}") from None
    # After the schema check, which has made sure every field is a string.
    check_text(idempotency_key, name="idempotency_key", max_length=200)
    secret = None
    if isinstance(settings_or_url, Settings) and settings_or_url.code_secret is not None:
        secret = settings_or_url.code_secret.get_secret_value().encode()
    verification_id = producer_id(idempotency_key, secret)
    message = message.model_copy(update={"verification_id": verification_id})
    parse_phone(phone, default_region=default_region)
    try:
        data = message.to_json()
    except ValueError:
        # PydanticSerializationError: metadata holds something JSON cannot carry.
        raise InputError("invalid queue message field(s): metadata is not JSON-serializable") from None
    try:
        # The worker's own check: what is enqueued here is never dead-lettered as
        # unreadable (too large, too deeply nested metadata, ...).
        parse_message(data)
    except PoisonMessage as exc:
        raise InputError(f"queue message would be dead-lettered: {exc}") from None
    url = queue_url_for(settings_or_url) if isinstance(settings_or_url, Settings) else settings_or_url
    queue = open_queue(url)
    try:
        message_id = await queue.enqueue(data)
    finally:
        await queue.aclose()
    return Enqueued(verification_id=verification_id, message_id=message_id)
