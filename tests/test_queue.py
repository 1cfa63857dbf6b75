"""Both queue backends through one suite: real Redis (stream + consumer group) and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from otp_router.config import Settings
from otp_router.errors import ConfigError, InputError, InvalidPhoneNumber, StoreError
from otp_router.ids import producer_id
from otp_router.queue import (
    DeadLetterReason,
    PoisonMessage,
    Queue,
    QueueMessage,
    RedisStreamQueue,
    SqliteQueue,
    enqueue,
    open_queue,
    parse_message,
    queue_url_for,
)

GB = "+447400123456"
SCHEMA = Path(__file__).parents[1] / "otp_router" / "data" / "queue-message.schema.json"

QueueFactory = Callable[[], Queue]


def message(n: int) -> QueueMessage:
    return QueueMessage(phone=f"+4474001234{n:02d}", idempotency_key=f"key-{n}")


@pytest.fixture(params=["redis", "redis-cluster", "sqlite"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    if request.param == "redis-cluster":
        cluster_url: str = request.getfixturevalue("redis_cluster_url")
        return cluster_url
    return f"sqlite:///{tmp_path / 'q.db'}"


@pytest.fixture
async def make_queue(queue_url: str) -> AsyncIterator[QueueFactory]:
    """Factory: independent queue instances (own connections) on one backend; all closed afterwards."""
    opened: list[Queue] = []

    def make() -> Queue:
        queue = open_queue(queue_url)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.aclose()


async def test_enqueue_read_ack(make_queue: QueueFactory) -> None:
    """Messages come back oldest first with their JSON intact, and an ack removes them for good."""
    queue = make_queue()
    ids = [await queue.enqueue(message(n)) for n in range(3)]
    got = await queue.read("c1", 2, 0)
    assert [d.id for d in got] == ids[:2]
    assert parse_message(got[0].data) == message(0)
    assert all(d.attempt == 1 for d in got)
    assert await queue.depth() == 1
    assert await queue.pending() == 2
    for delivery in got:
        await queue.ack(delivery)
    await queue.ack(got[0])  # twice is harmless
    assert await queue.pending() == 0
    rest = await queue.read("c1", 10, 0)
    assert [d.id for d in rest] == ids[2:]
    assert await queue.read("c1", 10, 0) == []


async def test_a_delivered_message_goes_to_one_consumer(make_queue: QueueFactory) -> None:
    """A message read by one consumer is not handed to another while it is pending."""
    queue = make_queue()
    await queue.enqueue(message(1))
    assert len(await queue.read("c1", 5, 0)) == 1
    assert await queue.read("c2", 5, 0) == []


async def test_read_blocks_until_a_message_arrives(make_queue: QueueFactory) -> None:
    """A blocking read returns the message enqueued while it waits."""
    queue, producer = make_queue(), make_queue()

    async def later() -> None:
        await asyncio.sleep(0.1)
        await producer.enqueue(message(7))

    task = asyncio.create_task(later())
    got = await queue.read("c1", 5, 3.0)
    await task
    assert [parse_message(d.data).idempotency_key for d in got] == ["key-7"]


async def test_reclaim_takes_over_idle_messages_only(make_queue: QueueFactory) -> None:
    """A message left pending longer than the idle time moves to the reclaiming consumer with attempt 2."""
    queue = make_queue()
    msg_id = await queue.enqueue(message(1))
    [first] = await queue.read("dead", 1, 0)
    assert await queue.reclaim("alive", 60.0, 10) == []
    await asyncio.sleep(0.15)
    [again] = await queue.reclaim("alive", 0.1, 10)
    assert again.id == msg_id == first.id
    assert again.attempt == 2
    assert parse_message(again.data) == message(1)
    # Now it belongs to "alive": not reclaimable until idle again.
    assert await queue.reclaim("third", 0.1, 10) == []


async def test_touch_keeps_a_live_consumers_message(make_queue: QueueFactory) -> None:
    """Renewing a claim resets its idle time, so it is not reclaimed from a live worker."""
    queue = make_queue()
    await queue.enqueue(message(1))
    got = await queue.read("alive", 1, 0)
    await asyncio.sleep(0.2)
    await queue.touch("alive", got)
    assert await queue.reclaim("other", 0.15, 10) == []


async def test_dead_letter_keeps_the_original_and_the_reason(make_queue: QueueFactory) -> None:
    """A dead-lettered message leaves the queue and is kept with its reason, once, even if retried."""
    queue = make_queue()
    await queue.enqueue("not json")
    [delivery] = await queue.read("c1", 1, 0)
    await queue.dead_letter(delivery, "bad_json")
    await queue.dead_letter(delivery, "bad_json")
    [dead] = await queue.dead_letters()
    assert dead.reason == "bad_json"
    assert dead.message_id == delivery.id
    assert dead.fields == {"data": "not json"}
    assert dead.attempts == 1
    assert dead.failed_at > 0
    assert await queue.pending() == 0
    assert await queue.depth() == 0
    await asyncio.sleep(0.05)
    assert await queue.reclaim("c2", 0.01, 10) == []


async def test_depth_and_lag(make_queue: QueueFactory) -> None:
    """Depth counts waiting messages only; lag is the age of the oldest waiting one."""
    queue = make_queue()
    assert await queue.depth() == 0
    assert await queue.lag() == 0.0
    await queue.enqueue(message(1))
    await queue.enqueue(message(2))
    await asyncio.sleep(0.05)
    assert await queue.depth() == 2
    assert await queue.lag() > 0.0
    await queue.read("c1", 2, 0)
    assert await queue.depth() == 0
    assert await queue.lag() == 0.0


async def test_two_instances_share_one_queue(make_queue: QueueFactory) -> None:
    """Two queue objects (separate connections) reading concurrently split the messages without overlap."""
    producer, first, second = make_queue(), make_queue(), make_queue()
    ids = {await producer.enqueue(message(n)) for n in range(40)}

    async def drain(queue: Queue, consumer: str) -> list[str]:
        seen: list[str] = []
        while batch := await queue.read(consumer, 3, 0):
            seen += [d.id for d in batch]
            for delivery in batch:
                await queue.ack(delivery)
        return seen

    a, b = await asyncio.gather(drain(first, "a"), drain(second, "b"))
    assert set(a) | set(b) == ids
    assert not set(a) & set(b)
    assert len(a) + len(b) == 40


async def test_heartbeat_is_fresh_until_its_ttl(make_queue: QueueFactory) -> None:
    """A heartbeat reads back while fresh, and reads as None after its TTL or when cleared."""
    queue = make_queue()
    assert await queue.last_heartbeat("w1") is None
    await queue.heartbeat("w1", ttl=5.0)
    assert await queue.last_heartbeat("w1") is not None
    await queue.clear_heartbeat("w1")
    assert await queue.last_heartbeat("w1") is None
    await queue.heartbeat("w2", ttl=0.05)
    await asyncio.sleep(0.15)
    assert await queue.last_heartbeat("w2") is None


async def test_ping_and_closed_queue(make_queue: QueueFactory) -> None:
    """A reachable queue pings; a closed one raises StoreError."""
    queue = make_queue()
    await queue.ping()
    await queue.aclose()
    with pytest.raises(StoreError):
        await queue.enqueue(message(1))


async def test_enqueue_helper_validates_then_enqueues(queue_url: str) -> None:
    """The library helper refuses a bad number at the producer and enqueues a schema-valid message."""
    with pytest.raises(InvalidPhoneNumber):
        await enqueue(queue_url, "12", idempotency_key="k")
    with pytest.raises(InputError):
        await enqueue(queue_url, GB, idempotency_key="")
    with pytest.raises(InputError):
        await enqueue(queue_url, GB, idempotency_key="k", metadata={"x": object()})
    await enqueue(queue_url, "07400 123456", idempotency_key="k", default_region="GB", metadata={"u": 1})
    queue = open_queue(queue_url)
    try:
        [delivery] = await queue.read("c", 5, 0)
    finally:
        await queue.aclose()
    assert json.loads(delivery.data or "") == {
        "phone": "07400 123456",
        "idempotency_key": "k",
        "default_region": "GB",
        "metadata": {"u": 1},
        "verification_id": producer_id("k"),
    }


# --- producers in other languages ---------------------------------------------


async def test_any_redis_client_can_enqueue(redis_url: str) -> None:
    """A plain XADD of a data field, as any language would do it, is a message."""
    import redis.asyncio as aioredis

    queue = open_queue(redis_url)
    assert isinstance(queue, RedisStreamQueue)
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        await client.xadd(queue.keys.stream, {"data": json.dumps({"phone": GB, "idempotency_key": "x"})})
        [delivery] = await queue.read("c", 1, 0)
        assert parse_message(delivery.data).phone == GB
    finally:
        await client.aclose()
        await queue.aclose()


async def test_any_sqlite_client_can_enqueue(tmp_path: Path) -> None:
    """A plain INSERT of the data column is a message; the table's defaults fill in the rest."""
    path = tmp_path / "q.db"
    queue = SqliteQueue(path)
    try:
        await queue.ping()  # creates the schema
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO queue (data) VALUES (?)", (json.dumps({"phone": GB, "idempotency_key": "x"}),)
            )
        [delivery] = await queue.read("c", 1, 0)
        assert parse_message(delivery.data).idempotency_key == "x"
        assert delivery.enqueued_at > 1_600_000_000
    finally:
        await queue.aclose()


