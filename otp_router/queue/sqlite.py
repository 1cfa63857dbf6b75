"""The embedded queue: a table in its own SQLite file.

Same semantics as the Redis stream queue, for one machine with any number of
worker processes:

* WAL journal; every claim, acknowledgement and dead-lettering is one
  ``BEGIN IMMEDIATE`` transaction, so two processes can never claim the same
  row (the second waits for the write lock, then sees the row taken).
* A claimed row records its consumer and claim time; that is its lease. A row
  whose claim is older than the visibility timeout can be reclaimed by
  another consumer (:meth:`SqliteQueue.reclaim`); the owner renews it with
  :meth:`SqliteQueue.touch`.
* Acknowledging deletes the row. Ids are ``AUTOINCREMENT``, never reused, so
  a late acknowledgement can never delete a newer message.
* Dead letters move to their own table in the same transaction.

Any program can enqueue with plain SQL; the defaults fill in the rest::

    INSERT INTO queue (data) VALUES ('{"phone": "+447400123456", "idempotency_key": "login-42"}');

Waiting for messages is polling, since SQLite has no cross-process
notification: a cheap read-only query every ``poll_interval`` seconds, and a
write transaction only when something is there.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from otp_router.errors import StoreError
from otp_router.inputs import has_lone_surrogate
from otp_router.queue.base import DeadLetter, Delivery, QueueMessage, message_text, stored_bytes
from otp_router.sqlite_common import SqliteFile, write_transaction

__all__ = ["MIGRATIONS", "SqliteQueue"]

#: Schema migrations; entry ``i`` upgrades ``user_version`` ``i`` to ``i + 1``. Append only.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        data TEXT,
        enqueued_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
        consumer TEXT,
        claimed_at REAL,
        deliveries INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX queue_waiting ON queue (id) WHERE consumer IS NULL;
    CREATE INDEX queue_claimed ON queue (claimed_at) WHERE consumer IS NOT NULL;
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL,
        data TEXT,
        enqueued_at REAL NOT NULL,
        reason TEXT NOT NULL,
        failed_at REAL NOT NULL,
        attempts INTEGER NOT NULL
    );
    CREATE TABLE heartbeats (
        worker TEXT PRIMARY KEY,
        at REAL NOT NULL,
        expires REAL NOT NULL
    );
    """,
)

# ``data`` is read as bytes with its storage class: a row written by another
# program may hold a BLOB or bytes that are not UTF-8, and letting sqlite3
# decode it would fail the whole read (blocking every row behind it) instead
# of dead-lettering that one row. The numeric columns are cast for the same
# reason: SQLite stores whatever an INSERT gives, text included, and a value
# that cannot be converted reads as 0 instead of failing every claim.
_CLAIM_COLUMNS = (
    "id, typeof(data), CAST(data AS BLOB), CAST(enqueued_at AS REAL), CAST(deliveries AS INTEGER)"
)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    row_id, kind, raw, enqueued_at, deliveries = row
    fields = {} if raw is None else {"data": bytes(raw).decode("utf-8", "surrogateescape")}
    unreadable = "data is stored as a BLOB, not as TEXT" if kind == "blob" else None
    return Delivery(str(row_id), fields, float(enqueued_at), int(deliveries) + 1, unreadable)


def _stored(delivery: Delivery) -> str | bytes | None:
    """``data`` as it was stored: text, or the original bytes when it was a BLOB or not UTF-8."""
    data = delivery.data
    if data is None:
        return None
    if delivery.unreadable is not None or has_lone_surrogate(data):
        return stored_bytes(data)
    return data


