"""Verification ids: random, or derived from an idempotency key.

A key always names the same verification. The router derives the id with a
keyed hash (the code secret), so an id reveals nothing about its key. A queue
producer derives the id the worker will use in the same way when it knows the
code secret; without it, with a public, namespaced hash, and carries the id in
the message (the worker uses a carried id as it is).
"""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = ["VERIFICATION_ID_PATTERN", "is_verification_id", "keyed_id", "producer_id", "random_id"]

#: What a verification id looks like (ours have 24 or 34 characters).
VERIFICATION_ID_PATTERN = r"^v_[A-Za-z0-9_-]{16,64}$"
_ID = re.compile(VERIFICATION_ID_PATTERN)


def random_id() -> str:
    """A new id for a verification without an idempotency key."""
    return "v_" + secrets.token_urlsafe(16)


def keyed_id(secret: bytes, idempotency_key: str) -> str:
    """The router's id for an idempotency key: ``v_`` and 32 hex digits of a keyed hash."""
    digest = hashlib.sha256(secret + b"idem:" + idempotency_key.encode()).hexdigest()
    return "v_" + digest[:32]


def producer_id(idempotency_key: str, secret: bytes | None = None) -> str:
    """The id a queue producer puts in a message for an idempotency key.

    With the code secret it is the router's own :func:`keyed_id`. Without it,
    a hash of the key alone in a namespace of its own: deterministic (the same
    key enqueued twice gets the same id, as the worker will find the first
    verification), but as guessable as the key. Use unguessable keys, or give
    the producer the code secret.
    """
    if secret is not None:
        return keyed_id(secret, idempotency_key)
    return "v_" + hashlib.sha256(b"otp-router queue id:" + idempotency_key.encode()).hexdigest()[:32]


def is_verification_id(value: object) -> bool:
    """Whether ``value`` has the shape of a verification id."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None
