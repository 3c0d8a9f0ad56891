"""Storefront API (channel API key): purchase, confirm, cancel, refund, read an order.

The purchase path touches Redis only: one round trip for the channel (usually cached in
process), risk (the seam in risk/engine.py), and one for the reservation script.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import errors, metrics
from core.card_keys import reveal
from core.ids import is_order_id, is_sale_id, sale_of_order, shard_id
from core.ledger import PurchaseRequest, Reservation, WrongBuckets
from core.logging import CLIENT_REQUEST_ID, REQUEST_ID
from core.refunds import refund_order
from gateway.models import ConfirmBody, OrderOut, OrderStatusOut, PurchaseBody, PurchaseOut
from gateway.responses import JSONResponse
from gateway.sale_guard import paused_is_not_found
from gateway.state import GatewayState, decode, path_id, state
from risk.engine import Decision, IPAddress, RiskContext, Verdict
from risk.signals import parse_ip
from risk.solver import SOLUTION_HEADER

_IDEMPOTENCY_KEY_MAX = 128
_fingerprint_encoder = msgspec.json.Encoder(order="sorted")


_second: list[tuple[int, str]] = [(-1, "")]  # the last second formatted (one per purchase)


def rfc3339_ms(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    cached_s, prefix = _second[0]
    if seconds != cached_s:
        prefix = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = (seconds, prefix)
    return f"{prefix}.{millis:03d}Z"


def idempotency_key(request: Request) -> str:
    key = request.headers.get("idempotency-key", "")
    if not key:
        raise errors.InvalidRequest("the Idempotency-Key header is required")
    if len(key) > _IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise errors.InvalidRequest("Idempotency-Key: 1-128 printable ASCII characters")
    return key


def request_fingerprint(sale_id: str, body: PurchaseBody) -> str:
    """Identifies 'the same request' for idempotency: the sale and the whole decoded body."""
    digest = hashlib.blake2b(
        sale_id.encode() + b"\0" + _fingerprint_encoder.encode(body), digest_size=16
    )
    return digest.hexdigest()


def _order_id(request: Request) -> str:
    return path_id(request, "order_id", is_order_id, "order")


async def purchase(request: Request) -> Response:
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    sale_id = path_id(request, "sale_id", is_sale_id, "sale")
    idem = idempotency_key(request)
    body = await decode(request, PurchaseBody)
    address = parse_ip(body.client_ip)
    if address is None:  # a client's mistake: never scored as a risk signal
        raise errors.InvalidRequest(
            "Expected an IPv4 or IPv6 address, with nothing around it - at `$.client_ip`"
        )
    req = PurchaseRequest(
        sale_id=sale_id,
        channel_id=channel_id,
        idempotency_key=idem,
        fingerprint=request_fingerprint(sale_id, body),
        user_id=body.user_id,
        quantity=body.quantity,
        payment_ref=body.payment_ref or "",
    )
    try:
        reservation = await _reserve(gw, request, req, body, address)
    except WrongBuckets:  # the sale has stock buckets this process didn't know of: now it does
        reservation = await _reserve(gw, request, req, body, address)
    out = PurchaseOut(
        reservation.order_id, reservation.status, rfc3339_ms(reservation.expires_at_ms)
    )
    headers = {"Idempotent-Replayed": "true"} if reservation.replayed else None
    metrics.count_purchase("replayed" if reservation.replayed else reservation.status)
    return JSONResponse(out, status_code=201, headers=headers)


async def _reserve(
    gw: GatewayState, request: Request, req: PurchaseRequest, body: PurchaseBody, address: IPAddress
) -> Reservation:
    """Risk, then the reservation on the buyer's home bucket (the sale itself, unless the sale
    has several stock buckets)."""
    ledger = gw.runtime.ledger
    route = ledger.route(req.sale_id, req.user_id)
    buckets, home = route
    plan = await gw.risk.plan(
        RiskContext(
            sale_id=req.sale_id,
            channel_id=req.channel_id,
            user_id=body.user_id,
            device_id=body.device_id,
            client_ip=body.client_ip,
            user_agent=body.user_agent,
            quantity=body.quantity,
            challenge_solution=request.headers.get(SOLUTION_HEADER) or None,
            idempotency_key=req.idempotency_key,
            fingerprint=req.fingerprint,
            address=address,
            shard=shard_id(req.sale_id, home) if buckets > 1 else "",
            buckets=buckets,
        )
    )
    if isinstance(plan, Decision):  # decided before the ledger: lists, risk off, split mode
        refuse_unless_allowed(plan)
        return await ledger.reserve(req)
    # scored inside the reservation's own script
    scored, outcome = await ledger.purchase(req, plan.script, route=route)
    refuse_unless_allowed(gw.risk.judge(plan, outcome))
    assert scored is not None  # an allowed outcome always carries its reservation
    return scored


def refuse_unless_allowed(decision: Decision) -> None:
    if decision.verdict is Verdict.DENY:
        raise errors.RiskDenied(reasons=list(decision.reasons))
    if decision.verdict is Verdict.CHALLENGE:
        raise errors.ChallengeRequired(reasons=list(decision.reasons), challenge=decision.challenge)


async def confirm(request: Request) -> Response:
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    order_id = _order_id(request)
    body = await decode(request, ConfirmBody)
    status, _ = await gw.runtime.ledger.confirm(
        sale_of_order(order_id), order_id, channel_id, body.payment_ref
    )
    return JSONResponse(OrderStatusOut(order_id, status), status_code=202)


async def cancel(request: Request) -> Response:
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    order_id = _order_id(request)
    status = await gw.runtime.ledger.cancel(sale_of_order(order_id), order_id, channel_id)
    return JSONResponse(OrderStatusOut(order_id, status))


async def refund(request: Request) -> Response:
    """Refund an order of this channel: before delivery its units go back to the stock, after
    it its keys are voided (core/refunds.py). 200 `refunded`, the same on every repeat."""
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    order_id = _order_id(request)
    status = await refund_order(
        gw.runtime,
        order_id,
        channel_id,
        actor=f"channel:{channel_id}",
        request_id=REQUEST_ID.get() or None,
        client_request_id=CLIENT_REQUEST_ID.get() or None,
    )
    return JSONResponse(OrderStatusOut(order_id, status))


ORDER_ROW = """
SELECT sale_id, channel_id, user_id, quantity, status FROM orders WHERE order_id = $1
FOR SHARE
"""


async def get_order(request: Request) -> Response:
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    order_id = _order_id(request)
    rt = gw.runtime
    live = await rt.ledger.order(order_id)
    if live is not None:
        if live.get("ch") != channel_id:
            raise errors.NotFound("no such order")
        out = OrderOut(
            order_id=order_id,
            sale_id=sale_of_order(order_id),
            user_id=live["user"],
            quantity=int(live["qty"]),
            status=live["status"],
            expires_at=rfc3339_ms(int(live["exp"])) if live["status"] == "reserved" else None,
        )
        if live.get("rf"):
            out.status = "refunded"  # requested: it completes (core/refunds.py), keys are out
            return JSONResponse(out)
        if out.status not in ("confirmed", "delivered"):
            return JSONResponse(out)
    # PostgreSQL is the record of delivery: a worker commits keys before it tells Redis. The
    # row is read FOR SHARE and the keys revealed in the same transaction, so a refund voiding
    # them (FOR UPDATE) comes wholly before or after this read.
    async with rt.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(ORDER_ROW, order_id)
        if live is None:
            if row is None or row["channel_id"] != channel_id:
                raise errors.NotFound("no such order")
            out = OrderOut(
                order_id=order_id,
                sale_id=row["sale_id"],
                user_id=row["user_id"],
                quantity=row["quantity"],
                status=row["status"],
            )
        if row is not None and row["status"] == "refunded":
            out.status = "refunded"
        elif row is not None and row["status"] == "delivered":
            out.status = "delivered"
            out.card_keys = await reveal(
                conn,
                rt.keyring,
                order_id,
                actor=f"channel:{channel_id}",
                request_id=REQUEST_ID.get() or None,
                client_request_id=CLIENT_REQUEST_ID.get() or None,
            )
        elif out.status == "delivered":
            out.status = "confirmed"  # Redis ahead of a rolled-back commit: not delivered yet
    return JSONResponse(out)


routes = [  # a paused sale (ledger lost with Redis's data) answers 503, not 404: sale_guard.py
    Route("/v1/sales/{sale_id}/purchase", paused_is_not_found(purchase), methods=["POST"]),
    Route("/v1/orders/{order_id}/confirm", paused_is_not_found(confirm), methods=["POST"]),
    Route("/v1/orders/{order_id}/cancel", paused_is_not_found(cancel), methods=["POST"]),
    Route("/v1/orders/{order_id}/refund", paused_is_not_found(refund), methods=["POST"]),
    Route("/v1/orders/{order_id}", get_order, methods=["GET"]),
]
