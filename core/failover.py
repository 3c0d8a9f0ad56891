"""A Redis failover pauses the sales until Redis and PostgreSQL agree (#12).

Redis replicates asynchronously: a promoted replica can lack the last writes its primary
acknowledged, while the workers had already copied them to PostgreSQL (orders, payments, card
keys handed out). Selling on from the promoted ledger sells those units again and lets their
buyers buy past their limit. So every gateway and worker watches the identity of the Redis
primary it talks to (`master_replid` of `INFO replication`: a new one on every promotion and
every restart) and compares it with the identity last merged, recorded per deployment (its key
prefix) in PostgreSQL (`redis_epochs`, migration 0008):

- the auto-pipelined connections (core/autopipeline.py) read it when they (re)connect, before
  any purchase goes out on them: the purchase path pauses at once, with no extra round trip per
  purchase; a background task reads it again every CHECK_INTERVAL_S (redis-py's pools
  reconnect too, and another process may have merged);
- while they differ the process is *paused*: the storefront answers 503 `sale_not_ready`
  (Retry-After) for every sale (gateway/sale_guard.py);
- the merge (one process at a time: a PostgreSQL advisory lock per deployment; gateways and
  workers both try, so a pause never waits for a particular process) brings into Redis, for
  every active sale, the orders PostgreSQL holds that Redis lacks or holds at an earlier
  status (lua/merge_orders.lua: order hash, buyer count, stock counters, a confirmed order
  announced again so that the workers deliver it), restores the channels' API-key hashes,
  then records the new identity: every process resumes within CHECK_INTERVAL_S.

The merge does not need the streams drained first: PostgreSQL only moves an order towards the
state Redis already gave it (a worker persisting an event meanwhile changes nothing the merge
looks at), and the merge only touches orders where PostgreSQL is ahead. A plain restart of the
same Redis with its AOF (same data, new identity) finds nothing to merge: the pause lasts one
merge pass (milliseconds per thousand orders). A shard whose ledger is gone altogether is
left to `flashgate reconcile SALE` (core/reconcile.py's rebuild, which also restores the risk
state); that sale stays paused by the missing-ledger guard meanwhile.

First sight: a deployment with no recorded identity records the one it finds, without a merge
(nothing says it was ever different).
Lost for good on a lossy failover without WAIT: Idempotency-Keys of the orders the replica
lacked (PostgreSQL doesn't keep them: a client's retry is a new purchase, still bounded by the
restored per-user count), risk counters, and orders that reached neither the replica nor
PostgreSQL (FLASHGATE_REDIS_WAIT_REPLICAS, core/autopipeline.py, closes that gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from core import errors, metrics, reconcile
from core.ids import parse_order_id, shard_id
from core.keys import Keys
from core.ledger import Ledger, now_ms
from core.scripts import ReturnCode, source

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0  # how often a process reads the primary's identity in the background
MERGE_TIMEOUT_S = 120.0  # a merge past this gives up (stays paused, retried, alert fires)
MERGE_CHUNK = 500  # orders per merge_orders.lua call (one short script each)
PAUSED = (
    "Redis failed over to a new primary; the sale resumes once PostgreSQL's orders are "
    "merged into it (seconds)"
)

# PostgreSQL's status -> the Redis statuses it may legitimately go with (reconcile's: Redis
# leads, except deliveries and refunds, which PostgreSQL settles first), as JSON lists.
CONSISTENT: dict[str, list[str]] = {k: sorted(v) for k, v in reconcile.CONSISTENT.items()}

EPOCH = "SELECT identity FROM redis_epochs WHERE deployment = $1"
FIRST_SIGHT = """
INSERT INTO redis_epochs (deployment, identity) VALUES ($1, $2)
ON CONFLICT (deployment) DO NOTHING
"""
RECORD = """
INSERT INTO redis_epochs (deployment, identity, merged_at, orders_merged, merge_seconds)
VALUES ($1, $2, now(), $3, $4)
ON CONFLICT (deployment) DO UPDATE SET identity = EXCLUDED.identity, merged_at = now(),
    orders_merged = EXCLUDED.orders_merged, merge_seconds = EXCLUDED.merge_seconds
"""
LOCK = "SELECT pg_try_advisory_lock(hashtext($1))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext($1))"
SALE = "SELECT reservation_ttl_s, stock_buckets FROM sales WHERE sale_id = $1"
ORDERS = """
SELECT order_id, channel_id, user_id, quantity, status, payment_ref, reserved_at, confirmed_at,
       refund_outcome
