"""The distributed queue: a Redis stream read through a consumer group.

* :meth:`RedisStreamQueue.read` is ``XREADGROUP … >``: each entry goes to one
  consumer of the group and stays in the group's pending entries list (PEL)
  under that consumer's name.
* :meth:`RedisStreamQueue.ack` is ``XACK`` + ``XDEL`` in one Lua script: a
  processed entry leaves the stream, so the stream's length is always the
  waiting plus the pending messages and never grows without bound.
* :meth:`RedisStreamQueue.reclaim` is ``XAUTOCLAIM``: entries idle in a
  dead consumer's PEL for longer than the visibility timeout move to the
  caller. :meth:`RedisStreamQueue.touch` is ``XCLAIM … JUSTID`` by the owner
  itself, which resets the idle time without counting a delivery.
* :meth:`RedisStreamQueue.dead_letter` is one Lua script: acknowledge, and
  only if this call acknowledged it, copy the entry with its reason to the
  dead-letter stream, then delete it. Two workers dead-lettering the same
  entry therefore leave one dead letter.

The consumer group is created on first use (``XGROUP CREATE … 0 MKSTREAM``,
``BUSYGROUP`` ignored), at id ``0`` so that messages enqueued before any
worker ever ran are consumed too; if the stream is deleted under a running
worker, the group is recreated on the next ``NOGROUP`` error.

Key names are in :mod:`otp_router.constants`. With ``cluster=1`` the queue
talks to a Redis Cluster and its two streams share one hash tag, so every
command and script touches one slot: the queue lives on one shard, which
serves far more messages a second than the workers start verifications (see
the README's "Scale" section). The store's keys are spread over the other
slots; the heartbeat keys are single keys anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from otp_router.constants import DEAD_LETTER_MAXLEN, DEFAULT_GROUP, DEFAULT_PREFIX, QueueKeys
from otp_router.errors import ConfigError
from otp_router.queue.base import DeadLetter, Delivery, QueueMessage, message_text
from otp_router.redis_common import RedisConnection, cluster_param, require_redis, split_redis_url

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["RedisStreamQueue"]

_VAR = "OTP_ROUTER_QUEUE_URL"
#: Query parameters the store reads from the same URL; the queue ignores them.
_STORE_PARAMS = frozenset({"idempotency_ttl", "record_ttl", "shards"})
#: Smallest per-node pool on a cluster, whose pools fail rather than wait when full.
_CLUSTER_MIN_CONNECTIONS = 200
#: Fields the dead-letter stream adds to the original ones.
_DEAD_FIELDS = ("reason", "failed_at", "message_id", "attempts")

# KEYS: stream, dead-letter stream. ARGV: group, id, maxlen, field/value pairs...
# Returns 1 when this call dead-lettered the entry, 0 when it was no longer pending.
_DEAD_LETTER = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  local args = {KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
  for i = 4, #ARGV do
    args[#args + 1] = ARGV[i]
  end
  redis.call('XADD', unpack(args))
end
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
"""

# KEYS: stream. ARGV: group, id. Acknowledge and delete (a script, not MULTI: one slot, one round trip).
_ACK = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# KEYS: stream. ARGV: group. Returns {stream length, pending entries} read at one instant.
_COUNTS = """
local length = redis.call('XLEN', KEYS[1])
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
return {length, summary[1]}
"""

# KEYS: stream. ARGV: group. Returns {id of the first entry after the group's
# last-delivered id or '', server seconds, microseconds}.
_OLDEST_WAITING = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOGROUP the stream is gone')
end
local last = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = nil, nil
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name == ARGV[1] then last = delivered end
end
if last == nil then
  return redis.error_reply('NOGROUP no such consumer group')
end
local now = redis.call('TIME')
local first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #first == 0 then
  return {'', now[1], now[2]}
end
return {first[1][1], now[1], now[2]}
"""


def _entry_time(entry_id: str) -> float:
    """Unix time encoded in a stream entry id (milliseconds before the dash)."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


