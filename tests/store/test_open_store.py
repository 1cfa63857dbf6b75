"""open_store: the URL picks the backend; bad URLs are ConfigErrors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

import otp_router.store
from otp_router.errors import ConfigError
from otp_router.store import MemoryStore, RedisStore, SqliteStore, open_store


async def test_memory_url() -> None:
    """memory:// gives a MemoryStore."""
    store = open_store("memory://")
    assert isinstance(store, MemoryStore)
    await store.aclose()


async def test_sqlite_relative_path(tmp_path: Path) -> None:
    """Three slashes: the path is relative to the working directory."""
    assert Path.cwd() == tmp_path  # the autouse clean_environ fixture runs each test here
    store = open_store("sqlite:///data/otp.db")
    assert isinstance(store, SqliteStore)
    assert store.path == "data/otp.db"
    (tmp_path / "data").mkdir()
    await store.ping()
    await store.aclose()
    assert (tmp_path / "data" / "otp.db").is_file()


async def test_sqlite_absolute_path(tmp_path: Path) -> None:
    """Four slashes: the path is absolute."""
    target = tmp_path / "abs.db"
    store = open_store(f"sqlite:///{target}")  # tmp_path starts with "/": four slashes in all
    assert isinstance(store, SqliteStore)
    assert store.path == str(target)
    await store.ping()
    await store.aclose()
    assert target.is_file()


def test_sqlite_options() -> None:
    """synchronous and busy_timeout query parameters reach the store; percent-escapes are decoded."""
    store = open_store("sqlite:///my%20dir/x.db?synchronous=full&busy_timeout=2.5")
    assert isinstance(store, SqliteStore)
    assert (store.path, store.synchronous, store.busy_timeout) == ("my dir/x.db", "FULL", 2.5)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite://",
        "sqlite:///x.db?journal=off",
        "sqlite:///x.db?synchronous=OFF",
        "sqlite:///x.db?busy_timeout=soon",
    ],
)
def test_bad_sqlite_urls(url: str) -> None:
    """Malformed SQLite URLs raise ConfigError naming OTP_ROUTER_STORE_URL."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_STORE_URL"):
        open_store(url)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://h:1/0", "unix:///tmp/nowhere.sock"])
async def test_redis_urls(url: str) -> None:
    """redis://, rediss:// and unix:// give a RedisStore without connecting."""
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.keys.prefix == "otp-router"
    await store.aclose()


async def test_redis_layouts_from_url() -> None:
    """No shards: the single layout's key names, unchanged. shards=N (cluster=1: 16) tags keys by shard."""
    single = RedisStore("redis://127.0.0.1:1/0?prefix=p")
    sharded = RedisStore("redis://127.0.0.1:1/0?prefix=p&shards=8")
    cluster = RedisStore("redis://127.0.0.1:1/0?prefix=p&cluster=1")
    try:
        assert (single.keys.shards, sharded.keys.shards, cluster.keys.shards) == (0, 8, 16)
        assert single.keys.record("v1") == "p:rec:v1"
        assert single.keys.deadlines() == "p:deadlines"
        shard = sharded.keys.shard_of("v1")
        assert sharded.keys.record("v1") == f"p:{{s{shard}}}:rec:v1"
        assert sharded.keys.deadlines(shard) == f"p:{{s{shard}}}:deadlines"
    finally:
        for store in (single, sharded, cluster):
            await store.aclose()


async def test_redis_prefix_from_url() -> None:
    """The prefix query parameter sets the key prefix and is not passed on to redis-py."""
    store = open_store("redis://127.0.0.1:1/0?prefix=tenant-a&socket_timeout=1")
    assert isinstance(store, RedisStore)
    assert store.keys.prefix == "tenant-a"
    assert store.keys.record("v1") == "tenant-a:rec:v1"
    await store.aclose()


@pytest.mark.parametrize(
    "query", ["prefix=", "record_ttl=-1", "idempotency_ttl=day", "shards=-1", "shards=two", "cluster=maybe"]
)
def test_bad_redis_params(query: str) -> None:
    """Invalid store parameters in a Redis URL raise ConfigError."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_STORE_URL"):
        open_store(f"redis://127.0.0.1:1/0?{query}")


def test_unknown_scheme_names_the_variable_not_the_url() -> None:
    """An unknown scheme names OTP_ROUTER_STORE_URL and never echoes a password from the URL."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_STORE_URL") as info:
        open_store("postgres://user:hunter2@db/otp")
    assert "hunter2" not in str(info.value)
    assert "postgres" in str(info.value)


def test_exported_names() -> None:
    """__all__ is sorted and lists exactly the public names."""
    names = otp_router.store.__all__
    assert names == sorted(names)
    assert set(names) == {
        "ConversionCheck",
        "ConversionRule",
        "LedgerEntry",
        "LedgerKind",
        "LimitReached",
        "MemoryStore",
        "RateLimit",
        "Record",
        "RecordExists",
        "RedisStore",
        "SqliteStore",
        "Store",
        "open_store",
    }
    for name in names:
        assert hasattr(otp_router.store, name)


async def test_redis_store_accepts_the_queue_parameters_of_a_shared_url(redis_url: str) -> None:
    """A Redis URL carrying the queue's group= and dead_letter_maxlen= still opens a working store."""
    store = open_store(redis_url + "&group=workers&dead_letter_maxlen=100")
    try:
        await store.ping()
        assert await store.get("missing") is None
    finally:
        await store.aclose()
