"""One PostgreSQL transaction per batch: order rows, card-key allocation, webhook outbox.

Every statement is idempotent, so a batch replayed after a crash (committed, not acked)
changes nothing:
- orders are upserted and only ever move forward (reserved -> confirmed -> delivered;
  reserved -> expired | cancelled | refunded), so a reclaimed or out-of-order event is
  harmless; a refunded row never moves again (refunds of confirmed orders: core/refunds.py);
- keys go only to confirmed orders that hold none, taken with FOR UPDATE SKIP LOCKED, so two
  workers never hand out the same key and a replay allocates nothing;
- an order is served whole or not at all: short of keys, it stays confirmed and is retried;
- each key's allocation and delivery is logged in key_events in the same transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import msgspec

from core.refunds import enqueue_refunded
from core.webhook_events import DELIVERED_EVENT, OrderDelivered, OrderRefundedHook
from workers.events import OrderRow

log = logging.getLogger(__name__)

UNKNOWN_SALE = "unknown sale"
UNKNOWN_CHANNEL = "unknown channel"


_encode = msgspec.json.Encoder().encode


@dataclass
class BatchOutcome:
    delivered: list[str] = field(default_factory=list)  # delivered in PG, now or earlier
    short: list[str] = field(default_factory=list)  # confirmed, not enough free keys yet
    rejected: dict[str, str] = field(default_factory=dict)  # order id -> dead-letter reason
    keys_allocated: int = 0


# -- SQL ------------------------------------------------------------------------------------
UPSERT_ORDERS = """
INSERT INTO orders AS o (order_id, sale_id, channel_id, user_id, quantity, status, payment_ref,
                         reserved_at, confirmed_at, ended_at)
SELECT r.order_id, $1, r.channel_id, r.user_id, r.quantity, r.status, r.payment_ref,
       r.reserved_at, r.confirmed_at, r.ended_at
FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[],
            $8::timestamptz[], $9::timestamptz[], $10::timestamptz[])
     AS r(order_id, channel_id, user_id, quantity, status, payment_ref,
          reserved_at, confirmed_at, ended_at)
ON CONFLICT (order_id) DO UPDATE SET
    status       = CASE WHEN o.status = 'reserved' THEN EXCLUDED.status ELSE o.status END,
    payment_ref  = CASE WHEN o.status = 'reserved'
                        THEN coalesce(EXCLUDED.payment_ref, o.payment_ref) ELSE o.payment_ref END,
    confirmed_at = CASE WHEN o.status = 'reserved'
                        THEN EXCLUDED.confirmed_at ELSE o.confirmed_at END,
    ended_at     = CASE WHEN o.status = 'reserved' THEN EXCLUDED.ended_at ELSE o.ended_at END,
    reserved_at  = least(o.reserved_at, EXCLUDED.reserved_at),
    updated_at   = now()
WHERE (o.status = 'reserved' AND EXCLUDED.status <> 'reserved')
   OR o.reserved_at > EXCLUDED.reserved_at
"""

# Allocation runs in three plain statements rather than one clever CTE: the pairing of keys
# to orders is done in Python, so the plan can't degrade into a slot-by-slot nested loop when
# the planner's statistics are stale (a fresh sale is exactly that case).
NEEDING_KEYS = """
SELECT o.order_id, o.quantity FROM orders o
WHERE o.order_id = ANY($1::text[]) AND o.status = 'confirmed'
  AND NOT EXISTS (SELECT 1 FROM card_keys k WHERE k.order_id = o.order_id)
ORDER BY o.order_id
"""

LOCK_FREE_KEYS = """
SELECT key_id FROM card_keys
WHERE sale_id = $1 AND order_id IS NULL
ORDER BY key_id
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

ASSIGN_KEYS = """
WITH a AS (
    UPDATE card_keys k SET order_id = a.order_id, allocated_at = $3
    FROM unnest($1::bigint[], $2::text[]) AS a(key_id, order_id)
    WHERE k.key_id = a.key_id AND k.order_id IS NULL
    RETURNING k.key_id, k.order_id
)
INSERT INTO key_events (key_id, order_id, event, actor, at)
SELECT key_id, order_id, 'allocated', $4, $3 FROM a
"""

# The keys this transaction just allocated, of the orders it marked delivered: from the
# allocation's own lists, not a second scan of card_keys (that scan cost the workers ~1/6 of
# their rate in `make bench`).
LOG_DELIVERED_KEYS = """
INSERT INTO key_events (key_id, order_id, event, actor, at)
SELECT key_id, order_id, 'delivered', $4, $3
FROM unnest($1::bigint[], $2::text[]) AS d(key_id, order_id)
"""

# Reserved orders refunded in Redis (their stock is already back): outcome and webhook, once.
SETTLE_RESERVED_REFUNDS = """
UPDATE orders SET refund_outcome = 'returned', refunded_at = coalesce(ended_at, $2)
WHERE order_id = ANY($1::text[]) AND status = 'refunded' AND refund_outcome IS NULL
RETURNING order_id, channel_id, user_id, quantity, refunded_at
"""

MARK_DELIVERED = """
UPDATE orders SET status = 'delivered', delivered_at = $2, updated_at = now()
WHERE order_id = ANY($1::text[]) AND status = 'confirmed'
RETURNING order_id, channel_id, user_id, quantity
"""

