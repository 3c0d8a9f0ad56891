"""Benchmark-only routes, mounted only when FLASHGATE_BENCH_ENDPOINTS is on (never in production).

- `GET /v1/bench/ping`: the ceiling — the same app, server and JSON encoder doing no work.
- `POST /v1/bench/naive/{sale_id}/purchase`: the design a team would build instead of the Redis
  ledger: one PostgreSQL transaction per purchase (idempotency lookup, per-user count,
  `UPDATE … SET available = available - n WHERE available >= n` on one stock row, order insert).
  Same auth, same body decoding, same answers as the real purchase; no risk engine.
  Its tables live in the schema `bench_naive`, created by the benchmark (bench/naive.py), never
  by the migrations.
"""

from __future__ import annotations

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import errors
from core.ids import is_sale_id, new_order_id
from core.ledger import now_ms
from gateway.models import PurchaseBody, PurchaseOut
from gateway.responses import JSONResponse
from gateway.routes.storefront import rfc3339_ms
from gateway.state import decode, path_id, state


class Pong(msgspec.Struct):
    ok: bool = True


_PONG = Pong()


async def ping(request: Request) -> Response:
    return JSONResponse(_PONG)


async def naive_purchase(request: Request) -> Response:
    gw = state(request)
    channel_id = await gw.channels.channel_of(request)
    sale_id = path_id(request, "sale_id", is_sale_id, "sale")
    idem = request.headers.get("idempotency-key", "")
    if not idem or len(idem) > 128:
        raise errors.InvalidRequest("the Idempotency-Key header is required")
    body = await decode(request, PurchaseBody)
    now = now_ms()
    async with gw.runtime.pool.acquire() as conn, conn.transaction():
        prev = await conn.fetchrow(
            "SELECT order_id, expires_at FROM bench_naive.orders"
            " WHERE channel_id = $1 AND idempotency_key = $2",
            channel_id,
            idem,
        )
        if prev is not None:
            out = PurchaseOut(prev["order_id"], "reserved", rfc3339_ms(prev["expires_at"]))
            return JSONResponse(out, status_code=201, headers={"Idempotent-Replayed": "true"})
        sale = await conn.fetchrow(
            "UPDATE bench_naive.stock SET available = available - $2"
            " WHERE sale_id = $1 AND available >= $2 RETURNING per_user_limit, ttl_ms",
            sale_id,
            body.quantity,
        )
        if sale is None:
            raise errors.SoldOut()
        held = await conn.fetchval(
            "SELECT coalesce(sum(quantity), 0) FROM bench_naive.orders"
            " WHERE sale_id = $1 AND user_id = $2",
            sale_id,
            body.user_id,
        )
        if held + body.quantity > sale["per_user_limit"]:
            raise errors.PurchaseLimitExceeded()  # rolls the stock update back
        order_id = new_order_id(sale_id, now)
        expires_at = now + sale["ttl_ms"]
        try:
            await conn.execute(
                "INSERT INTO bench_naive.orders (order_id, sale_id, channel_id, idempotency_key,"
                " user_id, quantity, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                order_id,
                sale_id,
                channel_id,
                idem,
                body.user_id,
                body.quantity,
                expires_at,
            )
        except asyncpg.UniqueViolationError:
            raise errors.IdempotencyMismatch() from None  # a concurrent twin won
    return JSONResponse(PurchaseOut(order_id, "reserved", rfc3339_ms(expires_at)), status_code=201)


routes = [
    Route("/v1/bench/ping", ping, methods=["GET"]),
    Route("/v1/bench/naive/{sale_id}/purchase", naive_purchase, methods=["POST"]),
]
