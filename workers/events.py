"""Order events as the workers see them: stream entries decoded, checked, and folded per order.

The Lua scripts write each event as a flat stream entry (see lua/reserve.lua, confirm.lua and
includes/release.lua): t, o, ch, u, q, at, and for reserved/confirmed also exp and pay.
`refund` (lua/refund.lua) is a request, not a status: the consumer settles it (core/refunds.py)
after its batch; `refunded` is a reserved order refunded in Redis (its stock already back).
Anything else is malformed and goes to the dead-letter stream, never into PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from core.ids import parse_order_id
from core.ledger import from_ms

REFUND_REQUESTED = "refund"
EVENT_TYPES = frozenset(
    {"reserved", "confirmed", "cancelled", "expired", "refunded", REFUND_REQUESTED}
)
MAX_QUANTITY = 1_000_000

# The only moves an order makes; anything else (a replay, a reclaimed older event) is ignored.
_FORWARD: dict[str, frozenset[str]] = {
    "reserved": frozenset({"confirmed", "cancelled", "expired", "refunded"}),
    "confirmed": frozenset({"delivered"}),
}


def advance(current: str, new: str) -> str:
    """The status after `new` is seen on an order in `current`: forward only, never back."""
    return new if new in _FORWARD.get(current, ()) else current


class MalformedEvent(ValueError):
    """A stream entry that can't be an order event of this sale; the message is the reason."""


@dataclass(frozen=True, slots=True)
class OrderEvent:
    entry_id: str
    type: str
    order_id: str
    channel_id: str
    user_id: str
    quantity: int
    at_ms: int
    payment_ref: str


def _int_field(fields: dict[str, str], name: str) -> int:
    try:
        return int(fields[name])
    except KeyError:
        raise MalformedEvent(f"missing field {name!r}") from None
    except ValueError:
        raise MalformedEvent(f"field {name!r} is not an integer") from None


def parse_event(sale_id: str, entry_id: str, fields: dict[str, str]) -> OrderEvent:
    """Decode one entry of `sale_id`'s stream; MalformedEvent says why it isn't an order event."""
    kind = fields.get("t")
    if kind not in EVENT_TYPES:
        raise MalformedEvent("unknown event type")
    order_id = fields.get("o", "")
    try:
        order_sale, _bucket = parse_order_id(order_id)
    except ValueError:
        raise MalformedEvent("not an order id") from None
    if order_sale != sale_id:
        raise MalformedEvent("order belongs to another sale")
    channel_id, user_id = fields.get("ch", ""), fields.get("u", "")
    if not channel_id or not user_id:
        raise MalformedEvent("missing channel or user")
    quantity = _int_field(fields, "q")
    if not 0 < quantity <= MAX_QUANTITY:
        raise MalformedEvent("quantity out of range")
    at_ms = _int_field(fields, "at")
    if at_ms <= 0:
        raise MalformedEvent("event time out of range")
    return OrderEvent(
        entry_id, kind, order_id, channel_id, user_id, quantity, at_ms, fields.get("pay", "")
    )


@dataclass(slots=True)
class OrderRow:
    """What a batch knows about one order, ready for the upsert."""

    order_id: str
    channel_id: str
    user_id: str
    quantity: int
    status: str
    payment_ref: str | None
    reserved_at: datetime
    confirmed_at: datetime | None = None
    ended_at: datetime | None = None


def fold(events: list[OrderEvent]) -> dict[str, OrderRow]:
    """One row per order (an upsert can't touch a row twice), applying events in stream order.

    An order first seen through a later event (confirmed without reserved, e.g. reserve with a
    payment ref, or a reclaimed entry) still gets a row: reserved_at is that event's time.
    """
    rows: dict[str, OrderRow] = {}
    for ev in events:
        if ev.type == REFUND_REQUESTED:
            continue  # settled after the batch (core/refunds.py), never a status here
        at = from_ms(ev.at_ms)
        row = rows.get(ev.order_id)
        if row is None:
            row = rows[ev.order_id] = OrderRow(
                ev.order_id,
                ev.channel_id,
                ev.user_id,
                ev.quantity,
                ev.type,
                ev.payment_ref or None,
                at,
            )
        else:
            row.reserved_at = min(row.reserved_at, at)
            if advance(row.status, ev.type) != ev.type:
                continue  # an older event (e.g. reclaimed); the order already moved on
            row.status = ev.type
            row.payment_ref = ev.payment_ref or row.payment_ref
        if ev.type == "confirmed":
            row.confirmed_at = row.confirmed_at or at
        elif ev.type in ("cancelled", "expired", "refunded"):
            row.ended_at = row.ended_at or at
    return rows
