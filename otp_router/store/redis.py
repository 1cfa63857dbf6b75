"""The distributed store: Redis (``redis://``, ``rediss://``, ``unix://``).

Every multi-key step is one Lua script, so it is atomic on the server no
matter how many processes share the Redis: create (with its idempotency key,
rate limits and conversion guard: one round trip per start), compare-and-set
(with its deadline and ledger entries), claiming deadlines, and counting a
rate-limit event. Scripts are registered once per store and run with
``EVALSHA`` (re-sent with ``SCRIPT LOAD`` only if Redis forgot them).

Redis Cluster (``cluster=1``) and the sharded key layout (``shards=N``): every
script then touches keys of one slot. Compare-and-set is unchanged; a start
becomes one script per slot it touches, in the same order (see
:meth:`RedisStore._create_sharded`); claims look at every shard's deadline
index and claim the earliest due ids.

Key names are in :mod:`otp_router.store.keys`. Values are text: versions as
integers, data as the caller's JSON, amounts as exact decimal strings, times
as ``repr(float)``.

Expiry: idempotency keys expire after ``idempotency_ttl`` (a day by default),
after which a retried request with the same key starts a new verification.
Records are kept forever unless ``record_ttl`` is set; it applies only while a
record has no pending deadline (a finished verification), so a record is
never lost while a deadline still points at it. Ledger entries never expire:
they are the cost history.

The ``redis`` package is an optional extra, imported when a store is built.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from otp_router.errors import ConcurrentUpdate, ConfigError, StoreError, VerificationNotFound
from otp_router.redis_common import RedisConnection, cluster_param, require_redis, split_redis_url
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
    CONVERSION_BUCKETS,
    LEDGER_FIELDS,
    check_claim_args,
    check_conversion_args,
    check_create_args,
    check_hit_args,
    check_latency_weight,
    conversion_buckets,
    dedup_entries,
    entry_from_fields,
    entry_to_fields,
    float_text,
    fresh_slots,
    retry_after,
)
from otp_router.store.keys import DEFAULT_PREFIX, RedisKeys

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_IDEMPOTENCY_TTL", "RedisStore"]

#: Seconds an idempotency key is remembered.
DEFAULT_IDEMPOTENCY_TTL = 86400.0
#: Shards of the key layout with ``cluster=1`` unless ``shards`` says otherwise.
DEFAULT_CLUSTER_SHARDS = 16
_MAX_SHARDS = 1024
#: Sharded claims: how often a look whose ids were all taken by other claimers is repeated.
_CLAIM_ATTEMPTS = 3

_VAR = "OTP_ROUTER_STORE_URL"

# Shared Lua helpers. Ledger entry i (0-based) uses KEYS[kbase + 2i] (its hash)
# and KEYS[kbase + 2i + 1] (its verification's index), and its fields are
# ARGV[abase + n*i ...] in LEDGER_FIELDS order, the last one being ``at``.
_LUA_HELPERS = """
local FIELDS = {__FIELDS__}
local NFIELDS = #FIELDS

