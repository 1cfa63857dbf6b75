"""Every Redis name the queue and the worker use, in one place.

The store's own keys are in :mod:`otp_router.store.keys` (re-exported here
as :class:`RedisKeys`); this module adds the queue's. Both share one prefix
(URL query ``prefix``, default ``otp-router``), so a deployment's whole key
space, store and queue alike, matches ``<prefix>:*``.

Layout (``P`` is the prefix)::

    P:queue                  stream  entries with one field, data = JSON message
    P:dead-letters           stream  original fields + reason, failed_at, message_id, attempts, consumer
    P:heartbeat:<worker>     string  Unix time of the worker's last heartbeat; expires (TTL)

On a Redis Cluster (``cluster=1`` on the queue URL) the stream and the
dead-letter stream share the hash tag ``{queue}``, so the dead-letter script
(and every other queue command) touches one slot::

    P:{queue}:stream         P:{queue}:dead-letters      P:heartbeat:<worker>

The queue is one stream, not several sharded ones: a consumer group hands
each entry to one consumer in order, however many consumers read, and one
stream's few commands per message (``XADD``, ``XREADGROUP``, one script to
acknowledge) are far below what one cluster shard serves (the README's
"Scale" section has the numbers). Sharding it would cost every consumer a
read per shard and give up the order.

The consumer group (default ``otp-router-workers``) is a name inside the
stream, not a key. Any program can enqueue::

    XADD otp-router:queue * data '{"phone": "+447400123456", "idempotency_key": "login-42"}'
    XADD otp-router:{queue}:stream * data '…'      (on a cluster)
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
        tagged: The Redis Cluster layout: the two streams share one hash tag.
    """

    prefix: str = DEFAULT_PREFIX
    tagged: bool = False

    @property
    def stream(self) -> str:
        """The stream producers ``XADD`` to and workers read with ``XREADGROUP``."""
        return f"{self.prefix}:{{queue}}:stream" if self.tagged else f"{self.prefix}:queue"

    @property
    def dead_letters(self) -> str:
        """The stream of messages that could not be processed, with their reason."""
        return f"{self.prefix}:{{queue}}:dead-letters" if self.tagged else f"{self.prefix}:dead-letters"

    def heartbeat(self, worker: str) -> str:
        """String holding a worker's last heartbeat time, expiring when the worker stops beating."""
        return f"{self.prefix}:heartbeat:{worker}"