class SqliteQueue(SqliteFile):
    """A :class:`~otp_router.queue.base.Queue` in one SQLite file.

    Opening the file happens on first use; construction does no I/O.

    Args:
        path: The database file; created if missing (its folder must exist).
            Use a file of its own, not the store's (each has its own schema
            version).
        busy_timeout: Seconds a write waits for another process's lock.
        synchronous: ``"NORMAL"`` (default: a power cut may lose the last
            few enqueues, never corrupt) or ``"FULL"``.
        poll_interval: Seconds between looks for new messages while
            :meth:`read` blocks.
        clock: Unix time source (claims, leases, heartbeats).
    """

    _migrations = MIGRATIONS
    _kind = "queue"
    _error_prefix = "queue: sqlite"
    _thread_name = "otp-router-queue"

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        poll_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, busy_timeout=busy_timeout, synchronous=synchronous)
        self.poll_interval = poll_interval
        self.clock = clock

    # -- plumbing ---------------------------------------------------------

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        # The store's file has a schema version too: make sure this one is really a queue.
        if (
            conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queue'").fetchone()
            is None
        ):
            raise StoreError("queue: sqlite: the file is not an otp-router queue (is it the store's file?)")

    def _claim(
        self, conn: sqlite3.Connection, consumer: str, where: str, order: str, args: tuple[float | int, ...]
    ) -> list[Delivery]:
        """Claim the rows ``where`` selects, in one write transaction."""
        now = self.clock()
        with write_transaction(conn):
            rows = conn.execute(
                f"SELECT {_CLAIM_COLUMNS} FROM queue WHERE {where} ORDER BY {order} LIMIT ?", args
            ).fetchall()
            conn.executemany(
                "UPDATE queue SET consumer = ?, claimed_at = ?, deliveries = deliveries + 1 WHERE id = ?",
                [(consumer, now, row[0]) for row in rows],
            )
        return [_delivery(row) for row in rows]

    # -- Queue protocol -----------------------------------------------------

    async def enqueue(self, message: QueueMessage | str) -> str:
        """Insert a row; returns its id."""
        data = message_text(message)
        now = self.clock()

        def op(conn: sqlite3.Connection) -> str:
            with write_transaction(conn):
                cursor = conn.execute("INSERT INTO queue (data, enqueued_at) VALUES (?, ?)", (data, now))
            return str(cursor.lastrowid)

        return await self._run(op)

    async def read(self, consumer: str, count: int, block: float) -> list[Delivery]:
        """Claim up to ``count`` waiting rows, polling for up to ``block`` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, block)

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            # Look before taking the write lock: an idle poll must not block writers.
            if conn.execute("SELECT 1 FROM queue WHERE consumer IS NULL LIMIT 1").fetchone() is None:
                return []
            return self._claim(conn, consumer, "consumer IS NULL", "id", (max(1, count),))

        while True:
            deliveries = await self._run(op)
            if deliveries or loop.time() >= until:
                return deliveries
            await asyncio.sleep(min(self.poll_interval, max(0.0, until - loop.time())))

    async def ack(self, delivery: Delivery) -> None:
        """Delete the row."""

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.execute("DELETE FROM queue WHERE id = ?", (int(delivery.id),))

        await self._run(op)

    async def reclaim(self, consumer: str, min_idle: float, count: int) -> list[Delivery]:
        """Claim rows whose claim is older than ``min_idle`` seconds, oldest claim first."""
        cutoff = self.clock() - min_idle

        def op(conn: sqlite3.Connection) -> list[Delivery]:
            return self._claim(
                conn,
                consumer,
                "consumer IS NOT NULL AND claimed_at <= ?",
                "claimed_at, id",
                (cutoff, max(1, count)),
            )

        return await self._run(op)

    async def touch(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Renew the claims on rows this consumer is still working on."""
        if not deliveries:
            return
        now = self.clock()
        rows = [(consumer, now, int(d.id)) for d in deliveries]

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.executemany(
                    "UPDATE queue SET consumer = ?, claimed_at = ? WHERE id = ? AND consumer IS NOT NULL",
                    rows,
                )

        await self._run(op)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Delete the row and, if this call deleted it, record the dead letter (one transaction)."""
        now = self.clock()

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                deleted = conn.execute("DELETE FROM queue WHERE id = ?", (int(delivery.id),)).rowcount
                if deleted:
                    conn.execute(
                        "INSERT INTO dead_letters (message_id, data, enqueued_at, reason,"
                        " failed_at, attempts) VALUES (?, ?, ?, ?, ?, ?)",
                        (delivery.id, _stored(delivery), delivery.enqueued_at, reason, now, delivery.attempt),
                    )

        await self._run(op)

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters."""

        def op(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT id, message_id, CAST(data AS BLOB), reason, CAST(failed_at AS REAL),"
                " CAST(attempts AS INTEGER)"
                " FROM dead_letters ORDER BY id LIMIT ?",
                (count,),
            ).fetchall()
            return [
                DeadLetter(
                    str(r[0]),
                    r[1],
                    {} if r[2] is None else {"data": bytes(r[2]).decode("utf-8", "surrogateescape")},
                    r[3],
                    float(r[4]),
                    int(r[5]),
                )
                for r in rows
            ]

        return await self._run(op)

    async def depth(self) -> int:
        """Rows not yet claimed."""
        return await self._scalar("SELECT COUNT(*) FROM queue WHERE consumer IS NULL")

    async def pending(self) -> int:
        """Rows claimed and not yet acknowledged."""
        return await self._scalar("SELECT COUNT(*) FROM queue WHERE consumer IS NOT NULL")

    async def _scalar(self, sql: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql).fetchone()[0])

        return await self._run(op)

    async def lag(self) -> float:
        """Age of the oldest unclaimed row."""

        def op(conn: sqlite3.Connection) -> float | None:
            value: float | None = conn.execute(
                "SELECT MIN(CAST(enqueued_at AS REAL)) FROM queue WHERE consumer IS NULL"
            ).fetchone()[0]
            return value

        oldest = await self._run(op)
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)

    async def heartbeat(self, worker: str, ttl: float) -> None:
        """Upsert the worker's heartbeat row with its expiry."""
        now = self.clock()

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO heartbeats (worker, at, expires) VALUES (?, ?, ?)",
                    (worker, now, now + ttl),
                )

        await self._run(op)

    async def last_heartbeat(self, worker: str) -> float | None:
        """The heartbeat's time while it has not expired, else None."""
        now = self.clock()

        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT at FROM heartbeats WHERE worker = ? AND expires > ?", (worker, now)
            ).fetchone()
            return None if row is None else float(row[0])

        return await self._run(op)

    async def clear_heartbeat(self, worker: str) -> None:
        """Delete the heartbeat row."""

        def op(conn: sqlite3.Connection) -> None:
            with write_transaction(conn):
                conn.execute("DELETE FROM heartbeats WHERE worker = ?", (worker,))

        await self._run(op)
