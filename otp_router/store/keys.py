"""Every Redis key the store uses, in one place.

All keys start with the configured prefix (URL query ``prefix``, default
``otp-router``), so one Redis can host several deployments and the test
suite can clean up after itself with one ``SCAN`` pattern.

Layout (``P`` is the prefix)::

    P:rec:<id>               hash   version, data          one verification
    P:deadlines              zset   <id> -> deadline        at most one per record
    P:idem:<key>             string <id>                    expires (idempotency_ttl)
    P:ledger:<key>           hash   entry fields + seq      one ledger entry
    P:ledger-index           zset   <key> -> at             every entry, by time
    P:ledger-by:<id>         zset   <key> -> at             entries of one verification
    P:ledger-seq             string counter                 insertion order for ties
    P:rate:<key>             zset   <event> -> time         sliding-window events
    P:conv:<key>             hash   s<bucket>/v<bucket> -> n  conversion guard: started, verified
    P:conv-block:<key>       string blocked-until time      conversion guard block (expires)
    P:secret:<name>          string value
    P:latency                hash   <cell> -> weight        learned delivery latency

Redis Cluster: the Lua scripts touch several of these keys at once, so they
must live in one hash slot. Use a hash-tagged prefix such as ``{otp-router}``
(URL-encoded: ``prefix=%7Botp-router%7D``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "RedisKeys"]

DEFAULT_PREFIX = "otp-router"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Builds the store's key names under one prefix.

    Args:
        prefix: Prepended, with ``:``, to every key.
    """

    prefix: str = DEFAULT_PREFIX

    def record(self, record_id: str) -> str:
        """Hash holding a verification's ``version`` and ``data``."""
        return f"{self.prefix}:rec:{record_id}"

    @property
    def deadlines(self) -> str:
        """Sorted set of record ids scored by their deadline."""
        return f"{self.prefix}:deadlines"

    def idempotency(self, key: str) -> str:
        """String holding the record id created under an idempotency key."""
        return f"{self.prefix}:idem:{key}"

    def ledger_entry(self, key: str) -> str:
        """Hash holding one ledger entry."""
        return f"{self.prefix}:ledger:{key}"

    @property
    def ledger_index(self) -> str:
        """Sorted set of every ledger entry key, scored by time."""
        return f"{self.prefix}:ledger-index"

    def ledger_by_verification(self, verification_id: str) -> str:
        """Sorted set of one verification's ledger entry keys, scored by time."""
        return f"{self.prefix}:ledger-by:{verification_id}"

    @property
    def ledger_seq(self) -> str:
        """Counter that orders ledger entries written at the same time."""
        return f"{self.prefix}:ledger-seq"

    def rate(self, key: str) -> str:
        """Sorted set of one rate limit's events, scored by time."""
        return f"{self.prefix}:rate:{key}"

    def conversion(self, key: str) -> str:
        """Hash of one conversion guard key's started/verified counts per time bucket."""
        return f"{self.prefix}:conv:{key}"

    def conversion_block(self, key: str) -> str:
        """String holding the time a blocked conversion guard key is blocked until."""
        return f"{self.prefix}:conv-block:{key}"

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
