"""The embedded, durable default store: one SQLite file.

Several processes may share the file (the CLI's ``send`` and ``check`` run as
separate processes; several workers may run on one machine):

* WAL journal, so readers never block the writer and vice versa.
* Every write is one ``BEGIN IMMEDIATE`` transaction: it takes the write lock
  up front, so the read-check-write of a compare-and-set or a deadline claim
  cannot interleave with another process's. Waiting for that lock is bounded
  by ``busy_timeout``.
* Each store owns one connection, used only from its own single worker thread;
  the event loop never blocks on disk I/O.

Schema changes are numbered migrations tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from otp_router.errors import ConcurrentUpdate, StoreError, VerificationNotFound
from otp_router.sqlite_common import SqliteFile, write_transaction
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
    check_claim_args,
    check_conversion_args,
    check_create_args,
    check_hit_args,
    check_latency_weight,
    conversion_blocks,
    conversion_buckets,
    dedup_entries,
    entry_from_fields,
    entry_to_fields,
    fresh_slots,
    retry_after,
)

__all__ = ["MIGRATIONS", "SqliteStore"]

#: Schema migrations; entry ``i`` upgrades ``user_version`` ``i`` to ``i + 1``.
#: Append new steps, never edit shipped ones. Amounts are TEXT (not NUMERIC,
#: whose affinity would turn "0.0083" into a binary float).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        data TEXT NOT NULL,
        deadline REAL,
        idempotency_key TEXT UNIQUE
    );
    CREATE INDEX records_deadline ON records (deadline) WHERE deadline IS NOT NULL;
    CREATE TABLE ledger (
        key TEXT PRIMARY KEY,
        verification_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        provider TEXT NOT NULL,
        region TEXT NOT NULL,
        kind TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX ledger_at ON ledger (at);
    CREATE INDEX ledger_verification ON ledger (verification_id, at);
    CREATE TABLE rate_events (
        key TEXT NOT NULL,
        at REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE INDEX rate_events_key ON rate_events (key, at);
    CREATE INDEX rate_events_expires ON rate_events (expires);
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE latency (
        cell TEXT PRIMARY KEY,
        weight REAL NOT NULL
    );
    """,
    # Conversion guard: started/verified counts per key and time bucket, and blocks.
    """
    CREATE TABLE conversion (
        key TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        started INTEGER NOT NULL DEFAULT 0,
        verified INTEGER NOT NULL DEFAULT 0,
        expires REAL NOT NULL,
        PRIMARY KEY (key, bucket)
    ) WITHOUT ROWID;
    CREATE INDEX conversion_expires ON conversion (expires);
    CREATE TABLE conversion_blocks (
        key TEXT PRIMARY KEY,
        until REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # Conversion guard: starts per key and grace slot, to tell fresh starts from judged ones.
    """
    CREATE TABLE conversion_fresh (
        key TEXT NOT NULL,
        slot INTEGER NOT NULL,
        started INTEGER NOT NULL DEFAULT 0,
        expires REAL NOT NULL,
        PRIMARY KEY (key, slot)
    ) WITHOUT ROWID;
    CREATE INDEX conversion_fresh_expires ON conversion_fresh (expires);
    """,
)

_LEDGER_COLUMNS = "key, verification_id, channel, provider, region, kind, amount, currency, at"
_INSERT_LEDGER = f"INSERT OR IGNORE INTO ledger ({_LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


class SqliteStore(SqliteFile):
    """A :class:`~otp_router.store.base.Store` in one SQLite file.

    Opening the file, switching it to WAL and migrating the schema happen on
    first use, so constructing a store does no I/O; call :meth:`ping` to
    fail fast on a bad path. The connection plumbing is
    :class:`~otp_router.sqlite_common.SqliteFile`'s.

    Args:
        path: The database file; created if missing (its folder must exist).
        busy_timeout: Seconds a write waits for another process's write lock
            before failing with :class:`~otp_router.errors.StoreError`.
        synchronous: ``"NORMAL"`` (default) or ``"FULL"``. In WAL mode,
            NORMAL never corrupts the database and loses nothing when the
            *process* crashes, but an OS crash or power cut may roll back the
            last transactions committed since the previous checkpoint. We
            accept that by default: a lost recent verification only makes the
            user ask for a new code, and FULL's fsync on every commit would cap
            throughput on slow disks. Choose FULL when the cost ledger must
            survive power loss to the last entry.
    """

    _migrations = MIGRATIONS
    _kind = "store"
    _error_prefix = "sqlite"
    _thread_name = "otp-router-sqlite"
    _memory_ok = True

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        # The queue's file has a schema version too: make sure this one is really a store.
        if (
            conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone()
            is None
        ):
            raise StoreError("sqlite: the file is not an otp-router store (is it the queue's file?)")

    # -- Store protocol ---------------------------------------------------

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
        """Insert a new record at version 1 (see :meth:`Store.create`): one transaction.

        Raises:
            RecordExists: ``record_id`` already exists (ids must be unique).
            LimitReached: A limit or the conversion guard refused.
            StoreError: The database failed.
        """
        at = check_create_args(limits, conversion, now)
        rows = _ledger_rows(ledger)

        def op(conn: sqlite3.Connection) -> tuple[Record, bool] | LimitReached:
            # A refusal is returned, not raised, so that the transaction
            # commits the limits counted before the refusing one.
            with write_transaction(conn):
                if idempotency_key is not None:
                    row = conn.execute(
                        "SELECT id, version, data FROM records WHERE idempotency_key = ?",
                        (idempotency_key,),
                    ).fetchone()
                    if row is not None:
                        return Record(id=row[0], version=row[1], data=row[2]), False
                if conn.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone():
                    raise RecordExists("a record with this id already exists")
                for limit in limits:
                    wait = _hit(conn, limit.key, limit=limit.limit, window=limit.window, now=at)
                    if wait is not None:
                        return LimitReached(limit.key, wait)
                if conversion is not None and conversion.rules:
                    blocked = _conversion_start(
                        conn,
                        conversion.rules,
                        window=conversion.window,
                        cooldown=conversion.cooldown,
                        now=at,
                        grace=conversion.grace,
                    )
                    if blocked is not None:
                        return LimitReached(*blocked)
                try:
                    conn.execute(
                        "INSERT INTO records (id, version, data, deadline, idempotency_key)"
                        " VALUES (?, 1, ?, ?, ?)",
                        (record_id, data, _deadline(deadline), idempotency_key),
                    )
                except (
                    sqlite3.IntegrityError
                ) as exc:  # pragma: no cover - checked above, in the same transaction
                    raise RecordExists("a record with this id already exists") from exc
                conn.executemany(_INSERT_LEDGER, rows)
            return Record(id=record_id, version=1, data=data), True

        result = await self._run(op)
        if isinstance(result, LimitReached):
            raise result
        return result

    async def get(self, record_id: str) -> Record | None:
        """Load a record, or None."""

        def op(conn: sqlite3.Connection) -> Record | None:
            row = conn.execute("SELECT version, data FROM records WHERE id = ?", (record_id,)).fetchone()
            return None if row is None else Record(id=record_id, version=row[0], data=row[1])

        return await self._run(op)

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
        rows = _ledger_rows(ledger)

        def op(conn: sqlite3.Connection) -> Record:
            with write_transaction(conn):
                updated = conn.execute(
                    "UPDATE records SET version = version + 1, data = ?, deadline = ?"
                    " WHERE id = ? AND version = ?",
                    (data, _deadline(deadline), record_id, expected_version),
                ).rowcount
                if updated != 1:
                    exists = conn.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone()
                    if exists is None:
                        raise VerificationNotFound("no verification with this id")
                    raise ConcurrentUpdate("the record was changed by another writer")
                conn.executemany(_INSERT_LEDGER, rows)
            return Record(id=record_id, version=expected_version + 1, data=data)

        return await self._run(op)

    async def claim_due(self, now: float, *, limit: int, lease: float) -> list[str]:
        """Claim up to ``limit`` due deadlines, earliest first (see :meth:`Store.claim_due`)."""
        check_claim_args(limit, lease)

        def op(conn: sqlite3.Connection) -> list[str]:
            with write_transaction(conn):
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM records WHERE deadline IS NOT NULL AND deadline <= ?"
                        " ORDER BY deadline, id LIMIT ?",
                        (now, limit),
                    )
                ]
                conn.executemany(
                    "UPDATE records SET deadline = ? WHERE id = ?", [(now + lease, rid) for rid in ids]
                )
            return ids

        return await self._run(op)

    async def next_deadline(self) -> float | None:
        """The earliest scheduled deadline, or None."""

        def op(conn: sqlite3.Connection) -> float | None:
            value: float | None = conn.execute(
                "SELECT MIN(deadline) FROM records WHERE deadline IS NOT NULL"
            ).fetchone()[0]
            return value

        return await self._run(op)

    async def ledger(self, record_id: str | None = None) -> list[LedgerEntry]:
        """Ledger entries ordered by time, ties in insertion order."""

        def op(conn: sqlite3.Connection) -> list[LedgerEntry]:
            if record_id is None:
                cursor = conn.execute(f"SELECT {_LEDGER_COLUMNS} FROM ledger ORDER BY at, rowid")
            else:
                cursor = conn.execute(
                    f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE verification_id = ? ORDER BY at, rowid",
                    (record_id,),
                )
            names = [d[0] for d in cursor.description]
            return [entry_from_fields(dict(zip(names, (str(v) for v in row), strict=True))) for row in cursor]

        return await self._run(op)

    async def hit(self, key: str, *, limit: int, window: float, now: float) -> float | None:
        """Count one event against a sliding-window limit (see :meth:`Store.hit`)."""
        check_hit_args(limit, window)

        def op(conn: sqlite3.Connection) -> float | None:
            with write_transaction(conn):
                return _hit(conn, key, limit=limit, window=window, now=now)

        return await self._run(op)

    async def conversion_start(
        self,
        rules: Sequence[ConversionRule],
        *,
        window: float,
        cooldown: float,
        now: float,
        grace: float = 0.0,
    ) -> tuple[str, float] | None:
        """Count a start unless a key is blocked (see :meth:`Store.conversion_start`)."""
        check_conversion_args(rules, window, cooldown, grace)

        def op(conn: sqlite3.Connection) -> tuple[str, float] | None:
            with write_transaction(conn):
                return _conversion_start(conn, rules, window=window, cooldown=cooldown, now=now, grace=grace)

        return await self._run(op)

    async def conversion_verified(self, keys: Sequence[str], *, window: float, now: float) -> None:
        """Count a verification on each key (see :meth:`Store.conversion_verified`)."""
        current, _ = conversion_buckets(window, now)
        rows = _bucket_rows(keys, current, window)

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.executemany(_COUNT_CONVERSION.format(column="verified"), rows)

        await self._run(op)

    async def get_or_set_secret(self, name: str, value: str) -> str:
        """Return the stored secret, storing ``value`` first if absent."""

        def op(conn: sqlite3.Connection) -> str:
            with write_transaction(conn):
                conn.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, value))
                stored: str = conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0]
            return stored

        return await self._run(op)

    async def add_latency(self, cell: str, weight: float) -> None:
        """Add ``weight`` to a latency cell (see :meth:`Store.add_latency`): one upsert."""
        check_latency_weight(weight)

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.execute(
                    "INSERT INTO latency (cell, weight) VALUES (?, ?)"
                    " ON CONFLICT (cell) DO UPDATE SET weight = weight + excluded.weight",
                    (cell, float(weight)),
                )

        await self._run(op)

    async def latency_cells(self) -> dict[str, float]:
        """Every latency cell and its weight."""

        def op(conn: sqlite3.Connection) -> dict[str, float]:
            return {cell: float(weight) for cell, weight in conn.execute("SELECT cell, weight FROM latency")}

        return await self._run(op)

    async def drop_latency(self, cells: Sequence[str]) -> None:
        """Delete these latency cells."""

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.executemany("DELETE FROM latency WHERE cell = ?", [(cell,) for cell in cells])

        await self._run(op)

    # -- extras (not part of the protocol) ---------------------------------

    async def journal_mode(self) -> str:
        """The file's journal mode (``"wal"`` once opened); for health checks and tests."""

        def op(conn: sqlite3.Connection) -> str:
            mode: str = conn.execute("PRAGMA journal_mode").fetchone()[0]
            return mode

        return await self._run(op)


