"""Refunds: stock back before delivery, keys voided after it, exactly once whatever races it.

The state machine (Redis order status; PostgreSQL follows):

    reserved  --refund-->  refunded   settled in Redis at once (lua/refund.lua): no key can be
                                      allocated to a reserved order, so its units come back,
                                      exactly once, as for a cancel; a worker copies the
                                      `refunded` event to PostgreSQL and enqueues the webhook.
    confirmed --refund--> confirmed + `rf` (requested) --settle (PG)--finish (Redis)--> refunded
    delivered --refund--> delivered + `rf`             --settle (PG)--finish (Redis)--> refunded

A confirmed order may be in a worker's hands: the worker commits its keys in PostgreSQL, then
deliver.lua marks it delivered in Redis, then acks. So PostgreSQL decides, under the order's row
lock (`settle`), which the worker's batch transaction also holds while it allocates:

- the order holds no key (the worker has not committed, or never will): it becomes `refunded`
  with outcome `returned`; a worker that reaches it later finds it refunded and allocates
  nothing (keys go only to `confirmed` rows);
- the order holds keys (the worker committed first): they are voided in the same transaction
  (`card_keys.voided_at`; they keep their order id, so they are never free again, and are
  never revealed), outcome `voided`.

Then refund_finish.lua applies the outcome to the ledger once (the status flips to `refunded` in
the script that moves the units): `returned` puts the units back in `available`, `voided` moves
them to `voided`, never sold again. An order Redis already shows delivered always goes to
`voided`. A refund request is durable from its first step: refund.lua adds a `refund` event to
the sale's stream, and a worker that reads it runs `settle` and `finish` itself (both
idempotent), so a gateway dying between the steps leaves nothing half-done.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from core.ids import sale_of_order
from core.ledger import from_ms, now_ms
from core.scripts import ReturnCode
from core.webhook_events import REFUNDED_EVENT, OrderRefundedHook

if TYPE_CHECKING:
    from core.runtime import Runtime

RETURNED, VOIDED = "returned", "voided"


_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class RefundTarget:
    """The order as Redis knows it: enough to write its row if no worker has yet."""

    order_id: str
    channel_id: str
    user_id: str
    quantity: int
    requested_at: datetime

    @property
    def sale_id(self) -> str:
        return sale_of_order(self.order_id)


# -- SQL ------------------------------------------------------------------------------------
INSERT_REFUNDED = """
INSERT INTO orders (order_id, sale_id, channel_id, user_id, quantity, status, reserved_at,
                    ended_at, refunded_at, refund_outcome)
VALUES ($1, $2, $3, $4, $5, 'refunded', $6, $7, $7, 'returned')
ON CONFLICT (order_id) DO NOTHING
RETURNING order_id
"""

LOCK_ORDER = "SELECT status, refund_outcome FROM orders WHERE order_id = $1 FOR UPDATE"

LOCK_KEYS = "SELECT key_id FROM card_keys WHERE order_id = $1 ORDER BY key_id FOR UPDATE"

VOID_KEYS = """
WITH v AS (
    UPDATE card_keys SET voided_at = $2 WHERE order_id = $1 AND voided_at IS NULL
    RETURNING key_id
)
INSERT INTO key_events (key_id, order_id, event, actor, request_id, client_request_id, at)
SELECT key_id, $1, 'voided', $3, $4, $5, $2 FROM v
"""

MARK_REFUNDED = """
UPDATE orders SET status = 'refunded', refund_outcome = $2, refunded_at = $3,
                  ended_at = coalesce(ended_at, $3), updated_at = now()
