"""The clients a process holds (Redis, PostgreSQL pool, ledger, keyring), opened and closed once.

The gateway opens one in its lifespan, each worker process one at start; never at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import asyncpg
import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError

from core.autopipeline import AutoPipeline
from core.crypto import Keyring
from core.db import create_pool, migrate
from core.failover import FailoverGuard
from core.keys import Keys
from core.ledger import Ledger
from core.settings import ConfigError, Settings

T = TypeVar("T")


class HiredisPackConnection(Connection):
    """redis-py's asyncio connection, packing commands with hiredis (C) instead of Python.

    redis-py uses hiredis only to parse replies on asyncio; packing a purchase's EVALSHA (16
    keys, 17 arguments) in Python costs about 30 us of the gateway's CPU, hiredis about 3 us.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # "SCRIPT LOAD": as redis-py does
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis doesn't pack: redis-py's encoder decides
            return list(super().pack_command(*args))


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""`FLASHGATE_REDIS_URL` schemes naming a Redis Cluster (a seed node; the rest is discovered)."""


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


_HOLDING_TURN: ContextVar[bool] = ContextVar("flashgate_redis_turn", default=False)


class BoundedRedisCluster(RedisCluster):
    """redis-py's asyncio cluster client, waiting for a free connection like the single-node
    client's BlockingConnectionPool.

    Its per-node pools don't wait: past `max_connections` a command fails at once with
    MaxConnectionsError, which a sale's opening second turns into 503s. Here at most
    `max_connections` commands or pipelines are in flight per client (each holds at most one
    connection per node), and one waits up to `wait_s` for its turn, then fails as the blocking
    pool does (ConnectionError). What runs inside a turn (a pipeline's retries) needs no other.
    """

    def __init__(self, *args: Any, wait_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._wait_s = wait_s

    async def _take_turn(self) -> None:
        if not self._turns.locked():
            await self._turns.acquire()
            return
        try:
            async with asyncio.timeout(self._wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None

    async def in_turn(self, run: Callable[[], Awaitable[T]]) -> T:
        if _HOLDING_TURN.get():
            return await run()
        await self._take_turn()
        token = _HOLDING_TURN.set(True)
        try:
            return await run()
        finally:
            _HOLDING_TURN.reset(token)
            self._turns.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.in_turn(
            lambda: super(BoundedRedisCluster, self).execute_command(*args, **kwargs)
        )

    def pipeline(
        self,
        transaction: Any | None = None,
        shard_hint: Any | None = None,
    ) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # its checks
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py's


class _BoundedPipeline(ClusterPipeline):
    cluster_client: BoundedRedisCluster

    async def execute(
        self,
        raise_on_error: bool = True,
        allow_redirections: bool = True,
    ) -> list[Any]:
        return await self.cluster_client.in_turn(
            lambda: super(_BoundedPipeline, self).execute(raise_on_error, allow_redirections)
        )


def redis_cluster_client(settings: Settings) -> BoundedRedisCluster:
    """The client of a `redis+cluster://` / `rediss+cluster://` URL. Every script's KEYS share
    their sale's slot (core/keys.py), so EVALSHA is routed by its first key; SCRIPT LOAD goes to
    every primary, so a NOSCRIPT on one node is survived by redis-py's AsyncScript."""
    scheme, _, rest = settings.redis_url.partition("://")
    kwargs: dict[str, Any] = dict(parse_url(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}"))
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    kwargs.update(
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,  # per node, and in flight per client
        health_check_interval=30,
        driver_info=None,
    )
    return BoundedRedisCluster(wait_s=settings.redis_timeout_s, **kwargs)


def redis_client(settings: Settings) -> Redis:
    """The process's Redis client. On a cluster URL (`redis+cluster://host:port`) a
    RedisCluster, which answers the same commands; typed as Redis so callers keep one type
    (what a cluster refuses, e.g. a MULTI over keys of several slots, fails at run time)."""
    if is_cluster_url(settings.redis_url):
        return cast(Redis, redis_cluster_client(settings))
    # A blocking pool: in a stampede, requests wait (bounded by the timeout) for a connection
    # instead of failing at once with "too many connections".
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        health_check_interval=30,
        connection_class=HiredisPackConnection,
        # No CLIENT SETINFO per new connection (redis-py also reads its package metadata for it).
        driver_info=None,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def script_pipeline(settings: Settings) -> AutoPipeline | None:
    """The scripts' auto-pipelined connections: on a single-node redis:// or rediss:// URL,
    unless FLASHGATE_REDIS_PIPELINE_CONNECTIONS is 0 (a cluster routes scripts by slot through
    redis-py's cluster client)."""
    if settings.redis_pipeline_connections == 0 or is_cluster_url(settings.redis_url):
        if settings.redis_wait_replicas:  # the WAIT rides on the auto-pipelined buffers
            raise ConfigError(
                "FLASHGATE_REDIS_WAIT_REPLICAS needs auto-pipelining on a "
                "single-node URL (FLASHGATE_REDIS_PIPELINE_CONNECTIONS > 0)"
            )
        return None
    if settings.redis_url.partition("://")[0].lower() not in ("redis", "rediss"):
        return None  # unix:// sockets: redis-py's pool
    return AutoPipeline.from_url(
        settings.redis_url,
        timeout_s=settings.redis_timeout_s,
        connections=settings.redis_pipeline_connections,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )


async def warm_up(redis: Redis, connections: int) -> None:
    """Open `connections` pool connections now, so a sale's opening second doesn't pay for
    connecting on the event loop while thousands of purchases wait behind it."""
    if isinstance(redis, RedisCluster):
        await _warm_up_cluster(redis, connections)
        return
    pool = redis.connection_pool
    # redis-py leaves these two untyped
    get_connection: Callable[[], Awaitable[Any]] = pool.get_connection
    conns = [await get_connection() for _ in range(connections)]
    try:
        await asyncio.gather(*(cast(Any, c).connect() for c in conns))
    finally:
        for c in conns:
            await pool.release(c)


async def _warm_up_cluster(cluster: RedisCluster, connections: int) -> None:
    """Discover the slots, then open `connections` connections to every primary."""
    await cluster.initialize()
    for node in cluster.get_primaries():
        conns = [node.acquire_connection() for _ in range(min(connections, node.max_connections))]
        try:
            await asyncio.gather(*(cast(Any, c).connect() for c in conns))
        finally:
            for c in conns:
                node.release(c)


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    pool: asyncpg.Pool
    keys: Keys
    ledger: Ledger
    keyring: Keyring
    pipe: AutoPipeline | None = None  # the scripts' multiplexed connections, if any
    # Pauses the sales after a Redis failover until merged (core/failover.py); its background
    # check runs only where started (gateway lifespan, workers), never in the CLI.
    failover: FailoverGuard | None = None

    @classmethod
    async def open(cls, settings: Settings, *, run_migrations: bool = True) -> Runtime:
        redis = redis_client(settings)
        pipe = script_pipeline(settings)
        pool = await create_pool(
            settings.database_url.reveal(), settings.db_pool_max, settings.db_timeout_s
        )
        try:
            if run_migrations:
                async with pool.acquire() as conn:
                    await migrate(conn)
            keys = Keys(settings.key_prefix)
            ledger = Ledger(redis, keys, pipe)
            await ledger.scripts.load(redis)
            await warm_up(
                redis, min(settings.redis_min_connections, settings.redis_max_connections)
            )
            if pipe is not None:
                await pipe.warm_up()
        except BaseException:
            await pool.close()
            await redis.aclose()
            if pipe is not None:
                await pipe.aclose()
            raise
        guard = FailoverGuard(redis, pool, ledger, settings.key_prefix)
        if pipe is not None:
            pipe.on_identity = guard.observe
        return cls(settings, redis, pool, keys, ledger, Keyring(settings.master_keys), pipe, guard)

    async def close(self) -> None:
        if self.failover is not None:
            await self.failover.stop()
        await self.pool.close()
        await self.redis.aclose()
        if self.pipe is not None:
            await self.pipe.aclose()