async def test_redis_queue_survives_its_stream_being_deleted(redis_url: str) -> None:
    """After the stream and group vanish (FLUSHDB, cleanup), the queue recreates them and keeps working."""
    import redis.asyncio as aioredis

    queue = open_queue(redis_url)
    assert isinstance(queue, RedisStreamQueue)
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await queue.enqueue(message(1))
        assert len(await queue.read("c", 1, 0)) == 1
        await client.delete(queue.keys.stream)
        assert await queue.read("c", 1, 0) == []
        await queue.enqueue(message(2))
        assert len(await queue.read("c", 1, 0)) == 1
    finally:
        await client.aclose()
        await queue.aclose()


async def test_sqlite_queue_refuses_the_store_file(tmp_path: Path) -> None:
    """Pointing the queue at the store's database fails clearly instead of writing into it."""
    from otp_router.store import SqliteStore

    store = SqliteStore(tmp_path / "otp.db")
    await store.ping()
    await store.aclose()
    queue = SqliteQueue(tmp_path / "otp.db")
    try:
        with pytest.raises(StoreError, match="not an otp-router queue"):
            await queue.ping()
    finally:
        await queue.aclose()


# --- poison messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, DeadLetterReason.BAD_JSON),
        ("{not json", DeadLetterReason.BAD_JSON),
        ('["a list"]', DeadLetterReason.BAD_JSON),
        ('{"phone": "+447400123456"}', DeadLetterReason.INVALID_MESSAGE),
        ('{"phone": "+447400123456", "idempotency_key": ""}', DeadLetterReason.INVALID_MESSAGE),
        ('{"phone": 447400123456, "idempotency_key": "k"}', DeadLetterReason.INVALID_MESSAGE),
        (
            '{"phone": "+447400123456", "idempotency_key": "k", "idempotencyKey": "k"}',
            DeadLetterReason.INVALID_MESSAGE,
        ),
        (
            '{"phone": "+447400123456", "idempotency_key": "k", "default_region": "GBR"}',
            DeadLetterReason.INVALID_MESSAGE,
        ),
        (
            '{"phone": "+447400123456", "idempotency_key": "k", "metadata": [1]}',
            DeadLetterReason.INVALID_MESSAGE,
        ),
        ('{"phone": "' + "1" * 70_000 + '", "idempotency_key": "k"}', DeadLetterReason.TOO_LARGE),
    ],
)
def test_poison_messages_are_recognised(data: str | None, reason: DeadLetterReason) -> None:
    """Each kind of unusable message is refused with its own reason, and the detail never quotes the phone."""
    with pytest.raises(PoisonMessage) as info:
        parse_message(data)
    assert info.value.reason is reason
    assert "447400123456" not in str(info.value)


