"""Request and response bodies: one msgspec Struct each, one shared policy, codecs built once."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from core.ids import MAX_STOCK_BUCKETS, SALE_ID_PATTERN

# Patterns end in \Z, not $: msgspec matches with Python's re.search, where `$` also matches
# before a trailing newline ("u-1\n" would pass). gateway/openapi.py writes them with `$`.
# Ids that users pick: printable, no spaces or control characters, bounded.
Ident = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+\Z")]
# Names shown to people: no control characters (PostgreSQL text can't even hold NUL).
Text = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+\Z")]
SaleId = Annotated[str, Meta(pattern=SALE_ID_PATTERN.removesuffix("$") + r"\Z")]
Url = Annotated[str, Meta(max_length=2048, pattern=r"^https?://[^\s\x00-\x1f\x7f]+\Z")]
# Times the routes format themselves (rfc3339_ms): RFC 3339 strings, described as such.
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
# An order's status as the API shows it (core/reconcile.py STATUSES; the orders table's CHECK).
# A titled schema: gateway/openapi.py makes it one named enum (#/components/schemas/OrderStatus).
ORDER_STATUSES = ("reserved", "confirmed", "delivered", "cancelled", "expired", "refunded")
OrderStatus = Annotated[
    str, Meta(title="OrderStatus", extra_json_schema={"enum": list(ORDER_STATUSES)})
]


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Policy shared by every request body: unknown fields are an error, not silently dropped."""


class Out(msgspec.Struct, omit_defaults=True):
    """Policy shared by every response body."""


# -- storefront ---------------------------------------------------------------------------
class PurchaseBody(Body):
    user_id: Ident
    # Checked exactly by the route (risk.signals.parse_ip: 422 naming `$.client_ip`); the
    # schema says so for clients and schemathesis.
    client_ip: Annotated[
        str,
        Meta(
            min_length=2,
            max_length=45,
            extra_json_schema={"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
        ),
    ]
    device_id: Ident
    quantity: Annotated[int, Meta(ge=1, le=100)] = 1
    user_agent: Annotated[str, Meta(max_length=512)] | None = None
    payment_ref: Ident | None = None


class ConfirmBody(Body):
    payment_ref: Ident


class PurchaseOut(Out):
    order_id: str
    status: OrderStatus
    expires_at: Timestamp


class OrderStatusOut(Out):
    order_id: str
    status: OrderStatus


class OrderOut(Out):
    order_id: str
    sale_id: str
    user_id: str
    quantity: int
    status: OrderStatus
    expires_at: Timestamp | None = None
    card_keys: list[str] | None = None


# -- admin --------------------------------------------------------------------------------
class ChannelBody(Body):
    name: Text
    webhook_url: Url | None = None


class ChannelOut(Out):
    channel_id: str
    name: str
    api_key: str
    webhook_secret: str
    webhook_url: str | None = None


class RotateSecretBody(Body):
    # How long the old secret keeps signing beside the new one; 0 = stop at once (a leak).
    # Absent: FLASHGATE_WEBHOOK_SECRET_OVERLAP_S.
    overlap_s: Annotated[int, Meta(ge=0, le=30 * 86_400)] | None = None


class RotatedSecretOut(Out):
    channel_id: str
    webhook_secret: str
    previous_valid_until: datetime


class SaleBody(Body):
    sku: Text
    name: Text
    starts_at: datetime
    ends_at: datetime
    sale_id: SaleId | None = None
    per_user_limit: Annotated[int, Meta(ge=1, le=1000)] = 1
    reservation_ttl_s: Annotated[int, Meta(ge=1, le=86_400)] = 300
    # Stock split over this many Redis ledgers (core/buckets.py; docs/OPERATIONS.md, "Stock
    # buckets: when to turn them on"). Fixed at creation.
    stock_buckets: Annotated[int, Meta(ge=1, le=MAX_STOCK_BUCKETS)] = 1


class KeysBody(Body):
    keys: Annotated[list[str], Meta(max_length=200_000)]


class StockOut(Out):
    total: int
    available: int
    reserved: int
    confirmed: int
    delivered: int
    cancelled: int
    expired: int
    transit: int = 0  # one bucket of several: units withdrawn for a transfer not yet settled
    refunded: int = 0  # units refunded (before delivery back in `available`; after: `voided`)
    voided: int = 0  # units whose keys were voided by a refund: never sold again


class SaleOut(Out):
    sale_id: str
    sku: str
    name: str
    starts_at: datetime
    ends_at: datetime
    per_user_limit: int
    reservation_ttl_s: int
    stock: StockOut | None = None  # the sum over the stock buckets
    stock_buckets: int = 1
    buckets: list[StockOut] | None = None  # each bucket's ledger, when there are several


class ImportOut(Out):
    import_id: int
    imported: int
    duplicates: int
    rejected: int
    stock_total: int
    rejected_lines: list[int] = []


class ChallengeParameters(Out, rename="camel"):
    """ALTCHA v2 challenge parameters (the `altcha` library's ChallengeParameters.to_dict())."""

    algorithm: str
    cost: int
    key_length: int
    key_prefix: str
    nonce: str
    salt: str
    key_signature: str | None = None
    memory_cost: int | None = None
    parallelism: int | None = None
    expires_at: int | None = None  # unix seconds
    data: dict[str, str] | None = None


class Challenge(Out):
    """A proof-of-work challenge (ALTCHA v2): solve it, send the base64 solution payload in
    Flashgate-Challenge-Solution."""

    parameters: ChallengeParameters
    signature: str | None = None


class ImportJobOut(Out):
    """An import job (202 from a key import, GET /v1/admin/imports/{import_id})."""

    import_id: int
    sale_id: str
    status: str  # running | done | failed
    normalize: str  # none, or the rules: ignore_case, ignore_separators
    total_lines: int  # entries in the body
    read_lines: int  # entries checked and encrypted so far
    imported: int
    duplicates: int
    rejected: int
    created_at: datetime
    rejected_lines: list[int] = []
    stock_total: int | None = None  # the sale's stock total, once done
    error: str | None = None  # why it failed: never a code
    finished_at: datetime | None = None


class Problem(Out):
    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
    instance: str | None = None
    errors: list[str] | None = None
    reasons: list[str] | None = None  # risk_denied / challenge_required: rule names
    # challenge_required: the ALTCHA v2 challenge (sent as the dict risk/challenge.py builds)
    challenge: Challenge | None = None
    starts_at: Timestamp | None = None  # sale_not_active: the sale's window (RFC 3339)
    ends_at: Timestamp | None = None
    # rate_limited: the admission limit that answered (risk/config.py's names)
    limit: Literal["sale_rate", "channel_rate"] | None = None


# -- admin: risk ----------------------------------------------------------------------------
class ListEntriesBody(Body):
    entries: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=128)]],
        Meta(min_length=1, max_length=10_000),
    ]


class ListEntriesOut(Out):
    action: str
    kind: str
    entries: list[str]


class ListChangeOut(Out):
    action: str
    kind: str
    changed: int
