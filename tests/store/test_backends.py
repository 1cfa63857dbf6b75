"""Behaviour specific to one backend: SQLite durability and schema, Redis key layout and expiry."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from otp_router.errors import StoreError
from otp_router.store import ConversionRule, LedgerEntry, LedgerKind, Record, RedisStore, SqliteStore
from otp_router.store.sqlite import MIGRATIONS


def entry(key: str, vid: str, amount: str = "0.0083") -> LedgerEntry:
    return LedgerEntry(key, vid, "sms", "twilio", "US", LedgerKind.ESTIMATE, Decimal(amount), "USD", 1.5)


# -- SQLite ----------------------------------------------------------------


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    """Records, deadlines, ledger, rate events and secrets are all there after close and reopen."""
    path = tmp_path / "otp.db"
    now = time.time()
    store = SqliteStore(path)
    await store.create("v1", '{"a": 1}', idempotency_key="k1", deadline=now - 60, ledger=[entry("e1", "v1")])
    await store.create("v2", '{"b": 2}', deadline=now + 3600)
    await store.get_or_set_secret("code", "s3cret")
    assert await store.hit("phone", limit=1, window=600, now=now) is None
    await store.aclose()

    store = SqliteStore(path)
    try:
        assert await store.get("v1") == Record("v1", 1, '{"a": 1}')
        assert await store.create("other", "{}", idempotency_key="k1") == (Record("v1", 1, '{"a": 1}'), False)
        assert await store.ledger() == [entry("e1", "v1")]
        assert await store.get_or_set_secret("code", "new") == "s3cret"
        assert await store.hit("phone", limit=1, window=600, now=now + 1) is not None
        # The deadline that passed while the store was closed fires at once.
        assert await store.claim_due(now, limit=10, lease=30) == ["v1"]
        assert await store.next_deadline() == now + 30
    finally:
        await store.aclose()


async def test_sqlite_uses_wal_and_current_schema(tmp_path: Path) -> None:
    """The file is switched to WAL and migrated to the latest schema version on first use."""
    path = tmp_path / "otp.db"
    store = SqliteStore(path)
    await store.ping()
    assert await store.journal_mode() == "wal"
    await store.aclose()

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        raw.close()


async def test_sqlite_amounts_are_text(tmp_path: Path) -> None:
    """Ledger amounts are stored as TEXT, so SQLite never turns them into binary floats."""
    path = tmp_path / "otp.db"
    store = SqliteStore(path)
    await store.create("v1", "{}", ledger=[entry("e1", "v1", "0.0083")])
    await store.aclose()

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT typeof(amount), amount FROM ledger").fetchone() == ("text", "0.0083")
    finally:
        raw.close()


async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    """A file written by a newer otp-router (higher user_version) is refused, not damaged."""
    path = tmp_path / "otp.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE records (id TEXT PRIMARY KEY)")
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()

    store = SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await store.ping()
    await store.aclose()


async def test_sqlite_store_refuses_the_queue_file(tmp_path: Path) -> None:
    """Pointing the store at the queue's database fails clearly instead of migrating it."""
    from otp_router.queue.sqlite import SqliteQueue

    queue = SqliteQueue(tmp_path / "otp.db")
    await queue.ping()
    await queue.aclose()
    store = SqliteStore(tmp_path / "otp.db")
    with pytest.raises(StoreError, match="not an otp-router store"):
        await store.ping()
    await store.aclose()


async def test_sqlite_store_migrates_an_older_file(tmp_path: Path) -> None:
    """A store file of the first schema gains the latency and conversion tables and keeps its records."""
    path = tmp_path / "otp.db"
    raw = sqlite3.connect(path)
    for statement in MIGRATIONS[0].split(";"):
        raw.execute(statement)
    raw.execute("INSERT INTO records (id, version, data) VALUES ('v1', 3, '{}')")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    store = SqliteStore(path)
    try:
        assert (await store.get("v1")) is not None
        await store.add_latency("telegram|GB|7|3", 1.0)
        assert await store.latency_cells() == {"telegram|GB|7|3": 1.0}
        rule = ConversionRule("conv-country:GB", 1, 0.5)
        assert await store.conversion_start([rule], window=60.0, cooldown=60.0, now=1.0) is None
        assert await store.conversion_start([rule], window=60.0, cooldown=60.0, now=2.0) == (
            "conv-country:GB",
            60.0,
        )
    finally:
        await store.aclose()


async def test_sqlite_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    """A file in a missing folder fails with StoreError on ping, not a raw sqlite3 error."""
    store = SqliteStore(tmp_path / "missing" / "otp.db")
    with pytest.raises(StoreError):
        await store.ping()
    await store.aclose()