ENQUEUE_WEBHOOKS = """
INSERT INTO webhook_outbox (channel_id, order_id, event, payload)
SELECT w.channel_id, w.order_id, $1, w.payload
FROM unnest($2::text[], $3::text[], $4::bytea[]) AS w(order_id, channel_id, payload)
JOIN channels c ON c.channel_id = w.channel_id AND c.webhook_url IS NOT NULL
ON CONFLICT (order_id, event) DO NOTHING
"""

DELIVERED_AMONG = """
SELECT order_id FROM orders WHERE order_id = ANY($1::text[]) AND status = 'delivered'
"""


# -- the transaction ------------------------------------------------------------------------
async def persist_batch(
    conn: asyncpg.Connection,
    sale_id: str,
    rows: list[OrderRow],
    now: datetime,
    actor: str = "worker",
) -> BatchOutcome:
    """Write one batch of one sale in one transaction; the caller acks only after this returns."""
    out = BatchOutcome()
    if not rows:
        return out
    async with conn.transaction():
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM sales WHERE sale_id = $1)", sale_id
        ):
            out.rejected = dict.fromkeys((r.order_id for r in rows), UNKNOWN_SALE)
            return out
        known = {
            rec[0]
            for rec in await conn.fetch(
                "SELECT channel_id FROM channels WHERE channel_id = ANY($1::text[])",
                list({r.channel_id for r in rows}),
            )
        }
        out.rejected = {r.order_id: UNKNOWN_CHANNEL for r in rows if r.channel_id not in known}
        # Sorted, so that two workers upserting overlapping batches lock rows in one order.
        rows = sorted((r for r in rows if r.channel_id in known), key=lambda r: r.order_id)
        if not rows:
            return out
        order_ids = [r.order_id for r in rows]
        await conn.execute(
            UPSERT_ORDERS,
            sale_id,
            order_ids,
            [r.channel_id for r in rows],
            [r.user_id for r in rows],
            [r.quantity for r in rows],
            [r.status for r in rows],
            [r.payment_ref for r in rows],
            [r.reserved_at for r in rows],
            [r.confirmed_at for r in rows],
            [r.ended_at for r in rows],
        )
        refunded = await conn.fetch(SETTLE_RESERVED_REFUNDS, order_ids, now)
        await enqueue_refunded(
            conn,
            [
                (
                    r["channel_id"],
                    OrderRefundedHook(
                        r["order_id"], sale_id, r["user_id"], r["quantity"], r["refunded_at"], 0
                    ),
                )
                for r in refunded
            ],
        )
        served, out.short, allocated = await _allocate(conn, sale_id, order_ids, now, actor)
        out.keys_allocated = len(allocated)
        if served:
            done = await conn.fetch(MARK_DELIVERED, served, now)
            marked = {d["order_id"] for d in done}
            pairs = [(k, o) for k, o in allocated if o in marked]
            await conn.execute(
                LOG_DELIVERED_KEYS, [k for k, _ in pairs], [o for _, o in pairs], now, actor
            )
            await conn.execute(
                ENQUEUE_WEBHOOKS,
                DELIVERED_EVENT,
                [d["order_id"] for d in done],
                [d["channel_id"] for d in done],
                [
                    _encode(
                        OrderDelivered(d["order_id"], sale_id, d["user_id"], d["quantity"], now)
                    )
                    for d in done
                ],
            )
        out.delivered = [rec[0] for rec in await conn.fetch(DELIVERED_AMONG, order_ids)]
    if out.short:
        # Ids and counts only: never a key, never a secret.
        log.warning(
            "sale %s: not enough free card keys for %d confirmed order(s), retrying later",
            sale_id,
            len(out.short),
        )
    return out


async def _allocate(
    conn: asyncpg.Connection,
    sale_id: str,
    order_ids: list[str],
    now: datetime,
    actor: str,
) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    """Give every confirmed, key-less order its keys, whole or not at all.

    Returns (orders served, orders left short, the (key id, order id) pairs allocated). The
    keys are locked with SKIP LOCKED, so a concurrent worker takes other keys, never these; the
    order rows are already locked by this transaction's upsert, so no one else serves them.
    """
    need = await conn.fetch(NEEDING_KEYS, order_ids)
    if not need:
        return [], [], []
    free: list[int] = [
        r[0] for r in await conn.fetch(LOCK_FREE_KEYS, sale_id, sum(r["quantity"] for r in need))
    ]
    key_ids: list[int] = []
    owners: list[str] = []
    served: list[str] = []
    short: list[str] = []
    for order_id, quantity in need:
        if len(free) - len(key_ids) < quantity:
            short.append(order_id)
            continue
        key_ids.extend(free[len(key_ids) : len(key_ids) + quantity])
        owners.extend([order_id] * quantity)
        served.append(order_id)
    if key_ids:
        status = await conn.execute(ASSIGN_KEYS, key_ids, owners, now, actor)
        if status != f"INSERT 0 {len(key_ids)}":  # can't happen while we hold the row locks
            raise RuntimeError(
                f"sale {sale_id}: key allocation touched {status}, expected {len(key_ids)}"
            )
    return served, short, list(zip(key_ids, owners, strict=True))
