"""Reconciliation: the Redis ledger against PostgreSQL's record and the card keys.

`check()` compares one sale's Redis ledger (summed over its stock buckets) with PostgreSQL
(orders by status, card keys imported and allocated) and returns a report whose `drift` maps
each kind of disagreement to a number of units (or orders); every value must be 0:

- `missing_ledger`: PostgreSQL knows the sale, Redis has no ledger for it (Redis lost its
  data): the sale is paused (purchases answer 503 `sale_not_ready`) until `rebuild()`;
- `ledger_balance`: total != available + reserved + confirmed + delivered + voided, or
  available < 0 (`voided`: units whose keys a refund voided, core/refunds.py);
- `stock_total`: Redis's total != the keys imported in PostgreSQL (an import whose stock step
  never ran, or stock that no key backs);
- `oversold`: units held by live orders beyond the keys (in PostgreSQL, or in Redis);
- `keys`: keys allocated wrongly: a delivered order without exactly its quantity of live
  keys, a key held by an order that is not delivered (unless voided by its refund), a voided
  key on an order that was not refunded, or a key held by an order of another sale;
- `voided` (quiescent): Redis's voided units != the voided keys in PostgreSQL;
- `delivered_ahead`: units Redis calls delivered beyond PostgreSQL's (PostgreSQL commits the
  keys first, so Redis is never ahead);
- `postgres_ahead` (valid mid-stream): PostgreSQL only ever learns an order, a payment or a
  refund from Redis' events, so it never holds more units than Redis, in all orders or in paid
  ones (confirmed + delivered + refunded). More means Redis lost acknowledged writes: a
  failover to a replica that missed them, or a restore from an old snapshot. Units, plus (with
  `orders=True`) `postgres_ahead_orders`: orders PostgreSQL has that Redis lacks or holds at
  an earlier status (PostgreSQL's own legitimate leads excepted: delivered or refunded before
  Redis hears it, since the keys and the refund settle in PostgreSQL first). Never excused by
  the streams being busy: it is what a replica's promotion leaves, and it pages at once;
- once the sale's streams are quiescent (every event read and acked, and nothing new during
  the check), `orders`: units per status that differ between Redis and PostgreSQL, and
  `order_status` (with `orders=True`): orders whose status differs. While events are in
  flight PostgreSQL lags Redis by design, so those two are not compared.

`rebuild()` recreates a lost ledger from PostgreSQL (lua/restore_sale.lua, which refuses to
touch a ledger that exists, so it never adds stock twice): window and limits, the stock total
from the imported keys, every order with its status (open reservations with their deadlines,
confirmed orders announced again on the stream so the workers deliver them), and the buyers'
counts. Lost for good: the Idempotency-Keys (a retry after the rebuild is a new purchase,
still bounded by the per-user limit), the risk counters, and orders whose events had not
reached PostgreSQL when Redis lost its data (docs/OPERATIONS.md, "Redis persistence").
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from core.ids import parse_order_id, shard_id
from core.keys import WORKER_GROUP, Keys
from core.ledger import STOCK_FIELDS, Ledger, now_ms
from core.scripts import ReturnCode

LIVE = ("reserved", "confirmed", "delivered")
PAID = ("confirmed", "delivered", "refunded")
# PostgreSQL's status -> the Redis statuses that may go with it at any moment (Redis leads,
# except for delivery and a paid order's refund, which PostgreSQL settles first).
CONSISTENT = {
    "reserved": {"reserved", "confirmed", "delivered", "cancelled", "expired", "refunded"},
    "confirmed": {"confirmed", "delivered", "refunded"},
    "delivered": {"confirmed", "delivered", "refunded"},
    "refunded": {"refunded", "confirmed", "delivered"},
    "cancelled": {"cancelled"},
    "expired": {"expired"},
}
STATUSES = (*LIVE, "cancelled", "expired", "refunded")
CURRENT_SALES_LIMIT = 20  # sales checked by the periodic job (and their gauge's label values)

SALE_ROW = """
SELECT sale_id, starts_at, ends_at, per_user_limit, reservation_ttl_s, stock_buckets
FROM sales WHERE sale_id = $1
"""
KEYS_BY_IMPORT = """
SELECT import_id, count(*) AS n FROM card_keys WHERE sale_id = $1 GROUP BY import_id
"""
UNITS_BY_STATUS = """
SELECT status, sum(quantity)::bigint AS units FROM orders WHERE sale_id = $1 GROUP BY status
"""
BAD_KEYS = """
SELECT (SELECT count(*) FROM orders o
        WHERE o.sale_id = $1 AND o.status = 'delivered'
          AND o.quantity <> (SELECT count(*) FROM card_keys k
                             WHERE k.order_id = o.order_id AND k.voided_at IS NULL))
     + (SELECT count(*) FROM card_keys k JOIN orders o ON o.order_id = k.order_id
        WHERE k.sale_id = $1 AND (o.sale_id <> k.sale_id
          OR (k.voided_at IS NULL AND o.status <> 'delivered')
          OR (k.voided_at IS NOT NULL AND o.status <> 'refunded')))
     + (SELECT count(*) FROM card_keys k
        WHERE k.sale_id = $1 AND k.order_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = k.order_id))
