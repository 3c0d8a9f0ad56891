"""A sale whose Redis ledger is gone is paused, not unknown.

If Redis loses its data (restarted without persistence, or failed over to an empty replica),
every script of a sale answers "no such sale". When PostgreSQL still knows the sale, the
gateway answers 503 `sale_not_ready` (Retry-After) instead of 404, and the admin API refuses to
re-create the sale's ledger with fresh, empty stock, until `flashgate reconcile SALE` rebuilds
it from PostgreSQL (core/reconcile.py). Costs nothing on the happy path: it runs only when the
ledger already said not found. A client spraying unknown sale or order ids must not turn each
404 into a PostgreSQL query: the purchase path asks an in-process set of the sales PostgreSQL
knows (those ending within the last day), read again at most every KNOWN_TTL_S by one request
(single flight), so a spray costs PostgreSQL one small query per process and interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from core import errors, failover
from core.ids import is_order_id, is_sale_id, sale_of_order
from core.runtime import Runtime
from gateway.state import state

Endpoint = Callable[[Request], Awaitable[Response]]
PAUSED = "the sale's ledger is missing in Redis; run `flashgate reconcile <sale>`"


KNOWN_TTL_S = 2.0
KNOWN_SQL = "SELECT sale_id FROM sales WHERE ends_at > now() - interval '1 day'"
probes_made = [0]  # reads of the known sales so far (tests)


@dataclass
class _Known:
    sales: frozenset[str] = frozenset()
    until: float = float("-inf")
    loading: asyncio.Future[frozenset[str]] | None = None


_known: dict[int, _Known] = {}  # id(pool) -> its known sales (one per process in production)


async def _known_sales(rt: Runtime) -> frozenset[str]:
    known = _known.setdefault(id(rt.pool), _Known())
    if known.until > time.monotonic():
        return known.sales
    if known.loading is None:

        async def load() -> frozenset[str]:
            try:
                probes_made[0] += 1
                rows = await rt.pool.fetch(KNOWN_SQL)
                known.sales = frozenset(r["sale_id"] for r in rows)
                known.until = time.monotonic() + KNOWN_TTL_S
                return known.sales
            finally:
                known.loading = None

        known.loading = asyncio.ensure_future(load())
    return await asyncio.shield(known.loading)


async def ledger_missing(rt: Runtime, sale_id: str, *, cached: bool = True) -> bool:
    """PostgreSQL knows the sale and Redis has no ledger for it (bucket 0 is written last).
    `cached=False` (the admin API): PostgreSQL asked about this sale itself."""
    if await rt.redis.exists(rt.keys.sale(sale_id)):
        return False
    if cached:
        return sale_id in await _known_sales(rt)
    return await rt.pool.fetchval("SELECT 1 FROM sales WHERE sale_id = $1", sale_id) is not None


async def refuse_if_paused(rt: Runtime, sale_id: str, *, cached: bool = True) -> None:
    if await ledger_missing(rt, sale_id, cached=cached):
        raise errors.SaleNotReady(PAUSED)


def _sale_of(request: Request) -> str | None:
    params = request.path_params
    if is_sale_id(params.get("sale_id", "")):
        return str(params["sale_id"])
    order_id = params.get("order_id", "")
    return sale_of_order(order_id) if is_order_id(order_id) else None


def paused_is_not_found(endpoint: Endpoint) -> Endpoint:
    """Wrap a storefront endpoint: its 404 becomes 503 `sale_not_ready` for a paused sale; and
    while a Redis failover is not merged yet (core/failover.py: an in-process flag, no round
    trip), every call is 503 `sale_not_ready`."""

    async def guarded(request: Request) -> Response:
        guard = state(request).runtime.failover
        if guard is not None and guard.paused:  # a new Redis primary, not merged yet
            raise errors.SaleNotReady(failover.PAUSED)
        try:
            return await endpoint(request)
        except errors.NotFound:
            sale_id = _sale_of(request)
            if sale_id is not None:
                await refuse_if_paused(state(request).runtime, sale_id)
            raise

    guarded.__name__ = getattr(endpoint, "__name__", "endpoint")
    return guarded