def test_a_full_message_parses() -> None:
    """Every optional field is accepted and kept."""
    data = json.dumps(
        {
            "phone": "07400 123456",
            "idempotency_key": "k",
            "default_region": "GB",
            "locale": "en-GB",
            "metadata": {"a": [1]},
        }
    )
    parsed = parse_message(data)
    assert parsed.default_region == "GB"
    assert parsed.locale == "en-GB"
    assert parsed.metadata == {"a": [1]}
    assert json.loads(parsed.to_json()) == json.loads(data)


def test_the_json_schema_matches_the_model() -> None:
    """The JSON Schema file has the model's fields and required ones, forbids extras; its examples parse."""
    schema: dict[str, Any] = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert set(schema["properties"]) == set(QueueMessage.model_fields)
    assert set(schema["required"]) == {n for n, f in QueueMessage.model_fields.items() if f.is_required()}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["idempotency_key"]["maxLength"] == 200
    for example in schema["examples"]:
        parse_message(json.dumps(example))


# --- URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store_url", "expected"),
    [
        ("sqlite:///otp-router.db", "sqlite:///otp-router.queue.db"),
        (
            "sqlite:////var/lib/otp/otp.db?synchronous=FULL",
            "sqlite:////var/lib/otp/otp.queue.db?synchronous=FULL",
        ),
        ("sqlite:///data/otp", "sqlite:///data/otp.queue"),
        ("redis://127.0.0.1:6379/0?prefix=x", "redis://127.0.0.1:6379/0?prefix=x"),
    ],
)
def test_queue_url_follows_the_store(store_url: str, expected: str) -> None:
    """Without OTP_ROUTER_QUEUE_URL, a SQLite store gets a queue file beside it and Redis the same server."""
    assert queue_url_for(Settings(store_url=store_url)) == expected