FROM orders WHERE sale_id = $1 ORDER BY order_id
"""
CHANNELS = "SELECT channel_id, api_key_hash FROM channels"


def identity_of(info: dict[str, Any] | str) -> str:
    """The primary's identity from `INFO replication` (parsed by redis-py, or raw text)."""
    if isinstance(info, str):
        for line in info.splitlines():
            if line.startswith("master_replid:"):
                return line.split(":", 1)[1].strip()
        return ""
    return str(info.get("master_replid", ""))


@dataclass
class MergeResult:
    orders: int = 0  # orders brought back (missing, or at an earlier status)
    units: int = 0  # units the ledgers took for them
    missing: list[str] = field(default_factory=list)  # shards without a ledger (left alone)


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


async def merge_sale(
    ledger: Ledger, pool: asyncpg.Pool, sale_id: str, now: int | None = None
) -> MergeResult:
    """Bring into Redis the orders of one sale that PostgreSQL holds ahead of it."""
    now = now_ms() if now is None else now
    redis, keys = ledger.redis, ledger.keys
    result = MergeResult()
    async with pool.acquire() as conn:
        sale = await conn.fetchrow(SALE, sale_id)
        if sale is None:
            return result
        rows = await conn.fetch(ORDERS, sale_id)
    ttl_ms = int(sale["reservation_ttl_s"]) * 1000
    behind: dict[str, list[list[str]]] = defaultdict(list)
    for start in range(0, len(rows), 1000):
        chunk = rows[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for o in chunk:
                pipe.hget(keys.order(o["order_id"]), "status")
            live: list[Any] = await pipe.execute()
        for o, status in zip(chunk, live, strict=True):
            if status in CONSISTENT.get(o["status"], ()):
                continue
            created = _ms(o["reserved_at"])
            confirmed = _ms(o["confirmed_at"]) if o["confirmed_at"] is not None else created
            shard = shard_id(sale_id, parse_order_id(o["order_id"])[1])
            behind[shard].append(
                [
                    o["order_id"],
                    o["channel_id"],
                    o["user_id"],
                    str(o["quantity"]),
                    o["status"],
                    str(created),
                    str(created + ttl_ms),
                    o["payment_ref"] or "",
                    str(confirmed),
                    o["refund_outcome"] or "",
                ]
            )
    consistent = json.dumps(CONSISTENT)
    # Through redis-py, not the auto-pipeline: the gateway's pipeline refuses calls while paused.
    script = redis.register_script(source("merge_orders"))
    for shard, orders in behind.items():
        for start in range(0, len(orders), MERGE_CHUNK):
            part = orders[start : start + MERGE_CHUNK]
            code, merged, units = await script(
                keys=[
                    keys.sale(shard),
                    keys.buyers(shard),
                    keys.deadlines(shard),
                    keys.events(shard),
                    *(keys.order(o[0]) for o in part),
                ],
                args=[json.dumps(part), consistent, now],
            )
            if code == ReturnCode.NO_SALE:
                result.missing.append(shard)
                break
            result.orders += int(merged)
            result.units += int(units)
    return result


async def restore_channels(redis: Redis, keys: Keys, pool: asyncpg.Pool) -> None:
    """The hot path's channel credentials, from PostgreSQL (a channel created just before the
    failover may be missing on the new primary)."""
    rows = await pool.fetch(CHANNELS)
    if rows:
        await redis.hset(
            keys.channels(), mapping={bytes(r["api_key_hash"]).hex(): r["channel_id"] for r in rows}
        )


class FailoverGuard:
    """One per process (core.runtime.Runtime.failover): the pause flag the storefront reads,
    the identity check, and the merge."""

    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        ledger: Ledger,
        deployment: str,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self.redis, self.pool, self.ledger = redis, pool, ledger
        self.deployment = deployment
        self.interval_s = interval_s
        self.merged: str | None = None  # the identity PostgreSQL recorded (as last read)
        self.seen: str | None = None  # the identity Redis last answered with
        self.paused_since: float | None = None  # monotonic; None while selling
        self.last_pause_s = 0.0  # how long the last pause lasted (tests, logs)
        self.last_merge: MergeResult | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # set on a pause: check and merge now

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def gate(self) -> None:
        """The gateway's auto-pipeline gate (core/autopipeline.py): refuse a call while paused."""
        if self.paused_since is not None:
            raise errors.SaleNotReady(PAUSED)

    # -- the flag -----------------------------------------------------------------------------
    def observe(self, identity: str) -> None:
        """Redis answered with `identity` (a connection opened, or the periodic check): pause at
        once if it is not the one merged. Synchronous: the auto-pipelined connection calls it
        before any command of a caller goes out on it."""
        self.seen = identity
        if self.merged is not None and identity and identity != self.merged:
            self._pause()

    def _pause(self) -> None:
        if self.paused_since is None:
            self.paused_since = time.monotonic()
            metrics.FAILOVER_PAUSES.inc()
            metrics.FAILOVER_PAUSED.set(1)
            if self._wake is not None:
                self._wake.set()
            log.warning(
                "Redis primary changed (%s, merged: %s): sales paused until merged",
                self.seen,
                self.merged,
            )

    def _resume(self) -> None:
        if self.paused_since is not None:
            self.last_pause_s = time.monotonic() - self.paused_since
            self.paused_since = None
            metrics.FAILOVER_PAUSED.set(0)
            log.warning(
                "Redis primary %s merged: sales resumed after %.3f s",
                self.merged,
                self.last_pause_s,
            )

    # -- the check ----------------------------------------------------------------------------
    async def identity(self) -> str:
        return identity_of(await self.redis.info("replication"))

    async def check(self) -> bool:
        """Read the primary's identity (and PostgreSQL's record when they may differ); returns
        whether a merge is due."""
        identity = await self.identity()
        self.observe(identity)
        if identity == self.merged and not self.paused:
            return False
        recorded = await self.pool.fetchval(EPOCH, self.deployment)
        if recorded is None:  # first sight: nothing says Redis was ever another
            await self.pool.execute(FIRST_SIGHT, self.deployment, identity)
            recorded = await self.pool.fetchval(EPOCH, self.deployment)
        self.merged = str(recorded)
        if identity == self.merged:
            self._resume()
            return False
        self._pause()
        return True

    async def check_and_merge(self) -> bool:
        """One pass: check, and merge if due (unless another process holds the merge lock);
        returns whether this process is selling afterwards."""
        if await self.check():
            await self.merge()
        return not self.paused

    async def merge(self) -> MergeResult | None:
        """Merge every active sale into the current primary and record its identity, under the
        deployment's merge lock; None if another process holds it (it will record the epoch)."""
        name = f"flashgate:merge:{self.deployment}"
        async with self.pool.acquire() as conn:
            if not await conn.fetchval(LOCK, name):
                return None
            started = time.monotonic()
            try:
                async with asyncio.timeout(MERGE_TIMEOUT_S):
                    result = await self._merge_locked(conn)
            except BaseException:
                metrics.FAILOVER_MERGES.labels("failed").inc()
                raise
            finally:
                await conn.fetchval(UNLOCK, name)
        took = time.monotonic() - started
        metrics.FAILOVER_MERGE_DURATION.observe(took)
        if result is None:  # merged meanwhile by another process
            return None
        metrics.FAILOVER_MERGES.labels("merged").inc()
        metrics.FAILOVER_ORDERS_MERGED.inc(result.orders)
        self.last_merge = result
        log.warning(
            "Redis failover merge: %d orders (%d units) brought back in %.3f s%s",
            result.orders,
            result.units,
            took,
            f"; ledgers missing: {result.missing}" if result.missing else "",
        )
        return result

    async def _merge_locked(self, conn: asyncpg.Connection) -> MergeResult | None:
        identity = await self.identity()
        recorded = await conn.fetchval(EPOCH, self.deployment)
        if recorded == identity:
            self.merged = identity
            self._resume()
            return None
        started = time.monotonic()
        total = MergeResult()
        await restore_channels(self.redis, self.ledger.keys, self.pool)
        sales = sorted(str(s) for s in await self.redis.smembers(self.ledger.keys.active_sales()))
        for sale_id in sales:
            one = await merge_sale(self.ledger, self.pool, sale_id)
            total.orders += one.orders
            total.units += one.units
            total.missing += one.missing
        if await self.identity() != identity:  # failed over again meanwhile: merge again
            return total
        await conn.execute(
            RECORD, self.deployment, identity, total.orders, time.monotonic() - started
        )
        self.merged = identity
        self.seen = identity
        self._resume()
        return total

    # -- the background task -------------------------------------------------------------------
    async def start(self) -> None:
        """Check now (a process started after a failover starts paused; its start-up does not
        wait for the merge), then every interval_s in the background, merging when due."""
        due = False
        with contextlib.suppress(Exception):
            due = await self.check()
        if self._task is None:
            self._wake = asyncio.Event()
            if due:
                self._wake.set()
            self._task = asyncio.create_task(self._watch(self._wake), name="failover-guard")

    async def _watch(self, wake: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # every interval_s, at once on a pause
                await asyncio.wait_for(wake.wait(), self.interval_s)
            wake.clear()
            try:
                if not await self.check_and_merge():  # another process merges: look again soon
                    await asyncio.sleep(0.1)
                    wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or PostgreSQL away, or a dead pooled connection
                log.warning("failover check failed: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(0.1)  # soon again (the pool drops one dead connection
                wake.set()  # per failure), at most 10 times a second

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
