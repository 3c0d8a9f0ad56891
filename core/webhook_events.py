"""The webhook bodies, one msgspec Struct per event (docs/WEBHOOKS.md, the OpenAPI webhooks).

The outbox stores each body encoded once, at the moment the event happens; the worker signs
and sends those bytes as they are. None carries a card key: buyers reveal keys through the
API, never through a webhook.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

DELIVERED_EVENT = "order.delivered"
REFUNDED_EVENT = "order.refunded"


class OrderDelivered(msgspec.Struct, frozen=True):
    """`order.delivered`: the order's card keys are allocated; the buyer can reveal them."""

    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    delivered_at: datetime
    event: str = DELIVERED_EVENT


class OrderRefundedHook(msgspec.Struct, frozen=True):
    """`order.refunded`: the order was refunded; `keys_voided` of its keys were voided."""

    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    refunded_at: datetime
    keys_voided: int
    event: str = REFUNDED_EVENT


EVENTS: dict[str, type[msgspec.Struct]] = {
    DELIVERED_EVENT: OrderDelivered,
    REFUNDED_EVENT: OrderRefundedHook,
}