"""
ALLOCATED = "SELECT count(*) FROM card_keys WHERE sale_id = $1 AND order_id IS NOT NULL"
VOIDED = "SELECT count(*) FROM card_keys WHERE sale_id = $1 AND voided_at IS NOT NULL"
ORDERS = """
SELECT order_id, channel_id, user_id, quantity, status, payment_ref, reserved_at, confirmed_at,
       refund_outcome
FROM orders WHERE sale_id = $1 ORDER BY order_id
"""
ORDER_STATUSES = "SELECT order_id, status FROM orders WHERE sale_id = $1"
CURRENT_SALES = f"""
SELECT sale_id FROM sales
WHERE starts_at <= now() + interval '1 hour' AND ends_at >= now() - interval '1 hour'
ORDER BY starts_at DESC, sale_id LIMIT {CURRENT_SALES_LIMIT}
"""
MARK_STOCKED = """
UPDATE key_imports SET stocked_at = now()
WHERE sale_id = $1 AND import_id = ANY($2::bigint[]) AND stocked_at IS NULL
"""


class ReconcileError(Exception):
    """The sale can't be reconciled (unknown to PostgreSQL); the message says why."""


@dataclass
class Report:
    sale_id: str
    quiescent: bool
    redis: dict[str, int] | None
    postgres: dict[str, Any]
    drift: dict[str, int] = field(default_factory=dict)
    rebuilt: bool = False
    merged: int = 0  # orders a write-mode reconcile brought back from PostgreSQL

    @property
    def ok(self) -> bool:
        return not any(self.drift.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sale_id": self.sale_id,
            "ok": self.ok,
            "rebuilt": self.rebuilt,
            "merged": self.merged,
            "quiescent": self.quiescent,
            "drift": self.drift,
            "redis": self.redis,
            "postgres": self.postgres,
        }


def _ms(value: Any) -> int:
    return int(value.timestamp() * 1000)


async def current_sales(pool: asyncpg.Pool) -> list[str]:
    """The sales the periodic job checks: open now or within an hour of their window, at most
    CURRENT_SALES_LIMIT, latest first (bounded label values for the drift gauge)."""
    return [r[0] for r in await pool.fetch(CURRENT_SALES)]


async def _stream_state(redis: Redis, keys: Keys, shards: list[str]) -> tuple[bool, list[str]]:
    """(every stream fully read and acked, each stream's last entry id)."""
    settled, last = True, []
    for shard in shards:
        stream = keys.events(shard)
        if not await redis.exists(stream):
            last.append("")
            continue
        info = await redis.xinfo_stream(stream)
        last.append(str(info.get("last-generated-id", "")))
        groups = [g for g in await redis.xinfo_groups(stream) if g.get("name") == WORKER_GROUP]
        if int(info.get("length", 0)) and not groups:
            settled = False
        for g in groups:
            if int(g.get("pending") or 0) or g.get("lag") is None or int(g["lag"]):
                settled = False
    return settled, last


async def _ledger(
    redis: Redis,
    keys: Keys,
    sale_id: str,
    buckets: int,
) -> tuple[dict[str, int] | None, int]:
    """The sale's Redis ledger summed over its buckets, with `balance` (the per-bucket drift
    summed, so a negative bucket can't hide behind a positive one), or None if no bucket has
    one; and how many buckets have none."""
    out: dict[str, int] = dict.fromkeys((*STOCK_FIELDS, "balance"), 0)
    missing = 0
    for b in range(buckets):
        values = await redis.hmget(keys.sale(shard_id(sale_id, b)), ["start", *STOCK_FIELDS])
        if values[0] is None:
            missing += 1
            continue
        row = {f: int(v or 0) for f, v in zip(STOCK_FIELDS, values[1:], strict=True)}
        held = sum(row[f] for f in ("available", "reserved", "confirmed", "delivered", "voided"))
        out["balance"] += abs(row["total"] - held) + max(0, -row["available"])
        for f in STOCK_FIELDS:
            out[f] += row[f]
    return (out if missing < buckets else None), missing