def test_queue_url_setting_wins_and_memory_needs_one() -> None:
    """An explicit queue URL is used as is; a memory store has no queue to derive."""
    assert queue_url_for(Settings(store_url="memory://", queue_url="sqlite:///q.db")) == "sqlite:///q.db"
    with pytest.raises(ConfigError, match="OTP_ROUTER_QUEUE_URL"):
        queue_url_for(Settings(store_url="memory://"))


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite:///q.db?wal=off",
        "redis://h/0?dead_letter_maxlen=x",
    ],
)
def test_bad_queue_urls_are_config_errors(url: str) -> None:
    """Unknown schemes and options fail at open time with the variable's name."""
    with pytest.raises(ConfigError, match="OTP_ROUTER_QUEUE_URL"):
        open_queue(url)


async def test_redis_url_params_are_ours_or_the_stores(redis_url: str) -> None:
    """The store's own URL parameters are ignored, and group/prefix are honoured."""
    queue = open_queue(redis_url + "&record_ttl=60&group=g2")
    assert isinstance(queue, RedisStreamQueue)
    try:
        assert queue.group == "g2"
        await queue.enqueue(message(1))
        assert len(await queue.read("c", 1, 0)) == 1
    finally:
        await queue.aclose()


async def test_redis_queue_takes_the_store_layout_and_tags_its_keys_on_a_cluster() -> None:
    """A shared URL: shards= is the store's; cluster=1 puts both streams under one hash tag."""
    queue = RedisStreamQueue("redis://127.0.0.1:1/0?prefix=p&shards=16")
    assert (queue.keys.stream, queue.keys.dead_letters) == ("p:queue", "p:dead-letters")
    await queue.aclose()
    clustered = RedisStreamQueue("redis://127.0.0.1:1/0?prefix=p&cluster=1")
    assert (clustered.keys.stream, clustered.keys.dead_letters) == (
        "p:{queue}:stream",
        "p:{queue}:dead-letters",
    )
    await clustered.aclose()


async def test_a_cluster_queue_keeps_both_streams_in_one_slot(redis_cluster_url: str) -> None:
    """On a real cluster, the dead-letter script's two keys hash to one slot, and it runs."""
    from redis.crc import key_slot

    queue = open_queue(redis_cluster_url)
    assert isinstance(queue, RedisStreamQueue)
    try:
        assert key_slot(queue.keys.stream.encode()) == key_slot(queue.keys.dead_letters.encode())
        await queue.enqueue("not json")
        [delivery] = await queue.read("c", 1, 0)
        await queue.dead_letter(delivery, "bad_json")
        assert [d.message_id for d in await queue.dead_letters()] == [delivery.id]
    finally:
        await queue.aclose()
