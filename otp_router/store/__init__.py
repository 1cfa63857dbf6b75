"""State stores: pick one with :func:`open_store` and a URL.

========================================  =========================================
URL                                       Store
========================================  =========================================
``memory://``                             :class:`MemoryStore` (tests; one process)
``sqlite:///relative/path.db``            :class:`SqliteStore`, path relative to the
                                          working directory
``sqlite:////absolute/path.db``           :class:`SqliteStore`, absolute path (four
                                          slashes: three, then the path's own)
``redis://host:6379/0?prefix=name``       :class:`RedisStore` (also ``rediss://``,
                                          ``unix:///path/to/socket``)
========================================  =========================================

SQLite URLs accept ``?synchronous=FULL`` and ``?busy_timeout=<seconds>``;
Redis URLs accept ``prefix``, ``idempotency_ttl`` and ``record_ttl`` (see
:class:`RedisStore`) besides redis-py's own parameters.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from otp_router.errors import ConfigError
from otp_router.sqlite_common import parse_sqlite_url
from otp_router.store.base import (
    ConversionCheck,
    ConversionRule,
    LedgerEntry,
    LedgerKind,
    LimitReached,
    RateLimit,
    Record,
    RecordExists,
    Store,
)
from otp_router.store.memory import MemoryStore

# This module imports the ``redis`` package only when a RedisStore is built,
# so importing it here keeps the core usable without the ``redis`` extra.
from otp_router.store.redis import RedisStore
from otp_router.store.sqlite import SqliteStore

__all__ = [
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
]

_VAR = "OTP_ROUTER_STORE_URL"


def open_store(url: str) -> Store:
    """Build the store a URL names. No connection is made until first use.

    Args:
        url: ``memory://``, ``sqlite:///path`` or a Redis URL (see the table
            in this module's docstring).

    Returns:
        A new store; the caller owns it and must ``await store.aclose()``.

    Raises:
        ConfigError: Unknown scheme, malformed URL, or the ``redis`` extra is
            missing for a Redis URL. The message names ``OTP_ROUTER_STORE_URL``
            but never repeats the URL, which may hold a password.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        return _open_sqlite(url)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)
    raise ConfigError(
        f"{_VAR}: unknown scheme {scheme!r}; use memory://, sqlite:///path or redis://host:port/db"
    )


def _open_sqlite(url: str) -> SqliteStore:
    path, busy_timeout, synchronous = parse_sqlite_url(url, var=_VAR, example="otp-router.db")
    return SqliteStore(path, busy_timeout=busy_timeout, synchronous=synchronous)