#: Adds one to ``started`` or ``verified`` of a (key, bucket) row, creating it if needed.
_COUNT_CONVERSION = (
    "INSERT INTO conversion (key, bucket, {column}, expires) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (key, bucket) DO UPDATE SET {column} = {column} + 1"
)


def _hit(conn: sqlite3.Connection, key: str, *, limit: int, window: float, now: float) -> float | None:
    """:meth:`SqliteStore.hit` inside the caller's write transaction."""
    # Events carry their own expiry, so one indexed DELETE drops
    # every key's stale events, whatever window each key uses.
    conn.execute("DELETE FROM rate_events WHERE expires <= ?", (now,))
    times = [
        row[0]
        for row in conn.execute(
            "SELECT at FROM rate_events WHERE key = ? AND at > ? ORDER BY at",
            (key, now - window),
        )
    ]
    if len(times) >= limit:
        return retry_after(times, limit=limit, window=window, now=now)
    conn.execute("INSERT INTO rate_events (key, at, expires) VALUES (?, ?, ?)", (key, now, now + window))
    return None


def _conversion_start(
    conn: sqlite3.Connection,
    rules: Sequence[ConversionRule],
    *,
    window: float,
    cooldown: float,
    now: float,
    grace: float = 0.0,
) -> tuple[str, float] | None:
    """:meth:`SqliteStore.conversion_start` inside the caller's write transaction."""
    current, oldest = conversion_buckets(window, now)
    slots = fresh_slots(grace, now)
    # Rows carry the time they leave every window: one indexed DELETE keeps the table small.
    conn.execute("DELETE FROM conversion WHERE expires <= ?", (now,))
    if slots is not None:
        conn.execute("DELETE FROM conversion_fresh WHERE expires <= ?", (now,))
    for rule in rules:
        row = conn.execute("SELECT until FROM conversion_blocks WHERE key = ?", (rule.key,)).fetchone()
        if row is not None and row[0] > now:
            return rule.key, float(row[0]) - now
        started, verified = conn.execute(
            "SELECT COALESCE(SUM(started), 0), COALESCE(SUM(verified), 0) FROM conversion "
            "WHERE key = ? AND bucket >= ?",
            (rule.key, oldest),
        ).fetchone()
        fresh = 0
        if slots is not None:
            (fresh,) = conn.execute(
                "SELECT COALESCE(SUM(started), 0) FROM conversion_fresh WHERE key = ? AND slot >= ?",
                (rule.key, slots[1]),
            ).fetchone()
        if conversion_blocks(rule, started, verified, fresh):
            conn.execute(
                "INSERT OR REPLACE INTO conversion_blocks (key, until) VALUES (?, ?)",
                (rule.key, now + cooldown),
            )
            return rule.key, cooldown
    conn.executemany(
        _COUNT_CONVERSION.format(column="started"), _bucket_rows([r.key for r in rules], current, window)
    )
    if slots is not None:
        # A slot may hold a start younger than the grace until slot + CONVERSION_BUCKETS + 1 begins.
        expires = (slots[0] + CONVERSION_BUCKETS + 1) * grace / CONVERSION_BUCKETS
        conn.executemany(
            "INSERT INTO conversion_fresh (key, slot, started, expires) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (key, slot) DO UPDATE SET started = started + 1",
            [(r.key, slots[0], expires) for r in rules],
        )
    return None


def _bucket_rows(keys: Sequence[str], bucket: int, window: float) -> list[tuple[str, int, float]]:
    # Bucket b is inside the window until bucket b + CONVERSION_BUCKETS begins; one more as margin.
    expires = (bucket + CONVERSION_BUCKETS + 1) * window / CONVERSION_BUCKETS
    return [(key, bucket, expires) for key in keys]


def _deadline(deadline: float | None) -> float | None:
    return None if deadline is None else float(deadline)


def _ledger_rows(entries: Sequence[LedgerEntry]) -> list[tuple[str, ...]]:
    # Encode (and validate) before the transaction starts, so a bad entry
    # never leaves half a write behind.
    return [tuple(entry_to_fields(e).values()) for e in dedup_entries(entries)]
