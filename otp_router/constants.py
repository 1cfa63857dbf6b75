"""Every Redis name the queue and the worker use, in one place.

The store's own keys are in :mod:`otp_router.store.keys` (re-exported here
as :class:`RedisKeys`); this module adds the queue's. Both share one prefix
(URL query ``prefix``, default ``otp-router``), so a deployment's whole key
space, store and queue alike, matches ``<prefix>:*``.

Layout (``P`` is the prefix)::

    P:queue                  stream  entries with one field, data = JSON message
    P:dead-letters           stream  original fields + reason, failed_at, message_id, attempts, consumer
    P:heartbeat:<worker>     string  Unix time of the worker's last heartbeat; expires (TTL)

The consumer group (default ``otp-router-workers``) is a name inside the
``P:queue`` stream, not a key. Any program can enqueue::

    XADD otp-router:queue * data '{"phone": "+447400123456", "idempotency_key": "login-42"}'
"""

from __future__ import annotations

from dataclasses import dataclass

from otp_router.store.keys import DEFAULT_PREFIX, RedisKeys

__all__ = [
    "DEAD_LETTER_MAXLEN",
    "DEFAULT_GROUP",
    "DEFAULT_PREFIX",
    "QueueKeys",
    "RedisKeys",
]

#: Consumer group every worker joins unless the queue URL names another (``?group=``).
DEFAULT_GROUP = "otp-router-workers"

#: Approximate cap on the dead-letter stream's length (``XADD … MAXLEN ~``), so a
#: flood of bad messages cannot fill Redis.
DEAD_LETTER_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Builds the queue's key names under one prefix.

    Args:
        prefix: Prepended, with ``:``, to every key; the same as the store's.
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def stream(self) -> str:
        """The stream producers ``XADD`` to and workers read with ``XREADGROUP``."""
        return f"{self.prefix}:queue"

    @property
    def dead_letters(self) -> str:
        """The stream of messages that could not be processed, with their reason."""
        return f"{self.prefix}:dead-letters"

    def heartbeat(self, worker: str) -> str:
        """String holding a worker's last heartbeat time, expiring when the worker stops beating."""
        return f"{self.prefix}:heartbeat:{worker}"