async def check(
    redis: Redis, keys: Keys, pool: asyncpg.Pool, sale_id: str, *, orders: bool = True
) -> Report:
    """Compare one sale's Redis ledger with PostgreSQL (read-only)."""
    async with pool.acquire() as conn:
        sale = await conn.fetchrow(SALE_ROW, sale_id)
        if sale is None:
            raise ReconcileError(f"sale {sale_id!r} is unknown to PostgreSQL")
        buckets = int(sale["stock_buckets"])
        shards = [shard_id(sale_id, b) for b in range(buckets)]
        settled, last = await _stream_state(redis, keys, shards)
        key_rows = await conn.fetch(KEYS_BY_IMPORT, sale_id)
        units = {r["status"]: int(r["units"]) for r in await conn.fetch(UNITS_BY_STATUS, sale_id)}
        bad_keys = int(await conn.fetchval(BAD_KEYS, sale_id))
        allocated = int(await conn.fetchval(ALLOCATED, sale_id))
        voided = int(await conn.fetchval(VOIDED, sale_id))
        statuses = {r[0]: r[1] for r in await conn.fetch(ORDER_STATUSES, sale_id)} if orders else {}
    ledger, missing = await _ledger(redis, keys, sale_id, buckets)
    settled_after, last_after = await _stream_state(redis, keys, shards)
    quiescent = settled and settled_after and last == last_after

    keys_total = sum(int(r["n"]) for r in key_rows)
    pg_live = sum(units.get(s, 0) for s in LIVE)
    postgres = {
        "keys": keys_total,
        "keys_allocated": allocated,
        "keys_voided": voided,
        "units": {s: units.get(s, 0) for s in STATUSES},
        "buckets": buckets,
    }
    report = Report(sale_id, quiescent, ledger, postgres)
    d = report.drift
    d["missing_ledger"] = missing  # ledgers (stock buckets) PostgreSQL expects, Redis lacks
    d["oversold"] = max(0, pg_live + voided - keys_total)  # voided keys are never sold again
    d["keys"] = bad_keys
    if ledger is None:
        return report
    d["ledger_balance"] = ledger["balance"]
    d["stock_total"] = abs(ledger["total"] - keys_total)
    d["oversold"] += max(
        0,
        ledger["reserved"]
        + ledger["confirmed"]
        + ledger["delivered"]
        + ledger["voided"]
        - keys_total,
    )
    d["delivered_ahead"] = max(0, ledger["delivered"] - units.get("delivered", 0))
    d["postgres_ahead"] = max(
        0, sum(units.get(s, 0) for s in PAID) - sum(ledger[s] for s in PAID)
    ) + max(0, sum(units.get(s, 0) for s in STATUSES) - sum(ledger[s] for s in STATUSES))
    if orders:
        live = await _redis_statuses(redis, keys, list(statuses))
        d["postgres_ahead_orders"] = sum(
            1 for order_id, s in live.items() if s not in CONSISTENT.get(statuses[order_id], ())
        )
    if quiescent:
        d["orders"] = sum(abs(ledger[s] - units.get(s, 0)) for s in STATUSES)
        d["voided"] = abs(ledger["voided"] - voided)
        if orders:
            d["order_status"] = sum(1 for order_id, s in live.items() if s != statuses[order_id])
    return report


