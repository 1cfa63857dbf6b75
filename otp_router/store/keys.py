"""Every Redis key the store uses, in one place.

All keys start with the configured prefix (URL query ``prefix``, default
``otp-router``), so one Redis can host several deployments and the test
suite can clean up after itself with one ``SCAN`` pattern.

Two layouts. The **single** layout (the default, ``shards=0``) is the one a
single Redis has always used (``P`` is the prefix)::

    P:rec:<id>               hash   version, data          one verification
    P:deadlines              zset   <id> -> deadline        at most one per record
    P:idem:<key>             string <id>                    expires (idempotency_ttl)
    P:ledger:<key>           hash   entry fields + seq      one ledger entry
    P:ledger-index           zset   <key> -> at             every entry, by time
    P:ledger-by:<id>         zset   <key> -> at             entries of one verification
    P:ledger-seq             string counter                 insertion order for ties
    P:rate:<key>             zset   <event> -> time         sliding-window events
    P:conv:<key>             hash   s<bucket>/v<bucket> -> n  conversion guard: started, verified
                                    (and f<slot> -> n: starts per grace slot, the fresh ones)
    P:conv-block:<key>       string blocked-until time      conversion guard block (expires)
    P:secret:<name>          string value
    P:latency                hash   <cell> -> weight        learned delivery latency

The **sharded** layout (``shards=N``, what ``cluster=1`` uses, 16 shards
unless told) hash-tags every key so that each Lua script touches one Redis
Cluster slot. A verification belongs to shard ``crc32(id) mod N``; its
record, its ledger entries and index, and the shard's deadline index,
ledger index and ledger counter share the tag ``{s<shard>}``::

    P:{s<n>}:rec:<id>        P:{s<n>}:deadlines      P:{s<n>}:ledger:<key>
    P:{s<n>}:ledger-index    P:{s<n>}:ledger-by:<id> P:{s<n>}:ledger-seq
    P:{s<n>}:idem:<key>      (n from the idempotency key: a reservation hash)
    P:rate:{<key>}           (each limit its own slot)
    P:{conv}:conv:<key>      P:{conv}:conv-block:<key>   (one slot: a start judges all its rules at once)
    P:secret:<name>          P:latency                   (one key each)

The two layouts share no record keys: a deployment keeps the layout its
data was written in (see the README on moving to a cluster), and ``shards``
must not change while data exists.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "RedisKeys"]

DEFAULT_PREFIX = "otp-router"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Builds the store's key names under one prefix.

    Args:
        prefix: Prepended, with ``:``, to every key.
        shards: 0 for the single layout, else the number of shards of the
            sharded layout.
    """

    prefix: str = DEFAULT_PREFIX
    shards: int = 0

    @property
    def sharded(self) -> bool:
        """Whether keys are hash-tagged by shard (the Redis Cluster layout)."""
        return self.shards > 0

    def shard_of(self, name: str) -> int:
        """The shard a verification id (or an idempotency key) belongs to; always 0 unsharded."""
        return zlib.crc32(name.encode("utf-8", "surrogatepass")) % self.shards if self.shards else 0

    def _stem(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}" if self.shards else self.prefix

    def record(self, record_id: str) -> str:
        """Hash holding a verification's ``version`` and ``data``."""
        return f"{self._stem(self.shard_of(record_id))}:rec:{record_id}"

    def deadlines(self, shard: int = 0) -> str:
        """Sorted set of record ids scored by their deadline (one per shard)."""
        return f"{self._stem(shard)}:deadlines"

    def idempotency(self, key: str) -> str:
        """The record id created under an idempotency key (sharded: a reservation hash)."""
        return f"{self._stem(self.shard_of('idem:' + key))}:idem:{key}"

    def ledger_entry(self, key: str, shard: int = 0) -> str:
        """Hash holding one ledger entry (in its verification's shard)."""
        return f"{self._stem(shard)}:ledger:{key}"

    def ledger_index(self, shard: int = 0) -> str:
        """Sorted set of every ledger entry key (of a shard), scored by time."""
        return f"{self._stem(shard)}:ledger-index"

    def ledger_by_verification(self, verification_id: str) -> str:
        """Sorted set of one verification's ledger entry keys, scored by time."""
        return f"{self._stem(self.shard_of(verification_id))}:ledger-by:{verification_id}"

    def ledger_seq(self, shard: int = 0) -> str:
        """Counter that orders ledger entries written at the same time (one per shard)."""
        return f"{self._stem(shard)}:ledger-seq"

    def rate(self, key: str) -> str:
        """Sorted set of one rate limit's events, scored by time."""
        return f"{self.prefix}:rate:{{{key}}}" if self.shards else f"{self.prefix}:rate:{key}"

    def conversion(self, key: str) -> str:
        """Hash of one conversion guard key's started/verified counts per time bucket."""
        return f"{self._conv}:conv:{key}"

    def conversion_block(self, key: str) -> str:
        """String holding the time a blocked conversion guard key is blocked until."""
        return f"{self._conv}:conv-block:{key}"

    @property
    def _conv(self) -> str:
        return f"{self.prefix}:{{conv}}" if self.shards else self.prefix

    def secret(self, name: str) -> str:
        """String holding a named secret."""
        return f"{self.prefix}:secret:{name}"

    @property
    def latency(self) -> str:
        """Hash of latency cells and their weights (one HINCRBYFLOAT per delivery)."""
        return f"{self.prefix}:latency"

    @property
    def pattern(self) -> str:
        """``SCAN`` pattern matching every key above."""
        return f"{self.prefix}:*"
