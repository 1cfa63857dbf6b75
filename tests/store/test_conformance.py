"""One contract, three stores: every test here runs on memory, SQLite and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from otp_router.errors import ConcurrentUpdate, StoreError, VerificationNotFound
from otp_router.store import (
    ConversionCheck,
    ConversionRule,
    LedgerEntry,
    LedgerKind,
    LimitReached,
    MemoryStore,
    RateLimit,
    Record,
    RecordExists,
    Store,
    open_store,
)

MakeStore = Callable[[], Awaitable[Store]]


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-sharded", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty backend of each kind.

    ``redis-sharded`` is the Redis Cluster key layout on the one Redis;
    ``redis-cluster`` is a real three-master Redis Cluster.
    """
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    if request.param == "redis-cluster":
        cluster_url: str = request.getfixturevalue("redis_cluster_url")
        return cluster_url
    url: str = request.getfixturevalue("redis_url")
    return f"{url}&shards=4" if request.param == "redis-sharded" else url


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[MakeStore]:
    """Factory: another client of the same backend (same file, same Redis prefix).

    Memory has no second client, so it hands back the same store.
    """
    opened: list[Store] = []

    async def make() -> Store:
        if opened and isinstance(opened[0], MemoryStore):
            return opened[0]
        store = open_store(store_url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    """The first client of a fresh backend."""
    return await make_store()


def entry(key: str, vid: str = "v1", *, amount: str = "0.01", at: float = 1000.0, **kw: str) -> LedgerEntry:
    return LedgerEntry(
        key=key,
        verification_id=vid,
        channel=kw.get("channel", "telegram"),
        provider=kw.get("provider", "telegram"),
        region=kw.get("region", "GB"),
        kind=LedgerKind(kw.get("kind", "charge")),
        amount=Decimal(amount),
        currency="USD",
        at=at,
    )


# -- records ---------------------------------------------------------------


async def test_satisfies_protocol(store: Store) -> None:
    """Each backend is a runtime-checkable Store."""
    assert isinstance(store, Store)


async def test_create_then_get(store: Store) -> None:
    """A created record starts at version 1 and reads back unchanged; unknown ids read as None."""
    data = '{"phone_region": "GB", "note": "é ✓"}'
    record, created = await store.create("v1", data)
    assert created is True
    assert record == Record(id="v1", version=1, data=data)
    assert await store.get("v1") == record
    assert await store.get("nope") is None


async def test_create_duplicate_id_is_refused(store: Store) -> None:
    """Creating an id that exists raises StoreError and leaves the original alone."""
    await store.create("v1", "{}")
    with pytest.raises(StoreError):
        await store.create("v1", '{"other": 1}', deadline=5.0)
    assert await store.get("v1") == Record("v1", 1, "{}")
    assert await store.next_deadline() is None


async def test_idempotency_key_returns_existing_and_writes_nothing(store: Store) -> None:
    """A second create with a taken idempotency key returns the first record and writes nothing."""
    first, _ = await store.create("v1", '{"n": 1}', idempotency_key="k", deadline=50.0, ledger=[entry("e1")])
    updated = await store.cas("v1", 1, '{"n": 2}', deadline=50.0)

    again, created = await store.create(
        "v2", '{"n": 9}', idempotency_key="k", deadline=10.0, ledger=[entry("e2", "v2")]
    )

    assert created is False
    assert again == updated
    assert first.id == again.id
    assert await store.get("v2") is None
    assert [e.key for e in await store.ledger()] == ["e1"]
    assert await store.next_deadline() == 50.0


async def test_distinct_idempotency_keys_create_distinct_records(store: Store) -> None:
    """Different idempotency keys do not collide."""
    _, a = await store.create("v1", "{}", idempotency_key="k1")
    _, b = await store.create("v2", "{}", idempotency_key="k2")
    assert (a, b) == (True, True)


async def test_cas_bumps_version(store: Store) -> None:
    """A CAS with the current version replaces the data and increments the version."""
    await store.create("v1", '{"s": "a"}')
    record = await store.cas("v1", 1, '{"s": "b"}', deadline=None)
    assert record == Record("v1", 2, '{"s": "b"}')
    record = await store.cas("v1", 2, '{"s": "c"}', deadline=None)
    assert record == Record("v1", 3, '{"s": "c"}')
    assert await store.get("v1") == record


async def test_cas_stale_version_changes_nothing(store: Store) -> None:
    """A CAS with a stale version raises ConcurrentUpdate and writes no data, deadline or ledger."""
    await store.create("v1", '{"s": "a"}', deadline=100.0, ledger=[entry("e1")])
    await store.cas("v1", 1, '{"s": "b"}', deadline=100.0)

    with pytest.raises(ConcurrentUpdate):
        await store.cas("v1", 1, '{"s": "stale"}', deadline=5.0, ledger=[entry("e2")])

    assert await store.get("v1") == Record("v1", 2, '{"s": "b"}')
    assert await store.next_deadline() == 100.0
    assert [e.key for e in await store.ledger()] == ["e1"]


async def test_cas_missing_record(store: Store) -> None:
    """A CAS on an unknown id raises VerificationNotFound and creates nothing."""
    with pytest.raises(VerificationNotFound):
        await store.cas("ghost", 1, "{}", deadline=5.0, ledger=[entry("e1", "ghost")])
    assert await store.get("ghost") is None
    assert await store.ledger() == []
    assert await store.next_deadline() is None


async def test_concurrent_cas_has_one_winner(make_store: MakeStore) -> None:
    """Of many writers racing from the same version, exactly one wins."""
    a, b = await make_store(), await make_store()
    await a.create("v1", "{}")

    async def write(store: Store, n: int) -> bool:
        try:
            await store.cas("v1", 1, f'{{"w": {n}}}', deadline=None, ledger=[entry(f"e{n}")])
        except ConcurrentUpdate:
            return False
        return True

    results = await asyncio.gather(*(write(a if n % 2 else b, n) for n in range(10)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert await a.get("v1") == Record("v1", 2, f'{{"w": {winner}}}')
    assert [e.key for e in await a.ledger()] == [f"e{winner}"]


# -- deadlines -------------------------------------------------------------


async def test_deadline_set_moved_and_cleared(store: Store) -> None:
    """Deadlines are set by create, moved by CAS and cleared by a CAS with None."""
    await store.create("v1", "{}", deadline=100.0)
    assert await store.next_deadline() == 100.0

    await store.cas("v1", 1, "{}", deadline=200.0)
    assert await store.next_deadline() == 200.0
    assert await store.claim_due(150.0, limit=10, lease=30) == []

    await store.cas("v1", 2, "{}", deadline=None)
    assert await store.next_deadline() is None
    assert await store.claim_due(1e12, limit=10, lease=30) == []


async def test_claim_due_returns_only_due_earliest_first(store: Store) -> None:
    """Only deadlines at or before now are claimed, earliest first, at most ``limit``."""
    for rid, deadline in [("c", 30.0), ("a", 10.0), ("late", 99.0), ("b", 20.0), ("d", 25.0)]:
        await store.create(rid, "{}", deadline=deadline)
    await store.create("none", "{}")

    assert await store.claim_due(25.0, limit=2, lease=100) == ["a", "b"]
    assert await store.claim_due(25.0, limit=10, lease=100) == ["d"]
    assert await store.claim_due(25.0, limit=10, lease=100) == []


async def test_claim_moves_deadline_by_lease(store: Store) -> None:
    """A claimed deadline re-fires only once its lease has run out."""
    await store.create("v1", "{}", deadline=100.0)
    assert await store.claim_due(100.0, limit=1, lease=30) == ["v1"]
    assert await store.next_deadline() == 130.0
    assert await store.claim_due(129.9, limit=1, lease=30) == []
    assert await store.claim_due(130.0, limit=1, lease=30) == ["v1"]
    assert await store.next_deadline() == 160.0


async def test_write_back_after_claim_clears_lease(store: Store) -> None:
    """A claimer that writes the record back decides the next deadline, not the lease."""
    await store.create("v1", "{}", deadline=100.0)
    await store.claim_due(100.0, limit=1, lease=30)
    await store.cas("v1", 1, "{}", deadline=None)
    assert await store.claim_due(1000.0, limit=1, lease=30) == []


async def test_next_deadline_is_the_minimum(store: Store) -> None:
    """next_deadline is None with no deadlines, else the earliest one."""
    assert await store.next_deadline() is None
    await store.create("v1", "{}", deadline=300.5)
    await store.create("v2", "{}", deadline=200.25)
    await store.create("v3", "{}")
    assert await store.next_deadline() == 200.25


async def test_concurrent_claimers_each_claim_once(make_store: MakeStore) -> None:
    """Twenty claimers on two clients over 200 due deadlines claim each id exactly once."""
    a, b = await make_store(), await make_store()
    ids = [f"v{i:03d}" for i in range(200)]
    await asyncio.gather(*(a.create(rid, "{}", deadline=float(i % 17)) for i, rid in enumerate(ids)))
    claimed: list[str] = []

    async def claimer(store: Store) -> None:
        while batch := await store.claim_due(50.0, limit=7, lease=1000):
            claimed.extend(batch)

    await asyncio.gather(*(claimer(a if n % 2 else b) for n in range(20)))
    assert sorted(claimed) == ids
    assert await a.next_deadline() == 1050.0


# -- ledger ----------------------------------------------------------------


async def test_ledger_written_with_create_and_cas(store: Store) -> None:
    """Ledger entries passed to create and cas are stored with the state change."""
    await store.create("v1", "{}", ledger=[entry("e1", at=1.0)])
    await store.cas("v1", 1, "{}", deadline=None, ledger=[entry("e2", at=2.0, kind="refund", amount="-0.01")])
    assert await store.ledger("v1") == [
        entry("e1", at=1.0),
        entry("e2", at=2.0, kind="refund", amount="-0.01"),
    ]


async def test_ledger_dedup_by_key(store: Store) -> None:
    """An entry whose key exists is skipped, also within one batch; the first one stays."""
    await store.create("v1", "{}", ledger=[entry("e1", amount="0.01"), entry("e1", amount="0.99")])
    await store.cas("v1", 1, "{}", deadline=None, ledger=[entry("e1", amount="5"), entry("e2")])
    await store.cas("v1", 2, "{}", deadline=None, ledger=[entry("e2", amount="7")])
    ledger = await store.ledger()
    assert [(e.key, e.amount) for e in ledger] == [("e1", Decimal("0.01")), ("e2", Decimal("0.01"))]


async def test_ledger_ordered_by_time_ties_in_insertion_order(store: Store) -> None:
    """The ledger lists entries by time; entries with equal times keep their write order."""
    await store.create("v1", "{}", ledger=[entry("z", at=30.0), entry("y", at=10.0)])
    await store.cas("v1", 1, "{}", deadline=None, ledger=[entry("b", at=20.0), entry("a", at=20.0)])
    await store.cas("v1", 2, "{}", deadline=None, ledger=[entry("m", at=5.0)])
    assert [e.key for e in await store.ledger()] == ["m", "y", "b", "a", "z"]


async def test_ledger_filtered_by_verification(store: Store) -> None:
    """ledger(id) returns only that verification's entries; an unknown id gives none."""
    await store.create("v1", "{}", ledger=[entry("a1", "v1", at=1.0), entry("a2", "v1", at=3.0)])
    await store.create("v2", "{}", ledger=[entry("b1", "v2", at=2.0)])
    assert [e.key for e in await store.ledger("v1")] == ["a1", "a2"]
    assert [e.key for e in await store.ledger("v2")] == ["b1"]
    assert [e.key for e in await store.ledger()] == ["a1", "b1", "a2"]
    assert await store.ledger("nobody") == []


async def test_ledger_round_trip_is_exact(store: Store) -> None:
    """Decimal amounts (value and exponent), kinds, text fields and float times survive storage exactly."""
    amounts = ["0.0083", "-0.0100", "0.1234567890123456789", "1E-8", "0"]
    entries = [
        entry(
            f"e{i}",
            at=1_700_000_000.123456 + i,
            amount=a,
            kind=k,
            channel="sms",
            provider="twilio",
            region="US",
        )
        for i, (a, k) in enumerate(
            zip(amounts, ["charge", "refund", "estimate", "charge", "charge"], strict=True)
        )
    ]
    await store.create("v1", "{}", ledger=entries)
    stored = await store.ledger("v1")
    assert stored == entries
    assert [str(e.amount) for e in stored] == [str(Decimal(a)) for a in amounts]
    assert all(type(e.kind) is LedgerKind for e in stored)


async def test_ledger_rejects_float_amount(store: Store) -> None:
    """A float amount is refused before anything is written, so exactness cannot be lost."""
    bad = LedgerEntry("e1", "v1", "sms", "twilio", "US", LedgerKind.CHARGE, 0.0083, "USD", 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.create("v1", "{}", ledger=[bad])
    assert await store.get("v1") is None


# -- rate limits -----------------------------------------------------------


async def test_hit_sliding_window(store: Store) -> None:
    """Events beyond the limit are refused with the wait, not counted, and allowed once the window slides."""
    for now in (1000.0, 1010.0, 1020.0):
        assert await store.hit("phone:x", limit=3, window=60, now=now) is None
    assert await store.hit("phone:x", limit=3, window=60, now=1030.0) == pytest.approx(30.0)
    assert await store.hit("phone:x", limit=3, window=60, now=1059.0) == pytest.approx(1.0)
    # The event at 1000 leaves the window at 1060; had the refused ones been
    # counted, the window would still be full here.
    assert await store.hit("phone:x", limit=3, window=60, now=1060.0) is None
    assert await store.hit("phone:x", limit=3, window=60, now=1061.0) == pytest.approx(9.0)


async def test_hit_keys_are_independent(store: Store) -> None:
    """Each key has its own window."""
    assert await store.hit("a", limit=1, window=60, now=1.0) is None
    assert await store.hit("b", limit=1, window=60, now=1.0) is None
    retry = await store.hit("a", limit=1, window=60, now=2.0)
    assert retry is not None and retry > 0


async def test_hit_counts_events_at_the_same_instant(store: Store) -> None:
    """Several events at one timestamp each count."""
    assert await store.hit("k", limit=2, window=10, now=5.0) is None
    assert await store.hit("k", limit=2, window=10, now=5.0) is None
    assert await store.hit("k", limit=2, window=10, now=5.0) == pytest.approx(10.0)


async def test_hit_concurrent_never_exceeds_limit(make_store: MakeStore) -> None:
    """Racing hits from two clients admit exactly ``limit`` events."""
    a, b = await make_store(), await make_store()
    results = await asyncio.gather(*(s.hit("k", limit=5, window=60, now=100.0) for s in [a, b] * 10))
    assert sum(r is None for r in results) == 5


# -- conversion guard ------------------------------------------------------

#: Window 1200 s: buckets of 100 s.
CONV = {"window": 1200.0, "cooldown": 600.0}


def rule(key: str = "p", *, min_started: int = 4, min_ratio: float = 0.5) -> ConversionRule:
    return ConversionRule(key, min_started, min_ratio)


async def test_conversion_blocks_once_the_ratio_collapses(store: Store) -> None:
    """min_started unverified starts are counted; the next one blocks the key for the cooldown."""
    for i in range(4):
        assert await store.conversion_start([rule()], now=1000.0 + i, **CONV) is None
    assert await store.conversion_start([rule()], now=1010.0, **CONV) == ("p", pytest.approx(600.0))
    # Blocked: the remaining cooldown, whatever the counts say now.
    await store.conversion_verified(["p"], window=1200.0, now=1020.0)
    await store.conversion_verified(["p"], window=1200.0, now=1020.0)
    assert await store.conversion_start([rule()], now=1510.0, **CONV) == ("p", pytest.approx(100.0))
    # After the cooldown: 2 verified of 4 started is not below 0.5, so it counts again.
    assert await store.conversion_start([rule()], now=1611.0, **CONV) is None


async def test_conversion_grace_judges_only_starts_old_enough_to_be_verified(store: Store) -> None:
    """With a grace of 120 s (slots of 10 s), starts are judged once older than the grace: a fresh
    burst passes the minimum volume unjudged, and is refused once its first starts come of age."""
    grace = {**CONV, "grace": 120.0}
    for i in range(8):
        assert await store.conversion_start([rule()], now=1000.0 + i, **grace) is None
    # 1125: the starts at 1000..1007 share slot 100, which may still hold a start younger than
    # 120 s (the slot ends at 1010): still fresh. From slot 113 on (1130), slot 100 is out of the grace.
    assert await store.conversion_start([rule()], now=1125.0, **grace) is None
    # A verification counts at once, whenever its start was: 1 verified vs 8 mature starts.
    await store.conversion_verified(["p"], window=1200.0, now=1126.0)
    assert await store.conversion_start([rule()], now=1130.0, **grace) == ("p", pytest.approx(600.0))


async def test_conversion_grace_counts_verifications_of_fresh_starts(store: Store) -> None:
    """Verifications of a fresh burst keep the key open once the burst comes of age."""
    grace = {**CONV, "grace": 120.0}
    for i in range(6):
        assert await store.conversion_start([rule()], now=1000.0 + i, **grace) is None
        await store.conversion_verified(["p"], window=1200.0, now=1030.0 + i)
    for i in range(6):
        assert await store.conversion_start([rule()], now=1131.0 + i, **grace) is None


async def test_conversion_grace_must_be_shorter_than_the_window(store: Store) -> None:
    with pytest.raises(ValueError, match="grace"):
        await store.conversion_start([rule()], now=1.0, window=100.0, cooldown=1.0, grace=100.0)
    with pytest.raises(ValueError, match="grace"):
        await store.conversion_start([rule()], now=1.0, window=100.0, cooldown=1.0, grace=-1.0)


async def test_conversion_verified_starts_keep_the_key_open(store: Store) -> None:
    """A key whose starts are verified at or above the ratio is never blocked."""
    for i in range(20):
        assert await store.conversion_start([rule()], now=1000.0 + i, **CONV) is None
        if i % 2 == 0:
            await store.conversion_verified(["p"], window=1200.0, now=1000.5 + i)


async def test_conversion_refusal_counts_nothing_on_any_key(store: Store) -> None:
    """A start refused by one key is counted on none; keys are judged in order and independently."""
    for i in range(4):
        assert (
            await store.conversion_start([rule("a"), rule("c", min_started=100)], now=1000.0 + i, **CONV)
            is None
        )
    blocked = await store.conversion_start(
        [rule("b"), rule("a"), rule("c", min_started=5)], now=1010.0, **CONV
    )
    assert blocked == ("a", pytest.approx(600.0))
    # "b" was not counted by the refused start: three more fit before it reaches 4.
    for i in range(4):
        assert await store.conversion_start([rule("b")], now=1020.0 + i, **CONV) is None
    # "c" has 4 starts (not 5): still open, and now it reaches 5 and blocks.
    assert await store.conversion_start([rule("c", min_started=5)], now=1030.0, **CONV) is None
    assert await store.conversion_start([rule("c", min_started=5)], now=1031.0, **CONV) is not None


async def test_conversion_window_slides_by_bucket(store: Store) -> None:
    """Starts older than the window (12 buckets of window / 12) stop counting."""
    for key in ("p", "q"):
        for i in range(3):
            assert await store.conversion_start([rule(key)], now=1000.0 + i, **CONV) is None
    # 1000 is in bucket 10. At 2150 (bucket 21) the window is buckets 10..21: 3 + 1 reach 4.
    assert await store.conversion_start([rule("p")], now=2150.0, **CONV) is None
    assert await store.conversion_start([rule("p")], now=2150.0, **CONV) is not None
    # At 2200 (bucket 22) the window is buckets 11..22: the three old starts are gone.
    for _ in range(4):
        assert await store.conversion_start([rule("q")], now=2200.0, **CONV) is None
    assert await store.conversion_start([rule("q")], now=2200.0, **CONV) is not None


async def test_conversion_concurrent_starts_admit_exactly_min_started(make_store: MakeStore) -> None:
    """Racing starts from two clients: exactly min_started are counted before the block."""
    a, b = await make_store(), await make_store()
    results = await asyncio.gather(
        *(s.conversion_start([rule(min_started=6)], now=500.0, **CONV) for s in [a, b] * 10)
    )
    assert sum(r is None for r in results) == 6


async def test_conversion_arguments_are_checked(store: Store) -> None:
    """A rule that could never judge, or a window or cooldown that is not positive, is a caller bug."""
    for bad_rule in (rule(min_started=0), rule(min_ratio=1.5), rule(min_ratio=-0.1)):
        with pytest.raises(ValueError):
            await store.conversion_start([bad_rule], now=1.0, **CONV)
    with pytest.raises(ValueError):
        await store.conversion_start([rule()], window=0, cooldown=1, now=1.0)
    with pytest.raises(ValueError):
        await store.conversion_start([rule()], window=10, cooldown=float("inf"), now=1.0)
    assert await store.conversion_start([], now=1.0, **CONV) is None


async def test_invalid_limits_are_refused(store: Store) -> None:
    """A zero limit or lease is a caller bug and raises ValueError."""
    with pytest.raises(ValueError):
        await store.hit("k", limit=0, window=60, now=1.0)
    with pytest.raises(ValueError):
        await store.claim_due(1.0, limit=0, lease=30)
    with pytest.raises(ValueError):
        await store.claim_due(1.0, limit=1, lease=0)


# -- create with limits: the whole start in one atomic step -----------------


async def test_create_counts_its_limits_and_refuses_when_full(store: Store) -> None:
    """Limits given to create are counted like hit(); a full one refuses and nothing is written."""
    lim = [RateLimit("phone:x", 2, 60.0)]
    for i, now in enumerate((1000.0, 1010.0)):
        _, created = await store.create(f"v{i}", "{}", deadline=50.0, limits=lim, now=now)
        assert created
    with pytest.raises(LimitReached) as info:
        await store.create("v2", "{}", deadline=1.0, ledger=[entry("e", "v2")], limits=lim, now=1030.0)
    assert info.value.key == "phone:x"
    assert info.value.retry_after == pytest.approx(30.0)
    assert await store.get("v2") is None
    assert await store.ledger("v2") == []
    assert await store.claim_due(2.0, limit=10, lease=30) == []
    # The same key seen through hit(): full until the first event leaves the window.
    assert await store.hit("phone:x", limit=2, window=60, now=1059.0) == pytest.approx(1.0)
    _, created = await store.create("v2", "{}", limits=lim, now=1060.0)
    assert created


async def test_create_keeps_the_limits_before_a_refusing_one_counted(store: Store) -> None:
    """Limits are judged in order, as separate hit() calls were: those before the refusal stay counted."""
    assert await store.hit("country:GB", limit=1, window=60, now=1000.0) is None
    lim = [RateLimit("phone:x", 1, 60.0), RateLimit("country:GB", 1, 60.0), RateLimit("prefix:y", 1, 60.0)]
    with pytest.raises(LimitReached) as info:
        await store.create("v1", "{}", limits=lim, now=1001.0)
    assert info.value.key == "country:GB"
    assert await store.hit("phone:x", limit=1, window=60, now=1002.0) is not None
    # The limit after the refusing one was never reached.
    assert await store.hit("prefix:y", limit=1, window=60, now=1002.0) is None


async def test_create_replay_and_taken_id_count_nothing(store: Store) -> None:
    """An idempotent replay returns the record and a taken id raises RecordExists; neither counts a limit."""
    lim = [RateLimit("phone:x", 1, 60.0)]
    first, created = await store.create("v1", '{"n": 1}', idempotency_key="k", limits=lim, now=1000.0)
    assert created
    # Full limit, yet the replay is answered: it returns before any limit.
    again, created = await store.create("v9", "{}", idempotency_key="k", limits=lim, now=1001.0)
    assert (again, created) == (first, False)
    with pytest.raises(RecordExists):
        await store.create("v1", "{}", limits=[RateLimit("phone:z", 1, 60.0)], now=1002.0)
    assert await store.hit("phone:z", limit=1, window=60, now=1003.0) is None
    assert await store.hit("phone:x", limit=2, window=60, now=1003.0) is None


async def test_create_runs_the_conversion_guard_after_the_limits(store: Store) -> None:
    """A guard refusal raises LimitReached with its rule key; limits stay counted, the guard counts none."""
    guard = ConversionCheck((rule("p", min_started=2),), **CONV)
    lim = [RateLimit("phone:x", 10, 60.0)]
    for i in range(2):
        _, created = await store.create(f"v{i}", "{}", limits=lim, conversion=guard, now=1000.0 + i)
        assert created
    with pytest.raises(LimitReached) as info:
        await store.create("v2", "{}", limits=lim, conversion=guard, now=1010.0)
    assert (info.value.key, info.value.retry_after) == ("p", pytest.approx(600.0))
    assert await store.get("v2") is None
    # Three counted on the limit (two created, one refused by the guard): seven left of ten.
    for i in range(7):
        assert await store.hit("phone:x", limit=10, window=60, now=1011.0 + i) is None
    assert await store.hit("phone:x", limit=10, window=60, now=1020.0) is not None
    # Blocked: the remaining cooldown.
    with pytest.raises(LimitReached) as info:
        await store.create("v3", "{}", conversion=guard, now=1110.0)
    assert info.value.retry_after == pytest.approx(500.0)
    # A guard that admits: counted like conversion_start().
    open_guard = ConversionCheck((rule("q", min_started=1),), **CONV)
    _, created = await store.create("v4", "{}", conversion=open_guard, now=1200.0)
    assert created
    assert await store.conversion_start([rule("q", min_started=1)], now=1201.0, **CONV) == (
        "q",
        pytest.approx(600.0),
    )


async def test_create_with_limits_needs_now_and_valid_limits(store: Store) -> None:
    """Without now, or with an invalid limit or rule, create raises ValueError and writes nothing."""
    with pytest.raises(ValueError):
        await store.create("v1", "{}", limits=[RateLimit("k", 1, 60.0)])
    with pytest.raises(ValueError):
        await store.create("v1", "{}", limits=[RateLimit("k", 0, 60.0)], now=1.0)
    with pytest.raises(ValueError):
        await store.create("v1", "{}", conversion=ConversionCheck((rule(min_started=0),), **CONV), now=1.0)
    assert await store.get("v1") is None


async def test_create_with_a_grace_guard_and_ledger_entries(store: Store) -> None:
    """The guard's grace goes through create() too, and the entries written with the record are intact."""
    guard = ConversionCheck((rule("p", min_started=2),), grace=120.0, **CONV)
    for i in range(3):
        _, created = await store.create(
            f"v{i}", "{}", ledger=[entry(f"e{i}", f"v{i}")], conversion=guard, now=1000.0 + i
        )
        assert created
    with pytest.raises(LimitReached):
        await store.create("v3", "{}", ledger=[entry("e3", "v3")], conversion=guard, now=1131.0)
    assert sorted(e.key for e in await store.ledger()) == ["e0", "e1", "e2"]
    assert [e.amount for e in await store.ledger("v2")] == [Decimal("0.01")]


async def test_create_concurrent_starts_admit_exactly_the_limit(make_store: MakeStore) -> None:
    """Racing creates from two clients under one limit: exactly that many records are created."""
    a, b = await make_store(), await make_store()
    lim = [RateLimit("phone:x", 5, 60.0)]

    async def start(s: Store, i: int) -> bool:
        try:
            await s.create(f"v{i}", "{}", limits=lim, now=100.0)
        except LimitReached:
            return False
        return True

    results = await asyncio.gather(*(start(s, i) for i, s in enumerate([a, b] * 10)))
    assert sum(results) == 5


# -- latency cells ---------------------------------------------------------


async def test_latency_cells_add_up_and_drop(store: Store) -> None:
    """Adds to one cell sum; cells are independent; dropped cells are gone, missing ones ignored."""
    assert await store.latency_cells() == {}
    await store.add_latency("telegram|GB|7|12", 1.5)
    await store.add_latency("telegram|GB|7|12", 2.25)
    await store.add_latency("sms|GB|7|never", 4e9)
    cells = await store.latency_cells()
    assert cells == {"telegram|GB|7|12": pytest.approx(3.75), "sms|GB|7|never": pytest.approx(4e9)}
    await store.drop_latency(["telegram|GB|7|12", "absent|cell"])
    await store.drop_latency([])
    assert set(await store.latency_cells()) == {"sms|GB|7|never"}


async def test_concurrent_latency_adds_are_never_lost(make_store: MakeStore) -> None:
    """Two clients adding to the same cell at once lose no increment."""
    a, b = await make_store(), await make_store()
    await asyncio.gather(*(s.add_latency("telegram|BR|7|3", 0.5) for s in [a, b] * 20))
    assert (await b.latency_cells())["telegram|BR|7|3"] == pytest.approx(20.0)


async def test_latency_weight_must_be_finite_and_non_negative(store: Store) -> None:
    """A negative, infinite or NaN weight is refused and writes nothing."""
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            await store.add_latency("telegram|GB|7|1", bad)
    assert await store.latency_cells() == {}


async def test_latency_cell_names_are_verbatim(store: Store) -> None:
    """Cell names with separators and unicode round-trip exactly."""
    name = "telegram|é:1/ZZ|-3|never"
    await store.add_latency(name, 1.0)
    assert await store.latency_cells() == {name: 1.0}


# -- secrets, health, lifecycle ---------------------------------------------


async def test_get_or_set_secret_first_writer_wins(make_store: MakeStore) -> None:
    """The first stored value is returned to every later and concurrent caller."""
    a, b = await make_store(), await make_store()
    values = await asyncio.gather(
        *(s.get_or_set_secret("code", f"value-{n}") for n, s in enumerate([a, b] * 5))
    )
    assert len(set(values)) == 1
    assert values[0].startswith("value-")
    assert await a.get_or_set_secret("code", "later") == values[0]
    assert await b.get_or_set_secret("other", "x") == "x"


async def test_ping_then_aclose(store: Store) -> None:
    """ping succeeds on a live store; after aclose the store refuses use, and aclose is idempotent."""
    await store.ping()
    await store.aclose()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.get("v1")
    await store.aclose()


async def test_ids_with_odd_characters(store: Store) -> None:
    """Ids, keys and names containing separators and unicode are stored verbatim."""
    rid = f"v:{uuid.uuid4()}/é"
    await store.create(rid, "{}", idempotency_key="idem:é/1", deadline=1.0, ledger=[entry("k:é", rid)])
    assert (await store.get(rid)) == Record(rid, 1, "{}")
    assert await store.claim_due(1.0, limit=5, lease=1) == [rid]
    assert [e.verification_id for e in await store.ledger(rid)] == [rid]