async def test_sqlite_full_synchronous_is_applied(tmp_path: Path) -> None:
    """synchronous="FULL" is accepted and the store works with it."""
    store = SqliteStore(tmp_path / "otp.db", synchronous="FULL")
    await store.create("v1", "{}")
    assert await store.get("v1") == Record("v1", 1, "{}")
    await store.aclose()
    with pytest.raises(ValueError):
        SqliteStore(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


# -- Redis -----------------------------------------------------------------


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at the keys a RedisStore wrote."""
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_redis_keys_all_carry_the_prefix(redis_url: str, redis_client: aioredis.Redis) -> None:
    """Every key any operation writes starts with the URL's prefix."""
    prefix = redis_url.split("prefix=")[1]
    token = uuid.uuid4().hex
    store = RedisStore(redis_url)
    try:
        await store.create(f"v-{token}", "{}", idempotency_key=f"i-{token}", deadline=1.0)
        await store.cas(f"v-{token}", 1, "{}", deadline=2.0, ledger=[entry(f"e-{token}", f"v-{token}")])
        await store.claim_due(5.0, limit=1, lease=10)
        await store.hit(f"r-{token}", limit=1, window=60, now=time.time())
        await store.get_or_set_secret(f"s-{token}", "x")
    finally:
        await store.aclose()

    ours = [k async for k in redis_client.scan_iter(match=f"*{token}*")]
    assert len(ours) == 6  # record, idempotency, ledger entry, ledger-by, rate, secret
    assert all(k.startswith(f"{prefix}:") for k in ours)
    for shared in ("deadlines", "ledger-index", "ledger-seq"):
        assert await redis_client.exists(f"{prefix}:{shared}")


@pytest.mark.redis
async def test_redis_expiry(redis_url: str, redis_client: aioredis.Redis) -> None:
    """Idempotency keys and rate windows expire; a record expires only once it has no deadline."""
    prefix = redis_url.split("prefix=")[1]
    store = RedisStore(redis_url + "&record_ttl=600", idempotency_ttl=3600)
    try:
        await store.create("v1", "{}", idempotency_key="k", deadline=10.0)
        assert 0 < await redis_client.pttl(f"{prefix}:idem:k") <= 3600_000
        assert await redis_client.pttl(f"{prefix}:rec:v1") == -1  # pending deadline: kept
        await store.cas("v1", 1, "{}", deadline=None)
        assert 0 < await redis_client.pttl(f"{prefix}:rec:v1") <= 600_000
        await store.cas("v1", 2, "{}", deadline=20.0)
        assert await redis_client.pttl(f"{prefix}:rec:v1") == -1
        await store.hit("h", limit=5, window=30, now=time.time())
        assert 0 < await redis_client.pttl(f"{prefix}:rate:h") <= 30_000
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_idempotency_ttl_from_url(redis_url: str, redis_client: aioredis.Redis) -> None:
    """idempotency_ttl=0 in the URL keeps idempotency keys forever."""
    prefix = redis_url.split("prefix=")[1]
    store = RedisStore(redis_url + "&idempotency_ttl=0")
    try:
        await store.create("v1", "{}", idempotency_key="k")
        assert await redis_client.pttl(f"{prefix}:idem:k") == -1
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_expired_record_frees_its_idempotency_key(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """If the record an idempotency key points to has expired, the key starts a new record."""
    prefix = redis_url.split("prefix=")[1]
    store = RedisStore(redis_url)
    try:
        await store.create("v1", "{}", idempotency_key="k")
        await redis_client.delete(f"{prefix}:rec:v1")  # as record_ttl would
        record, created = await store.create("v2", "{}", idempotency_key="k")
        assert (record.id, created) == ("v2", True)
        assert await store.create("v3", "{}", idempotency_key="k") == (record, False)
    finally:
        await store.aclose()


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


async def test_redis_sharded_layout_keeps_each_script_in_one_slot() -> None:
    """Sharded: a verification's keys share its shard's slot; limits and the guard have their own."""
    store = RedisStore("redis://127.0.0.1:1/0?prefix=p&shards=16")
    keys = store.keys
    try:
        shards = {keys.shard_of(f"v{i}") for i in range(200)}
        assert shards == set(range(16))  # ids spread over every shard
        for vid in ("v1", "v_0123456789abcdef", "id:é/{x}"):
            shard = keys.shard_of(vid)
            together = [
                keys.record(vid),
                keys.deadlines(shard),
                keys.ledger_index(shard),
                keys.ledger_seq(shard),
                keys.ledger_entry("e1", shard),
                keys.ledger_by_verification(vid),
            ]
            assert len({_slot(k) for k in together}) == 1, together
        assert _slot(keys.conversion("conv-prefix:a")) == _slot(keys.conversion_block("conv-country:GB"))
        assert _slot(keys.rate("phone:a")) != _slot(keys.rate("phone:b"))
        assert all(k.startswith("p:") for k in (keys.rate("x"), keys.conversion("x"), keys.idempotency("x")))
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_sharded_ledger_entry_of_another_shard_is_refused(redis_url: str) -> None:
    """Sharded: entries are written in their record's slot, so they must belong to that record."""
    store = RedisStore(redis_url + "&shards=16")
    try:
        other = next(f"v{i}" for i in range(100) if store.keys.shard_of(f"v{i}") != store.keys.shard_of("v1"))
        with pytest.raises(ValueError, match="belong"):
            await store.create("v1", "{}", ledger=[entry("e1", other)])
        assert await store.get("v1") is None
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_sharded_create_recovers_a_crash_after_the_reservation(redis_url: str) -> None:
    """Sharded: a creator that died between reserving its idempotency key and writing the record.

    The next create with that key writes the record from the reservation
    (with its deadline and ledger) and returns it as the existing one.
    """
    store = RedisStore(redis_url + "&shards=16")
    try:
        # What create() reserves before it writes the record, as if the process died right then.
        _, entry_args = store._ledger_args("v1", [entry("e1", "v1")])
        payload = json.dumps(["v1", '{"n": 1}', "50.0", entry_args])
        await store._reserve(keys=[store.keys.idempotency("k")], args=["v1", payload, "0", ""])
        assert await store.get("v1") is None
        record, created = await store.create("v2", "{}", idempotency_key="k", deadline=1.0)
        assert (record, created) == (Record("v1", 1, '{"n": 1}'), False)
        assert await store.get("v2") is None
        assert [e.key for e in await store.ledger("v1")] == ["e1"]
        assert await store.next_deadline() == 50.0
        # Marked done: a later replay only reads.
        assert await store.create("v3", "{}", idempotency_key="k") == (record, False)
    finally:
        await store.aclose()


async def test_redis_unreachable_is_a_store_error() -> None:
    """Connection failures surface as StoreError, never as a redis-py exception."""
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match="redis"):
        await store.ping()
    await store.aclose()