class RedisStreamQueue(RedisConnection):
    """A :class:`~otp_router.queue.base.Queue` on a Redis stream and consumer group.

    Building the queue opens no connection; the first call does.

    Args:
        url: ``redis://…``, ``rediss://…`` or ``unix://…``. Our query
            parameters are taken out before the rest goes to redis-py:
            ``prefix`` (shared with the store), ``group`` (consumer group
            name), ``dead_letter_maxlen`` and ``cluster=1`` (a Redis
            Cluster; the keys of :mod:`otp_router.constants`' cluster
            layout). The store's own parameters (``idempotency_ttl``,
            ``record_ttl``, ``shards``) are ignored, so one URL can serve both.
        prefix: Key prefix when the URL has none; default ``otp-router``.
        group: Consumer group when the URL has none; default ``otp-router-workers``.
        max_connections: Pool size. A blocking read holds one connection.
            On a cluster it is per node and callers beyond it fail instead
            of waiting (redis-py's cluster pools do not wait), so it is at
            least 200 there: more than a worker's concurrent acknowledgements.

    Raises:
        ConfigError: The ``redis`` package is missing or a parameter is invalid.
    """

    _kind = "queue"
    _error_prefix = "queue: redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        group: str | None = None,
        max_connections: int = 20,
    ) -> None:
        require_redis(_VAR)
        client_url, params = split_redis_url(
            url, ours=("prefix", "group", "dead_letter_maxlen", "cluster"), ignored=_STORE_PARAMS
        )
        cluster = cluster_param(params, _VAR)
        self.keys = QueueKeys(params.get("prefix", prefix or DEFAULT_PREFIX), tagged=cluster)
        self.group = params.get("group", group or DEFAULT_GROUP)
        if not self.keys.prefix or not self.group:
            raise ConfigError(f"{_VAR}: prefix and group must not be empty")
        try:
            self.dead_letter_maxlen = int(params.get("dead_letter_maxlen", DEAD_LETTER_MAXLEN))
        except ValueError:
            raise ConfigError(f"{_VAR}: dead_letter_maxlen must be an integer") from None
        # surrogateescape: an entry whose bytes are not UTF-8 (written by another
        # program) reads as text with lone surrogates, which parse_message refuses
        # as bad_encoding, and dead-lettering writes the very same bytes back.
        # Strict decoding would fail every read that includes it, forever.
        super().__init__(
            client_url,
            max_connections=max(max_connections, _CLUSTER_MIN_CONNECTIONS) if cluster else max_connections,
            encoding_errors="surrogateescape",
            cluster=cluster,
        )
        self._dead_letter: AsyncScript = self._client.register_script(_DEAD_LETTER)
        self._ack: AsyncScript = self._client.register_script(_ACK)
        self._counts: AsyncScript = self._client.register_script(_COUNTS)
        self._oldest_waiting: AsyncScript = self._client.register_script(_OLDEST_WAITING)
        self._group_ready = False

    # -- plumbing ---------------------------------------------------------

    async def _ensure_group(self, *, again: bool = False) -> None:
        if self._group_ready and not again:
            return
        try:
            await self._client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except self._response_error as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _grouped(self, call: Any) -> Any:
        """Run ``call()`` (a group command), recreating the group once if it vanished."""
        with self._mapped():
            await self._ensure_group()
            try:
                return await call()
            except self._response_error as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted (FLUSHDB, a cleanup script): start over empty.
                await self._ensure_group(again=True)
                return await call()

    async def _attempts(self, ids: Sequence[str]) -> dict[str, int]:
        """Delivery counts of pending entries, from the PEL."""
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(self.keys.stream, self.group, min=entry_id, max=entry_id, count=1)
            rows: list[list[dict[str, Any]]] = await pipe.execute()
        return {row[0]["message_id"]: int(row[0]["times_delivered"]) for row in rows if row}

    # -- Queue protocol -----------------------------------------------------

    async def enqueue(self, message: QueueMessage | str) -> str:
        """``XADD <prefix>:queue * data <json>``; returns the entry id."""
        data = message_text(message)
        with self._mapped():
            entry_id: Any = await self._client.xadd(self.keys.stream, {"data": data})
        return str(entry_id)

    async def read(self, consumer: str, count: int, block: float) -> list[Delivery]:
        """``XREADGROUP GROUP <group> <consumer> COUNT <count> [BLOCK ms] STREAMS <stream> >``."""
        block_ms = max(1, int(block * 1000)) if block > 0 else None

        async def call() -> Any:
            return await self._client.xreadgroup(
                self.group, consumer, {self.keys.stream: ">"}, count=max(1, count), block=block_ms
            )

        response = await self._grouped(call)
        if not response:
            return []
        entries: list[tuple[str, dict[str, str] | None]] = response[0][1]
        return [Delivery(eid, dict(fields or {}), _entry_time(eid)) for eid, fields in entries]

    async def ack(self, delivery: Delivery) -> None:
        """``XACK`` and ``XDEL`` in one script."""
        with self._mapped():
            await self._ack(keys=[self.keys.stream], args=[self.group, delivery.id])

    async def reclaim(self, consumer: str, min_idle: float, count: int) -> list[Delivery]:
        """``XAUTOCLAIM`` entries idle for ``min_idle`` seconds, following the cursor."""
        min_idle_ms = max(0, int(min_idle * 1000))
        claimed: list[tuple[str, dict[str, str]]] = []
        cursor = "0-0"
        # XAUTOCLAIM scans a bounded slice of the PEL per call; a few rounds cover a long one.
        for _ in range(10):
            want = count - len(claimed)

            async def call(start: str = cursor, want: int = want) -> Any:
                return await self._client.xautoclaim(
                    self.keys.stream, self.group, consumer, min_idle_ms, start, count=want
                )

            result = await self._grouped(call)
            cursor, entries = result[0], result[1]
            # Entries deleted from the stream come back as ids only (Redis 7 drops them from the PEL).
            claimed += [(eid, fields) for eid, fields in entries if fields is not None]
            if cursor == "0-0" or len(claimed) >= count:
                break
        if not claimed:
            return []
        with self._mapped():
            attempts = await self._attempts([eid for eid, _ in claimed])
        return [
            Delivery(eid, dict(fields), _entry_time(eid), attempts.get(eid, 2)) for eid, fields in claimed
        ]

    async def touch(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """``XCLAIM … 0 <ids> JUSTID``: reset idle time without counting a delivery."""
        if not deliveries:
            return
        ids: list[Any] = [d.id for d in deliveries]

        async def call() -> Any:
            return await self._client.xclaim(
                self.keys.stream, self.group, consumer, min_idle_time=0, message_ids=ids, justid=True
            )

        await self._grouped(call)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Acknowledge, copy to ``<prefix>:dead-letters`` with the reason, delete (one script).

        The original fields keep their names; one that clashes with ours
        (``reason``, ``failed_at``, ``message_id``, ``attempts``) is kept as
        ``original_<name>``.
        """
        fields: dict[str, str] = {}
        for name, value in delivery.fields.items():
            fields[f"original_{name}" if name in _DEAD_FIELDS else name] = value
        fields.update(
            reason=reason,
            failed_at=repr(time.time()),
            message_id=delivery.id,
            attempts=str(delivery.attempt),
        )
        args: list[str] = [self.group, delivery.id, str(self.dead_letter_maxlen)]
        for name, value in fields.items():
            args += [name, value]
        with self._mapped():
            await self._dead_letter(keys=[self.keys.stream, self.keys.dead_letters], args=args)

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """``XRANGE <prefix>:dead-letters - + COUNT count``."""
        with self._mapped():
            entries: Any = await self._client.xrange(self.keys.dead_letters, "-", "+", count=count)
        out = []
        for entry_id, raw in entries:
            original = {k: v for k, v in raw.items() if k not in _DEAD_FIELDS}
            for name in _DEAD_FIELDS:
                if f"original_{name}" in original:
                    original[name] = original.pop(f"original_{name}")
            out.append(
                DeadLetter(
                    id=entry_id,
                    message_id=raw.get("message_id", ""),
                    fields=original,
                    reason=raw.get("reason", ""),
                    failed_at=float(raw.get("failed_at", 0.0)),
                    attempts=int(raw.get("attempts", 0)),
                )
            )
        return out

    async def depth(self) -> int:
        """Stream length minus pending entries (acknowledged entries are deleted)."""
        length, pending = await self._length_and_pending()
        return max(0, length - pending)

    async def pending(self) -> int:
        """Entries in the group's PEL."""
        return (await self._length_and_pending())[1]

    async def _length_and_pending(self) -> tuple[int, int]:
        async def call() -> Any:
            return await self._counts(keys=[self.keys.stream], args=[self.group])

        length, pending = await self._grouped(call)
        return int(length), int(pending)

    async def lag(self) -> float:
        """Age of the first entry after the group's last-delivered id, by Redis's clock (one script)."""

        async def call() -> Any:
            return await self._oldest_waiting(keys=[self.keys.stream], args=[self.group])

        first, seconds, micros = await self._grouped(call)
        if not first:
            return 0.0
        return max(0.0, int(seconds) + int(micros) / 1e6 - _entry_time(str(first)))

    async def heartbeat(self, worker: str, ttl: float) -> None:
        """``SET <prefix>:heartbeat:<worker> <now> PX <ttl>``."""
        with self._mapped():
            await self._client.set(self.keys.heartbeat(worker), repr(time.time()), px=max(1, int(ttl * 1000)))

    async def last_heartbeat(self, worker: str) -> float | None:
        """The heartbeat's time, or None once its TTL has passed."""
        with self._mapped():
            value: Any = await self._client.get(self.keys.heartbeat(worker))
        return None if value is None else float(value)

    async def clear_heartbeat(self, worker: str) -> None:
        """Delete the heartbeat key."""
        with self._mapped():
            await self._client.delete(self.keys.heartbeat(worker))
