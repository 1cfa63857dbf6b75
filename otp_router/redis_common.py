"""Redis plumbing shared by the distributed store and the distributed queue.

Both take a ``redis://``, ``rediss://`` or ``unix://`` URL that carries our own
query parameters next to redis-py's, import the optional ``redis`` package only
when built, talk through a blocking connection pool, and surface every
redis-py error as :class:`~otp_router.errors.StoreError`. That is all here;
:class:`~otp_router.store.redis.RedisStore` and
:class:`~otp_router.queue.redis.RedisStreamQueue` add their keys and commands.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from otp_router.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

__all__ = ["RedisConnection", "cluster_param", "require_redis", "split_redis_url"]


def require_redis(var: str) -> None:
    """Check that the optional ``redis`` package is installed.

    Args:
        var: The setting that named Redis, for the message.

    Raises:
        ConfigError: The package is missing; the message says how to install it.
    """
    try:
        import redis.asyncio
        import redis.exceptions  # noqa: F401 - imported only to check that the package is there
    except ImportError as exc:  # pragma: no cover - the test env has the extra
        raise ConfigError(
            f"{var} names Redis, which needs the redis package: pip install 'otp-router[redis]'"
        ) from exc


def cluster_param(params: dict[str, str], var: str) -> bool:
    """The ``cluster`` URL parameter: ``1``/``true``/``yes`` for a Redis Cluster (default no).

    Raises:
        ConfigError: Any other value.
    """
    value = params.get("cluster", "0").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ConfigError(f"{var}: cluster must be 1 or 0")


def split_redis_url(
    url: str, ours: Collection[str], ignored: Collection[str] = ()
) -> tuple[str, dict[str, str]]:
    """Take our own query parameters out of a Redis URL.

    Args:
        url: The configured URL.
        ours: Names of the parameters we read.
        ignored: Names dropped without being read (another component's
            parameters, when one URL serves several).

    Returns:
        The URL redis-py should see (every other parameter kept), and our
        parameters (the last value wins).
    """
    parts = urlsplit(url)
    mine: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ours:
            mine[name] = value
        elif name not in ignored:
            theirs.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), mine


@functools.cache
def _cluster_class() -> type[RedisCluster]:
    """redis-py's ``RedisCluster``, reading the cluster's layout before its first command.

    redis-py (8.1) can fail a command, or run it twice, when several start
    concurrently on a client that has not read the layout yet (seen with 20
    concurrent ``INCR`` on a fresh client: 22 counted). Our scripts are not
    all safe to run twice, so every command first waits for that read, which
    redis-py does once and under a lock.
    """
    from redis.asyncio.cluster import RedisCluster

    class _ReadyCluster(RedisCluster):
        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)

    return _ReadyCluster


class RedisConnection:
    """A redis-py client on a blocking pool: the base of the Redis store and queue.

    Building it opens no connection; the first command does. Subclasses
    check their configuration first (after :func:`require_redis`), then call
    this constructor, and wrap every command in ``with self._mapped():``.

    Args:
        client_url: The URL for redis-py, without our parameters.
        max_connections: Pool size (redis-py's ``max_connections`` URL
            parameter overrides it). Callers beyond it wait for a free
            connection instead of failing.
        encoding_errors: How replies that are not UTF-8 are decoded (and
            text encoded), as for :meth:`bytes.decode`.
    """

    #: What this is, in "… is closed" messages.
    _kind: ClassVar[str] = "client"
    #: Start of every StoreError message about a redis-py error.
    _error_prefix: ClassVar[str] = "redis"

    def __init__(
        self, client_url: str, *, max_connections: int, encoding_errors: str = "strict", cluster: bool = False
    ) -> None:
        import redis.asyncio as aioredis
        import redis.exceptions

        # A cluster client's own failures (no reachable node, a slot without
        # a node) are RedisClusterException, which is not a RedisError.
        self._redis_error: tuple[type[Exception], ...] = (
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,
        )
        self._response_error: type[Exception] = redis.exceptions.ResponseError
        self._client: Redis
        if cluster:
            # One pool per node, of max_connections each. Its scripts,
            # pipelines and commands route by key slot; a cluster client
            # speaks to the same commands, so it is typed as one Redis here.
            self._client = cast(
                "Redis",
                _cluster_class().from_url(
                    client_url,
                    decode_responses=True,
                    encoding_errors=encoding_errors,
                    max_connections=max_connections,
                ),
            )
        else:
            # redis-py's default pool raises "Too many connections" once its
            # limit is reached; a burst of concurrent callers should queue.
            pool = aioredis.BlockingConnectionPool.from_url(
                client_url,
                decode_responses=True,
                encoding_errors=encoding_errors,
                max_connections=max_connections,
            )
            self._client = aioredis.Redis.from_pool(pool)
        self._closed = False

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Check this is open and turn redis-py errors into StoreError."""
        if self._closed:
            raise StoreError(f"{self._kind} is closed")
        try:
            yield
        except self._redis_error as exc:
            # redis-py messages name the host and the failure, never the password.
            raise StoreError(f"{self._error_prefix}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Send ``PING``.

        Raises:
            StoreError: Redis is unreachable, or this is closed.
        """
        with self._mapped():
            await self._client.ping()

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()