local function append_ledger(kbase, abase, count, index_key, seq_key)
  for i = 0, count - 1 do
    local entry_key = KEYS[kbase + 2 * i]
    if redis.call('EXISTS', entry_key) == 0 then
      local a = abase + NFIELDS * i
      local args = {}
      for f = 1, NFIELDS do
        args[#args + 1] = FIELDS[f]
        args[#args + 1] = ARGV[a + f - 1]
      end
      args[#args + 1] = 'seq'
      args[#args + 1] = redis.call('INCR', seq_key)
      redis.call('HSET', entry_key, unpack(args))
      local at = ARGV[a + NFIELDS - 1]
      redis.call('ZADD', index_key, at, ARGV[a])
      redis.call('ZADD', KEYS[kbase + 2 * i + 1], at, ARGV[a])
    end
  end
end

-- An empty deadline clears it. A record with no deadline may expire
-- (ttl_ms > 0); one with a deadline never does.
local function set_deadline(rec_key, deadlines_key, id, deadline, ttl_ms)
  if deadline == '' then
    redis.call('ZREM', deadlines_key, id)
    if ttl_ms ~= '0' then
      redis.call('PEXPIRE', rec_key, ttl_ms)
    else
      redis.call('PERSIST', rec_key)
    end
  else
    redis.call('ZADD', deadlines_key, deadline, id)
    redis.call('PERSIST', rec_key)
  end
end

-- Sliding-window limit on one sorted set of event times. Returns false when
-- the event is counted, else the time of the event blocking a new one.
local function hit(key, cutoff, limit, now, member, ttl_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
  local count = redis.call('ZCARD', key)
  limit = tonumber(limit)
  if count >= limit then
    local blocking = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    return blocking[2]
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, ttl_ms)
  return false
end

-- Conversion guard over n rules. Rule i uses KEYS[kbase + 2i - 2] (its count
-- hash) and KEYS[kbase + 2i - 1] (its block key). ARGV from abase: now, oldest
-- bucket in the window, current bucket, block-until time, block ms, count
-- hash ttl ms, current grace slot ('' without a grace), oldest grace slot
-- that may be fresh, then per rule its min_started and min_ratio. Hash fields
-- are "s<bucket>" (started), "v<bucket>" (verified) and "f<slot>" (started,
-- per grace slot: the fresh starts). Returns false when counted, else {rule
-- number (1-based), blocked-until time}.
local function conversion(kbase, n, abase)
  local now = tonumber(ARGV[abase])
  local oldest = tonumber(ARGV[abase + 1])
  local slot = ARGV[abase + 6]
  local oldest_slot = tonumber(ARGV[abase + 7])
  for i = 1, n do
    local counts, block = KEYS[kbase + 2 * i - 2], KEYS[kbase + 2 * i - 1]
    local blocked = redis.call('GET', block)
    if blocked and tonumber(blocked) > now then
      return {i, blocked}
    end
    local fields = redis.call('HGETALL', counts)
    local started, verified, fresh, stale = 0, 0, 0, {}
    for j = 1, #fields, 2 do
      local name = fields[j]
      local kind, index = string.sub(name, 1, 1), tonumber(string.sub(name, 2))
      if kind == 'f' then
        if slot == '' or index < oldest_slot then
          stale[#stale + 1] = name
        else
          fresh = fresh + tonumber(fields[j + 1])
        end
      elseif index < oldest then
        stale[#stale + 1] = name
      elseif kind == 's' then
        started = started + tonumber(fields[j + 1])
      else
        verified = verified + tonumber(fields[j + 1])
      end
    end
    if #stale > 0 then
      redis.call('HDEL', counts, unpack(stale))
    end
    local min_started = tonumber(ARGV[abase + 6 + 2 * i])
    local min_ratio = tonumber(ARGV[abase + 7 + 2 * i])
    local mature = math.max(started - fresh, 0)
    if started >= min_started and verified < min_ratio * mature then
      redis.call('SET', block, ARGV[abase + 3], 'PX', ARGV[abase + 4])
      return {i, ARGV[abase + 3]}
    end
  end
  for i = 1, n do
    redis.call('HINCRBY', KEYS[kbase + 2 * i - 2], 's' .. ARGV[abase + 2], 1)
    if slot ~= '' then
      redis.call('HINCRBY', KEYS[kbase + 2 * i - 2], 'f' .. slot, 1)
    end
    redis.call('PEXPIRE', KEYS[kbase + 2 * i - 2], ARGV[abase + 5])
  end
  return false
end
""".replace("__FIELDS__", ", ".join(f"'{name}'" for name in LEDGER_FIELDS))

# The whole start of a verification in one call.
# KEYS: rec, deadlines, ledger index, ledger seq, idempotency key, then one
#       rate key per limit, then two keys per conversion rule, then entries.
# ARGV: 1 id, 2 data, 3 deadline, 4 record ttl ms, 5 has idempotency key,
#       6 idempotency ttl ms, 7 record key prefix, 8 entry count, 9 limit
#       count, 10 conversion rule count, 11 now, 12 unique event name; then
#       per limit its cutoff, limit and key ttl ms; then (with rules) the
#       conversion arguments (see conversion()); then the entry fields.
# Returns {1} created, {2, id, version, data} existing, {-2} id taken,
# {-3, limit number, blocking event time} or {-4, rule number, blocked-until
# time} refused (the limits before the refusing one stay counted).
_CREATE = (
    _LUA_HELPERS
    + """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    -- The record key is derived, not declared: it shares the prefix (and so
    -- the hash slot, with a hash-tagged prefix) of every other key.
    local found = redis.call('HMGET', ARGV[7] .. existing, 'version', 'data')
    if found[1] then
      return {2, existing, found[1], found[2]}
    end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {-2}
end
local nlim, nconv = tonumber(ARGV[9]), tonumber(ARGV[10])
for i = 1, nlim do
  local a = 10 + 3 * i
  local blocking = hit(KEYS[5 + i], ARGV[a], ARGV[a + 1], ARGV[11], ARGV[12], ARGV[a + 2])
  if blocking then
    return {-3, i, blocking}
  end
end
local kbase, abase = 6 + nlim, 13 + 3 * nlim
if nconv > 0 then
  local blocked = conversion(kbase, nconv, abase)
  if blocked then
    return {-4, blocked[1], blocked[2]}
  end
  kbase, abase = kbase + 2 * nconv, abase + 8 + 2 * nconv
end
redis.call('HSET', KEYS[1], 'version', 1, 'data', ARGV[2])
if ARGV[5] == '1' then
  if ARGV[6] ~= '0' then
    redis.call('SET', KEYS[5], ARGV[1], 'PX', ARGV[6])
  else
    redis.call('SET', KEYS[5], ARGV[1])
  end
end
set_deadline(KEYS[1], KEYS[2], ARGV[1], ARGV[3], ARGV[4])
append_ledger(kbase, abase, tonumber(ARGV[8]), KEYS[3], KEYS[4])
return {1}
"""
)

# KEYS: rec, deadlines, ledger index, ledger seq, entries...
# ARGV: id, expected version, data, deadline, record ttl ms, entry count, entry fields...
# Returns {1, new version}, {0} version moved on, {-1} no such record.
_CAS = (
    _LUA_HELPERS
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then
  return {-1}
end
if current ~= ARGV[2] then
  return {0}
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[3])
set_deadline(KEYS[1], KEYS[2], ARGV[1], ARGV[4], ARGV[5])
append_ledger(5, 7, tonumber(ARGV[6]), KEYS[3], KEYS[4])
return {1, version}
"""
)

# KEYS: deadlines. ARGV: now, limit, leased deadline. Returns the claimed ids.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
end
return ids
"""

# Sharded layout: claim these due ids of one shard. KEYS: the shard's deadlines.
# ARGV: now, leased deadline, ids... Returns the ids still due (now claimed).
_CLAIM_IDS = """
local claimed = {}
local now = tonumber(ARGV[1])
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i])
    claimed[#claimed + 1] = ARGV[i]
  end
end
return claimed
"""

# Sharded layout: reserve an idempotency key for a create. KEYS: the key's hash.
# ARGV: record id, payload (what the create writes, as JSON), ttl ms, the id of
# a reservation known to be stale ('' if none). Returns {1} reserved, or
# {0, payload, done} when another create holds the key.
_RESERVE = """
local current = redis.call('HGET', KEYS[1], 'id')
if current and current ~= ARGV[1] and current ~= ARGV[4] then
  local found = redis.call('HMGET', KEYS[1], 'payload', 'done')
  return {0, found[1], found[2] or ''}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'payload', ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1}
"""

# Sharded layout: mark a reservation done, unless it was replaced meanwhile.
# KEYS: the idempotency key's hash. ARGV: the record id it must still name.
_MARK_DONE = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'done', '1')
end
"""

# KEYS: conversion count hashes. ARGV: field, ttl ms. Counts one verification on each.
_CONVERSION_VERIFIED = """
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[1], 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
"""

# KEYS: secret. ARGV: value. Stores it unless present; returns the stored one.
_SECRET = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""

# KEYS: rate key. ARGV: cutoff (events at or before it left the window),
# limit, now, unique event name, key ttl ms.
# Returns false when counted, else the time of the event blocking a new one.
_HIT = _LUA_HELPERS + "\nreturn hit(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"

# Conversion guard. KEYS: per rule, its count hash then its block key.
# ARGV: see conversion(). Returns false when counted, else {rule number, blocked-until time}.
_CONVERSION_START = _LUA_HELPERS + "\nreturn conversion(1, #KEYS / 2, 1)\n"


def _ms(seconds: float | None) -> str:
    """Milliseconds for PX/PEXPIRE as text; ``"0"`` means "never expires"."""
    if seconds is None or seconds <= 0:
        return "0"
    return str(max(1, math.ceil(seconds * 1000)))


class RedisStore(RedisConnection):
    """A :class:`~otp_router.store.base.Store` in Redis.

    Building the store opens no connection; the first call (or :meth:`ping`)
    does. The connection plumbing is
    :class:`~otp_router.redis_common.RedisConnection`'s.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…``
            or ``unix:///path/to/socket``. Our own query parameters are taken
            out before the rest goes to redis-py: ``prefix``,
            ``idempotency_ttl`` and ``record_ttl`` (seconds; ``0`` means
            never expire), ``cluster=1`` (talk to a Redis Cluster through
            redis-py's ``RedisCluster``; the URL names any one node) and
            ``shards`` (the sharded key layout of
            :mod:`otp_router.store.keys`: 16 with ``cluster=1``, else 0, the
            single layout). Being the operator's configuration, they take
            precedence over the keyword arguments below.
        prefix: Key prefix when the URL has none; default ``otp-router``.
        idempotency_ttl: Seconds an idempotency key is remembered (None:
            forever). Default one day.
        record_ttl: Seconds a record without a pending deadline is kept
            after its last write (None: forever).
        max_connections: Pool size (redis-py's ``max_connections`` URL
            parameter overrides it). Callers beyond it wait for a free
            connection instead of failing; on a cluster it is per node, and
            callers beyond it fail with :class:`~otp_router.errors.StoreError`
            (redis-py's cluster pools do not wait).

    Raises:
        ConfigError: The ``redis`` package is not installed, or a query
            parameter is invalid.
    """

    _kind = "store"
    _error_prefix = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        idempotency_ttl: float | None = DEFAULT_IDEMPOTENCY_TTL,
        record_ttl: float | None = None,
        max_connections: int = 50,
    ) -> None:
        require_redis(_VAR)
        # One URL may configure both store and queue: the queue's own parameters are not redis-py's.
        client_url, params = split_redis_url(
            url,
            ours=("prefix", "idempotency_ttl", "record_ttl", "cluster", "shards"),
            ignored=("group", "dead_letter_maxlen"),
        )
        key_prefix = params.get("prefix", prefix or DEFAULT_PREFIX)
        if not key_prefix:
            raise ConfigError(f"{_VAR}: prefix must not be empty")
        cluster = cluster_param(params, _VAR)
        self.keys = RedisKeys(key_prefix, _shards_param(params, DEFAULT_CLUSTER_SHARDS if cluster else 0))
        self._idempotency_ttl = _ttl_param(params, "idempotency_ttl", idempotency_ttl)
        self._record_ttl = _ttl_param(params, "record_ttl", record_ttl)
        super().__init__(client_url, max_connections=max_connections, cluster=cluster)
        self._create: AsyncScript = self._client.register_script(_CREATE)
        self._cas: AsyncScript = self._client.register_script(_CAS)
        self._claim: AsyncScript = self._client.register_script(_CLAIM)
        self._hit: AsyncScript = self._client.register_script(_HIT)
        self._conversion: AsyncScript = self._client.register_script(_CONVERSION_START)
        self._claim_ids: AsyncScript = self._client.register_script(_CLAIM_IDS)
        self._reserve: AsyncScript = self._client.register_script(_RESERVE)
        self._verified: AsyncScript = self._client.register_script(_CONVERSION_VERIFIED)
        self._secret: AsyncScript = self._client.register_script(_SECRET)
        self._mark_done: AsyncScript = self._client.register_script(_MARK_DONE)

    def _ledger_args(self, record_id: str, entries: Sequence[LedgerEntry]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the Lua ``append_ledger()`` helper for entries written with ``record_id``.

        Raises:
            ValueError: Sharded layout, and an entry belongs to a verification
                of another shard (its keys could not be written in the same step).
        """
        shard = self.keys.shard_of(record_id)
        args: list[str] = []
        for entry in dedup_entries(entries):
            if self.keys.shard_of(entry.verification_id) != shard:
                raise ValueError("a ledger entry must belong to the verification it is written with")
            fields = entry_to_fields(entry)
            args += [fields[name] for name in LEDGER_FIELDS]
        return self._entry_keys(shard, args), args

    def _entry_keys(self, shard: int, args: Sequence[str]) -> list[str]:
        """Each entry's hash and its verification's index, from the entries' ARGV (LEDGER_FIELDS order)."""
        keys: list[str] = []
        for i in range(0, len(args), len(LEDGER_FIELDS)):
            key, verification_id = args[i], args[i + 1]
            keys += [self.keys.ledger_entry(key, shard), self.keys.ledger_by_verification(verification_id)]
        return keys

    def _shard_keys(self, record_id: str) -> list[str]:
        """KEYS 1 to 4 of the create and compare-and-set scripts: the record and its shard's indexes."""
        shard = self.keys.shard_of(record_id)
        return [
            self.keys.record(record_id),
            self.keys.deadlines(shard),
            self.keys.ledger_index(shard),
            self.keys.ledger_seq(shard),
        ]

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
        """Insert a new record at version 1 (see :meth:`Store.create`): one ``EVALSHA``.

        Raises:
            RecordExists: ``record_id`` already exists (ids must be unique).
            LimitReached: A limit or the conversion guard refused.
            StoreError: Redis failed.
        """
        at = check_create_args(limits, conversion, now)
        entry_keys, entry_args = self._ledger_args(record_id, ledger)
        if self.keys.sharded:
            created = await self._create_sharded(
                record_id, data, idempotency_key, deadline, entry_args, limits, conversion, at
            )
            return created
        rec_key = self.keys.record(record_id)
        idem_key = self.keys.idempotency(idempotency_key) if idempotency_key is not None else rec_key
        rules = conversion.rules if conversion is not None else ()
        keys = [*self._shard_keys(record_id), idem_key]
        args = [
            record_id,
            data,
            "" if deadline is None else float_text(deadline),
            _ms(self._record_ttl),
            "0" if idempotency_key is None else "1",
            _ms(self._idempotency_ttl),
            self.keys.record(""),
            str(len(entry_keys) // 2),
            str(len(limits)),
            str(len(rules)),
            float_text(at),
            # A unique member per event: several events may share one ``now``.
            uuid.uuid4().hex,
        ]
        for limit in limits:
            keys.append(self.keys.rate(limit.key))
            args += [float_text(at - limit.window), str(limit.limit), _ms(limit.window)]
        if conversion is not None and rules:
            conv_keys, conv_args = self._conversion_args(
                rules, conversion.window, conversion.cooldown, at, conversion.grace
            )
            keys += conv_keys
            args += conv_args
        with self._mapped():
            result: list[Any] = await self._create(keys=keys + entry_keys, args=args + entry_args)
        if result[0] == 2:
            return Record(id=result[1], version=int(result[2]), data=result[3]), False
        if result[0] == -2:
            raise RecordExists("a record with this id already exists")
        if result[0] == -3:
            limit = limits[int(result[1]) - 1]
            wait = retry_after([float(result[2])], limit=1, window=limit.window, now=at)
            raise LimitReached(limit.key, wait)
        if result[0] == -4:
            raise LimitReached(rules[int(result[1]) - 1].key, float(result[2]) - at)
        return Record(id=record_id, version=1, data=data), True

    async def _insert(self, record_id: str, data: str, deadline: str, entry_args: Sequence[str]) -> bool:
        """Sharded layout: write a new record with its deadline and ledger (one script, one slot).

        Returns:
            False when the record already exists (nothing is written).
        """
        shard = self.keys.shard_of(record_id)
        rec_key = self.keys.record(record_id)
        args = [
            record_id,
            data,
            deadline,
            _ms(self._record_ttl),
            "0",
            "0",
            "",
            str(len(entry_args) // len(LEDGER_FIELDS)),
        ]
        args += ["0", "0", "0", ""]
        with self._mapped():
            result: list[Any] = await self._create(
                keys=[*self._shard_keys(record_id), rec_key, *self._entry_keys(shard, entry_args)],
                args=args + list(entry_args),
            )
        return bool(result[0] == 1)

    async def _create_sharded(
        self,
        record_id: str,
        data: str,
        idempotency_key: str | None,
        deadline: float | None,
        entry_args: list[str],
        limits: Sequence[RateLimit],
        conversion: ConversionCheck | None,
        now: float,
    ) -> tuple[Record, bool]:
        """:meth:`create` in the sharded layout, where its keys live in several slots.

        The steps of :meth:`Store.create` run in order, each one script on
        one slot: the idempotency lookup and the id check, each limit, the
        conversion guard, then (with an idempotency key) a *reservation* of
        the key that holds everything the create writes, the record itself,
        and a ``done`` mark on the reservation. Whoever finds a reservation
        without its mark (its creator crashed, or is between the two writes)
        writes the record from it; that write is "create unless it exists",
        so doing it twice changes nothing. A create that loses the race for a
        key returns the winner's record, as on one Redis.
        """
        deadline_text = "" if deadline is None else float_text(deadline)
        stale = ""
        idem_key = self.keys.idempotency(idempotency_key) if idempotency_key is not None else None
        if idem_key is not None:
            with self._mapped():
                held: dict[Any, Any] = await self._client.hgetall(idem_key)
            if held:
                found = await self._complete(idem_key, held.get("payload", ""), held.get("done", ""))
                if found is not None:
                    return found, False
                stale = held.get("id", "")
        with self._mapped():
            taken = await self._client.exists(self.keys.record(record_id))
        if taken:
            raise RecordExists("a record with this id already exists")
        for limit in limits:
            wait = await self.hit(limit.key, limit=limit.limit, window=limit.window, now=now)
            if wait is not None:
                raise LimitReached(limit.key, wait)
        if conversion is not None and conversion.rules:
            blocked = await self.conversion_start(
                conversion.rules,
                window=conversion.window,
                cooldown=conversion.cooldown,
                now=now,
                grace=conversion.grace,
            )
            if blocked is not None:
                raise LimitReached(*blocked)
        if idem_key is not None:
            payload = json.dumps([record_id, data, deadline_text, entry_args])
            with self._mapped():
                reserved: list[Any] = await self._reserve(
                    keys=[idem_key], args=[record_id, payload, _ms(self._idempotency_ttl), stale]
                )
            if reserved[0] == 0:
                found = await self._complete(idem_key, reserved[1], reserved[2])
                if found is None:
                    # The winner's record is already gone (expired): rare; the caller's retry starts afresh.
                    raise StoreError("an idempotent create raced with an expiring verification; retry")
                return found, False
        inserted = await self._insert(record_id, data, deadline_text, entry_args)
        if not inserted:
            if idem_key is None:
                raise RecordExists("a record with this id already exists")
            # Our own reservation, completed by a replay before we got here.
            current = await self.get(record_id)
            if current is None:  # pragma: no cover - expired between two calls
                raise StoreError("the verification expired while it was created; retry")
            return current, True
        if idem_key is not None:
            with self._mapped():
                await self._mark_done(keys=[idem_key], args=[record_id])
        return Record(id=record_id, version=1, data=data), True

    async def _complete(self, idem_key: str, payload: str, done: str) -> Record | None:
        """The record a reservation names, written from the reservation first if it is not marked done.

        Returns:
            None when that record no longer exists (expired after it finished):
            the reservation is stale.
        """
        record_id, data, deadline_text, entry_args = json.loads(payload)
        if done != "1":
            # Crash recovery: the creator may have died between the
            # reservation and the record. Writing it again is harmless (the
            # record is only created if missing). A marked reservation is
            # never replayed, so a finished record that expired is not revived.
            await self._insert(record_id, data, deadline_text, entry_args)
            with self._mapped():
                await self._mark_done(keys=[idem_key], args=[record_id])
        return await self.get(str(record_id))

    def _conversion_args(
        self, rules: Sequence[ConversionRule], window: float, cooldown: float, now: float, grace: float
    ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the Lua ``conversion()`` helper."""
        current, oldest = conversion_buckets(window, now)
        slots = fresh_slots(grace, now)
        keys: list[str] = []
        limits: list[str] = []
        for rule in rules:
            keys += [self.keys.conversion(rule.key), self.keys.conversion_block(rule.key)]
            limits += [str(rule.min_started), float_text(rule.min_ratio)]
        args = [float_text(now), str(oldest), str(current), float_text(now + cooldown), _ms(cooldown)]
        args += [_ms(window * (1 + 2 / CONVERSION_BUCKETS))]
        args += [str(slots[0]), str(slots[1])] if slots is not None else ["", "0"]
        args += limits
        return keys, args

    async def get(self, record_id: str) -> Record | None:
        """Load a record, or None."""
        with self._mapped():
            found: list[Any] = await self._client.hmget(self.keys.record(record_id), ["version", "data"])
        version, data = found
        if version is None:
            return None
        return Record(id=record_id, version=int(version), data=str(data))

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
        entry_keys, entry_args = self._ledger_args(record_id, ledger)
        keys = self._shard_keys(record_id)
        args = [
            record_id,
            str(int(expected_version)),
            data,
            "" if deadline is None else float_text(deadline),
            _ms(self._record_ttl),
            str(len(entry_keys) // 2),
        ]
        with self._mapped():
            result: list[Any] = await self._cas(keys=keys + entry_keys, args=args + entry_args)
        if result[0] == -1:
            raise VerificationNotFound("no verification with this id")
        if result[0] == 0:
            raise ConcurrentUpdate("the record was changed by another writer")
        return Record(id=record_id, version=int(result[1]), data=data)

    async def claim_due(self, now: float, *, limit: int, lease: float) -> list[str]:
        """Claim up to ``limit`` due deadlines, earliest first (see :meth:`Store.claim_due`)."""
        check_claim_args(limit, lease)
        if self.keys.sharded:
            return await self._claim_sharded(now, limit, lease)
        with self._mapped():
            ids: list[str] = await self._claim(
                keys=[self.keys.deadlines()],
                args=[float_text(now), str(limit), float_text(now + lease)],
            )
        return list(ids)

    async def _claim_sharded(self, now: float, limit: int, lease: float) -> list[str]:
        """Claim across shards, earliest first: look at each shard's earliest due ids, claim the earliest.

        The look is one pipeline (a Redis Cluster client sends each node its
        shards' reads at once); the claims are one script per shard, which
        claims an id only if it is still due, so two claimers never both get
        one. Ids another claimer took in between are skipped, and the look is
        repeated (a few times at most) only if that left nothing.
        """
        shards = range(self.keys.shards)
        now_text, leased = float_text(now), float_text(now + lease)
        for _ in range(_CLAIM_ATTEMPTS):
            with self._mapped():
                async with self._client.pipeline(transaction=False) as pipe:
                    for shard in shards:
                        pipe.zrangebyscore(
                            self.keys.deadlines(shard), "-inf", now_text, start=0, num=limit, withscores=True
                        )
                    looks: list[list[Any]] = await pipe.execute()
            due = sorted(
                (float(score), rid, shard)
                for shard, rows in zip(shards, looks, strict=True)
                for rid, score in rows
            )[:limit]
            if not due:
                return []
            by_shard: dict[int, list[str]] = {}
            for _, rid, shard in due:
                by_shard.setdefault(shard, []).append(rid)
            with self._mapped():
                results = await asyncio.gather(
                    *(
                        self._claim_ids(keys=[self.keys.deadlines(shard)], args=[now_text, leased, *ids])
                        for shard, ids in by_shard.items()
                    )
                )
            claimed = {rid for result in results for rid in result}
            if claimed:
                return [rid for _, rid, _ in due if rid in claimed]
        return []

    async def next_deadline(self) -> float | None:
        """The earliest scheduled deadline, or None."""
        with self._mapped():
            async with self._client.pipeline(transaction=False) as pipe:
                for shard in range(max(1, self.keys.shards)):
                    pipe.zrange(self.keys.deadlines(shard), 0, 0, withscores=True)
                firsts: list[list[Any]] = await pipe.execute()
        scores = [float(first[0][1]) for first in firsts if first]
        return min(scores) if scores else None

    async def ledger(self, record_id: str | None = None) -> list[LedgerEntry]:
        """Ledger entries ordered by time, ties in insertion order."""
        if record_id is None:
            indexes = [(shard, self.keys.ledger_index(shard)) for shard in range(max(1, self.keys.shards))]
        else:
            indexes = [(self.keys.shard_of(record_id), self.keys.ledger_by_verification(record_id))]
        with self._mapped():
            async with self._client.pipeline(transaction=False) as pipe:
                for _, index in indexes:
                    pipe.zrange(index, 0, -1)
                listed: list[list[Any]] = await pipe.execute()
            wanted = [(shard, key) for (shard, _), keys in zip(indexes, listed, strict=True) for key in keys]
            async with self._client.pipeline(transaction=False) as pipe:
                for shard, key in wanted:
                    pipe.hgetall(self.keys.ledger_entry(key, shard))
                found: list[dict[str, str]] = await pipe.execute()
        # The index orders by time then key; re-sort by (time, seq) so that
        # entries written at the same instant keep their insertion order
        # (each shard counts its own seq: ties across shards go by shard).
        rows = sorted(
            ((shard, row) for (shard, _), row in zip(wanted, found, strict=True) if row),
            key=lambda item: (float(item[1]["at"]), item[0], int(item[1]["seq"])),
        )
        return [entry_from_fields(row) for _, row in rows]

    async def hit(self, key: str, *, limit: int, window: float, now: float) -> float | None:
        """Count one event against a sliding-window limit (see :meth:`Store.hit`).

        The key also expires ``window`` seconds (of Redis's clock) after its
        last counted event, so idle limits free their memory.
        """
        check_hit_args(limit, window)
        with self._mapped():
            blocking: str | None = await self._hit(
                keys=[self.keys.rate(key)],
                # A unique member per event: several events may share one ``now``.
                args=[float_text(now - window), str(limit), float_text(now), uuid.uuid4().hex, _ms(window)],
            )
        if blocking is None:
            return None
        # Only the blocking event's time crosses the wire; the subtraction is
        # done here, in the same arithmetic as the other stores.
        return retry_after([float(blocking)], limit=1, window=window, now=now)

    async def conversion_start(
        self,
        rules: Sequence[ConversionRule],
        *,
        window: float,
        cooldown: float,
        now: float,
        grace: float = 0.0,
    ) -> tuple[str, float] | None:
        """Count a start unless a key is blocked (see :meth:`Store.conversion_start`).

        Count hashes expire one window after their last start; a block key
        expires after ``cooldown`` seconds (of Redis's clock).
        """
        check_conversion_args(rules, window, cooldown, grace)
        if not rules:
            return None
        keys, args = self._conversion_args(rules, window, cooldown, now, grace)
        with self._mapped():
            blocked: list[Any] | None = await self._conversion(keys=keys, args=args)
        if not blocked:
            return None
        number, until = blocked
        return rules[int(number) - 1].key, float(until) - now

    async def conversion_verified(self, keys: Sequence[str], *, window: float, now: float) -> None:
        """Count a verification on each key (see :meth:`Store.conversion_verified`)."""
        current, _ = conversion_buckets(window, now)
        if not keys:
            return
        with self._mapped():
            await self._verified(
                keys=[self.keys.conversion(key) for key in keys],
                args=[f"v{current}", _ms(window * (1 + 2 / CONVERSION_BUCKETS))],
            )

    async def get_or_set_secret(self, name: str, value: str) -> str:
        """Return the stored secret, storing ``value`` first if absent."""
        with self._mapped():
            stored: str = await self._secret(keys=[self.keys.secret(name)], args=[value])
        return str(stored)

    async def add_latency(self, cell: str, weight: float) -> None:
        """Add ``weight`` to a latency cell (see :meth:`Store.add_latency`): one ``HINCRBYFLOAT``."""
        check_latency_weight(weight)
        with self._mapped():
            await self._client.hincrbyfloat(self.keys.latency, cell, float(weight))

    async def latency_cells(self) -> dict[str, float]:
        """Every latency cell and its weight."""
        with self._mapped():
            raw: dict[Any, Any] = await self._client.hgetall(self.keys.latency)
        return {str(cell): float(weight) for cell, weight in raw.items()}

    async def drop_latency(self, cells: Sequence[str]) -> None:
        """Delete these latency cells."""
        if not cells:
            return
        with self._mapped():
            await self._client.hdel(self.keys.latency, *cells)


def _shards_param(params: dict[str, str], default: int) -> int:
    """The ``shards`` URL parameter (0: the single layout), else ``default``."""
    if "shards" not in params:
        return default
    try:
        shards = int(params["shards"])
    except ValueError:
        raise ConfigError(f"{_VAR}: shards must be a whole number") from None
    if not 0 <= shards <= _MAX_SHARDS:
        raise ConfigError(f"{_VAR}: shards must be between 0 and {_MAX_SHARDS}")
    return shards


def _ttl_param(params: dict[str, str], name: str, default: float | None) -> float | None:
    """A TTL from the URL (``0`` = forever), else ``default``."""
    if name not in params:
        return default
    try:
        seconds = float(params[name])
    except ValueError:
        raise ConfigError(f"{_VAR}: {name} must be a number of seconds") from None
    if seconds < 0 or math.isnan(seconds):
        raise ConfigError(f"{_VAR}: {name} must not be negative")
    return None if seconds == 0 else seconds