async def _redis_statuses(redis: Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    """Each order's status in Redis (None: Redis has no such order), 1,000 a round trip."""
    out: dict[str, str | None] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for order_id in chunk:
                pipe.hget(keys.order(order_id), "status")
            out.update(zip(chunk, await pipe.execute(), strict=True))
    return out


# -- rebuild ----------------------------------------------------------------------------------
def _plan_shard(
    sale: asyncpg.Record,
    bucket: int,
    buckets: int,
    orders: list[asyncpg.Record],
    imports: list[str],
    available: int,
    now: int,
) -> tuple[dict[str, Any], list[str]]:
    """restore_sale.lua's document for one shard, and its orders' ids (KEYS order)."""
    ttl_ms = int(sale["reservation_ttl_s"]) * 1000
    counters = dict.fromkeys(STOCK_FIELDS, 0)
    buyers: dict[str, int] = defaultdict(int)
    rows: list[list[str]] = []
    for o in orders:
        status, qty = o["status"], int(o["quantity"])
        counters[status] += qty
        if status == "refunded" and o["refund_outcome"] == "voided":
            counters["voided"] += qty  # its keys are gone: never back in `available`
        if status in LIVE:
            buyers[f"{o['channel_id']}:{o['user_id']}"] += qty  # per channel, as reserve_order
        created = _ms(o["reserved_at"])
        confirmed_at = _ms(o["confirmed_at"]) if o["confirmed_at"] is not None else created
        rows.append(
            [
                o["order_id"],
                o["channel_id"],
                o["user_id"],
                str(qty),
                status,
                str(created),
                str(created + ttl_ms),
                o["payment_ref"] or "",
                str(confirmed_at),
            ]
        )
    held = counters["reserved"] + counters["confirmed"] + counters["delivered"]
    counters["available"] = available
    counters["total"] = held + counters["voided"] + available
    fields: dict[str, str | int] = {
        "start": _ms(sale["starts_at"]),
        "end": _ms(sale["ends_at"]),
        "limit": sale["per_user_limit"],
        "ttl": ttl_ms,
        "state": "open",
        "restocks": 1,
        "reconciled_at": now,
        **counters,
    }
    if buckets > 1:
        fields.update(buckets=buckets, bucket=bucket, transit=0)
    doc = {
        "sale": [str(x) for kv in fields.items() for x in kv],
        "imports": imports,
        "buyers": [str(x) for kv in buyers.items() for x in kv],
        "orders": rows,
    }
    return doc, [r[0] for r in rows]


async def rebuild(
    ledger: Ledger, pool: asyncpg.Pool, sale_id: str, now: int | None = None
) -> dict[str, int]:
    """Recreate a sale's lost Redis ledger from PostgreSQL; returns per shard the orders
    restored, or -1 for a shard whose ledger exists (left untouched). Also restores the
    channels' API-key hashes (the hot path's credentials live in Redis)."""
    now = now_ms() if now is None else now
    redis, keys = ledger.redis, ledger.keys
    async with pool.acquire() as conn:
        sale = await conn.fetchrow(SALE_ROW, sale_id)
        if sale is None:
            raise ReconcileError(f"sale {sale_id!r} is unknown to PostgreSQL")
        key_rows = await conn.fetch(KEYS_BY_IMPORT, sale_id)
        orders = await conn.fetch(ORDERS, sale_id)
        channels = await conn.fetch("SELECT channel_id, api_key_hash FROM channels")
    if channels:
        await redis.hset(
            keys.channels(),
            mapping={bytes(c["api_key_hash"]).hex(): c["channel_id"] for c in channels},
        )
    buckets = int(sale["stock_buckets"])
    imports = [str(r["import_id"]) for r in key_rows]
    keys_total = sum(int(r["n"]) for r in key_rows)
    by_bucket: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for o in orders:
        by_bucket[parse_order_id(o["order_id"])[1]].append(o)
    held = sum(
        int(o["quantity"])
        for o in orders
        if o["status"] in LIVE or (o["status"] == "refunded" and o["refund_outcome"] == "voided")
    )
    base, extra = divmod(max(0, keys_total - held), buckets)
    done: dict[str, int] = {}
    for b in reversed(range(buckets)):  # bucket 0 last: buyers routed by it find the others
        shard = shard_id(sale_id, b)
        doc, ids = _plan_shard(
            sale, b, buckets, by_bucket[b], imports, base + (1 if b < extra else 0), now
        )
        code, restored = await ledger.scripts.restore_sale(
            keys=[
                keys.sale(shard),
                keys.buyers(shard),
                keys.deadlines(shard),
                keys.events(shard),
                keys.imports(shard),
                *(keys.order(i) for i in ids),
            ],
            args=[json.dumps(doc), now],
        )
        done[shard] = int(restored) if code == ReturnCode.OK else -1
    ledger.buckets.learn(sale_id, buckets)
    await redis.sadd(keys.active_sales(), sale_id)
    if all(n >= 0 for n in done.values()):  # the imports are now in every bucket's stock
        await pool.execute(MARK_STOCKED, sale_id, [int(i) for i in imports])
    return done


async def reconcile(ledger: Ledger, pool: asyncpg.Pool, sale_id: str, *, write: bool) -> Report:
    """`flashgate reconcile`: check; with `write`, rebuild a missing ledger first (an
    existing one is never rebuilt), or, where PostgreSQL leads Redis (a lossy failover),
    merge its orders into Redis as the automatic failover merge does (core/failover.py),
    then report on the result."""
    from core.failover import merge_sale  # core.failover builds on this module

    report = await check(ledger.redis, ledger.keys, pool, sale_id)
    if write and report.drift.get("missing_ledger"):
        await rebuild(ledger, pool, sale_id)
        report = await check(ledger.redis, ledger.keys, pool, sale_id)
        report.rebuilt = True
    elif write and (
        report.drift.get("postgres_ahead") or report.drift.get("postgres_ahead_orders")
    ):
        merged = await merge_sale(ledger, pool, sale_id)
        report = await check(ledger.redis, ledger.keys, pool, sale_id)
        report.merged = merged.orders
    return report