WHERE order_id = $1
"""

ENQUEUE_REFUNDED = """
INSERT INTO webhook_outbox (channel_id, order_id, event, payload)
SELECT c.channel_id, w.order_id, $1, w.payload
FROM unnest($2::text[], $3::text[], $4::bytea[]) AS w(order_id, channel_id, payload)
JOIN channels c ON c.channel_id = w.channel_id AND c.webhook_url IS NOT NULL
ON CONFLICT (order_id, event) DO NOTHING
"""


class RefundConflict(RuntimeError):
    """PostgreSQL holds a final status Redis never gave a refundable order (cannot happen while
    PostgreSQL only follows Redis); nothing was changed."""


async def enqueue_refunded(
    conn: asyncpg.Connection,
    hooks: list[tuple[str, OrderRefundedHook]],
) -> None:
    """Outbox rows for (channel id, body) pairs; once per order (unique order_id, event)."""
    if hooks:
        await conn.execute(
            ENQUEUE_REFUNDED,
            REFUNDED_EVENT,
            [h.order_id for _, h in hooks],
            [ch for ch, _ in hooks],
            [_encode(h) for _, h in hooks],
        )


async def settle(
    conn: asyncpg.Connection,
    target: RefundTarget,
    now: datetime,
    *,
    actor: str,
    request_id: str | None = None,
    client_request_id: str | None = None,
) -> str:
    """Decide a requested refund in PostgreSQL, once: RETURNED or VOIDED (an order already
    refunded answers what was decided then). One transaction, under the order's row lock."""
    async with conn.transaction():
        if (
            await conn.fetchval(
                INSERT_REFUNDED,
                target.order_id,
                target.sale_id,
                target.channel_id,
                target.user_id,
                target.quantity,
                target.requested_at,
                now,
            )
            is not None
        ):
            # No worker had written the order: it holds no key, and none will be given to it.
            await enqueue_refunded(conn, [(target.channel_id, _hook(target, now, 0))])
            return RETURNED
        row = await conn.fetchrow(LOCK_ORDER, target.order_id)
        if row is None:  # the insert conflicted, and order rows are never deleted
            raise RefundConflict(f"order {target.order_id} vanished from PostgreSQL")
        if row["status"] == "refunded":
            return str(row["refund_outcome"] or RETURNED)
        if row["status"] not in ("reserved", "confirmed", "delivered"):
            raise RefundConflict(f"order {target.order_id} is {row['status']} in PostgreSQL")
        keys = await conn.fetch(LOCK_KEYS, target.order_id)
        outcome = VOIDED if keys else RETURNED
        if keys:
            await conn.execute(
                VOID_KEYS, target.order_id, now, actor, request_id, client_request_id
            )
        await conn.execute(MARK_REFUNDED, target.order_id, outcome, now)
        await enqueue_refunded(conn, [(target.channel_id, _hook(target, now, len(keys)))])
    return outcome


def _hook(target: RefundTarget, now: datetime, voided: int) -> OrderRefundedHook:
    return OrderRefundedHook(
        target.order_id, target.sale_id, target.user_id, target.quantity, now, voided
    )


async def refund_order(
    rt: Runtime,
    order_id: str,
    channel_id: str,
    *,
    actor: str,
    request_id: str | None = None,
    client_request_id: str | None = None,
    now: int | None = None,
) -> str:
    """The whole refund (the gateway's endpoint): request, settle, finish. Returns the status
    ("refunded"); raises NotFound / OrderNotRefundable from the ledger. Idempotent."""
    at = now_ms() if now is None else now
    req = await rt.ledger.request_refund(order_id, channel_id, at)
    if req.pending:
        target = RefundTarget(
            order_id, channel_id, req.user_id, req.quantity, from_ms(req.created_ms or at)
        )
        async with rt.pool.acquire() as conn:
            outcome = await settle(
                conn,
                target,
                from_ms(at),
                actor=actor,
                request_id=request_id,
                client_request_id=client_request_id,
            )
        code, _ = await rt.ledger.finish_refund(order_id, outcome, at)
        if code not in (ReturnCode.OK, ReturnCode.REPLAYED):
            raise RefundConflict(f"order {order_id}: refund_finish answered {code.name}")
    return "refunded"
