"""SQLite plumbing shared by the embedded store and the embedded queue.

Both keep their data in one SQLite file that several processes may open at
once, and both need the same things from it:

* One connection per object, used only from that object's own single worker
  thread (sqlite3 objects must stay on one thread), so the event loop never
  blocks on disk I/O and calls from many coroutines are serialized without
  extra locking.
* WAL journal, so readers never block the writer and vice versa, and every
  write in one ``BEGIN IMMEDIATE`` transaction (:func:`write_transaction`):
  it takes the write lock up front, so a read-check-write cannot interleave
  with another process's. Waiting for that lock is bounded by ``busy_timeout``.
* Numbered schema migrations tracked in ``PRAGMA user_version``.
* sqlite3 errors surfaced as :class:`~otp_router.errors.StoreError`.

:class:`SqliteFile` holds all of that; :class:`~otp_router.store.sqlite.SqliteStore`
and :class:`~otp_router.queue.sqlite.SqliteQueue` add their own tables and
queries on top.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from otp_router.errors import ConfigError, StoreError

__all__ = ["SqliteFile", "parse_sqlite_url", "write_transaction"]

T = TypeVar("T")


class SqliteFile:
    """One SQLite file behind one connection on one thread: the base of the SQLite store and queue.

    Opening the file, switching it to WAL and migrating the schema happen on
    first use, so construction does no I/O; call :meth:`ping` to fail fast
    on a bad path.

    Subclasses set the class attributes below and run their queries with
    ``await self._run(fn)``, where ``fn(conn)`` runs on the worker thread.

    Args:
        path: The database file; created if missing (its folder must exist).
        busy_timeout: Seconds a write waits for another process's write lock
            before failing with :class:`~otp_router.errors.StoreError`.
        synchronous: ``"NORMAL"`` or ``"FULL"`` (``PRAGMA synchronous``).

    Raises:
        ValueError: ``synchronous`` is neither ``"NORMAL"`` nor ``"FULL"``.
    """

    #: Schema migrations; entry ``i`` upgrades ``user_version`` ``i`` to ``i + 1``.
    _migrations: ClassVar[tuple[str, ...]] = ()
    #: What the file is, in "… is closed" messages.
    _kind: ClassVar[str] = "file"
    #: Start of every StoreError message about the file.
    _error_prefix: ClassVar[str] = "sqlite"
    #: Name prefix of the worker thread.
    _thread_name: ClassVar[str] = "otp-router-sqlite"
    #: Accept ``":memory:"``, whose journal mode can never be WAL.
    _memory_ok: ClassVar[bool] = False

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the worker thread.

        Raises:
            StoreError: The file is closed, or sqlite3 failed.
        """
        if self._closed:
            raise StoreError(f"{self._kind} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._connection())
        except sqlite3.Error as exc:
            raise StoreError(f"{self._error_prefix}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                # Transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
                isolation_level=None,
                check_same_thread=True,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                self._enable_wal(conn)
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # WAL is a property of the file, so usually it is already on. Switching
        # needs an exclusive lock, and SQLite reports "locked" at once, without
        # its busy handler, when another connection is switching the same new
        # file at the same moment: retry ourselves, within busy_timeout.
        give_up = time.monotonic() + self.busy_timeout
        while True:
            try:
                mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
                break
            except sqlite3.OperationalError:
                if time.monotonic() >= give_up:
                    raise
                time.sleep(0.01)
        if mode.lower() != "wal" and not (self._memory_ok and self.path == ":memory:"):
            raise StoreError(f"{self._error_prefix}: could not enable WAL (journal_mode is {mode})")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrations = self._migrations
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == len(migrations):
            self._check_schema(conn)
            return
        with write_transaction(conn):
            # Re-read under the write lock: another process may have migrated
            # the file between our first look and taking the lock.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version:
                # The store's and the queue's files both number their schemas: never
                # migrate (or judge the version of) a file of the other kind.
                self._check_schema(conn)
            if version > len(migrations):
                raise StoreError(
                    f"{self._error_prefix}: schema version {version} is newer than this otp-router "
                    f"supports ({len(migrations)}); upgrade otp-router"
                )
            for step in range(version, len(migrations)):
                # executescript() would COMMIT our transaction; run statements one by one.
                for statement in migrations[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step + 1}")

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Called when the file already has a schema (of any version); may raise StoreError."""

    async def ping(self) -> None:
        """Open the file if needed and run a trivial query.

        Raises:
            StoreError: The file cannot be opened or queried, or it is closed.
        """

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT 1").fetchone()

        await self._run(op)

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction that takes the database's write lock up front.

    Commits when the block ends normally; rolls back and re-raises otherwise.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def parse_sqlite_url(url: str, *, var: str, example: str) -> tuple[str, float, Literal["NORMAL", "FULL"]]:
    """Read a ``sqlite:///path?synchronous=…&busy_timeout=…`` URL.

    Args:
        url: The URL; ``sqlite:///x.db`` is relative, ``sqlite:////x.db`` absolute.
        var: The setting the URL came from, named in error messages (the URL
            itself never is: it is the operator's configuration).
        example: A file name for the "no file path" message.

    Returns:
        ``(path, busy_timeout, synchronous)``; unset options are ``5.0`` and ``"NORMAL"``.

    Raises:
        ConfigError: The URL has a host or no path, or an unknown or invalid option.
    """
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigError(
            f"{var}: a sqlite URL has no host; use sqlite:///relative/path or sqlite:////absolute/path"
        )
    # The path after "sqlite://" always starts with "/": drop that one, so
    # "sqlite:///x.db" is relative and "sqlite:////x.db" absolute.
    path = unquote(parts.path[1:])
    if not path:
        raise ConfigError(f"{var}: the sqlite URL has no file path, e.g. sqlite:///{example}")
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    busy_timeout = 5.0
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "synchronous" and value.upper() in ("NORMAL", "FULL"):
            synchronous = "FULL" if value.upper() == "FULL" else "NORMAL"
        elif name == "busy_timeout":
            try:
                busy_timeout = float(value)
            except ValueError:
                raise ConfigError(f"{var}: busy_timeout must be a number of seconds") from None
        else:
            raise ConfigError(
                f"{var}: unsupported sqlite option {name!r} (known: synchronous=NORMAL|FULL, busy_timeout)"
            )
    return path, busy_timeout, synchronous
