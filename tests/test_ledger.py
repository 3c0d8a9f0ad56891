"""The Lua ledger on a real Redis: atomicity and the invariants, with a fixed clock."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from core import errors
from core.ledger import Ledger, PurchaseRequest
from core.runtime import Runtime
from tests.conftest import new_sale_id

T0 = 1_900_000_000_000  # a fixed clock (ms)
TTL_MS = 60_000


async def open_sale(ledger: Ledger, stock: int, *, limit: int = 1) -> str:
    sale_id = new_sale_id()
    await ledger.init_sale(sale_id, T0, T0 + 3_600_000, limit, TTL_MS)
    if stock:
        await ledger.add_stock(sale_id, 1, stock)
    return sale_id


def request(
    sale_id: str, user: str, *, key: str | None = None, qty: int = 1, pay: str = "", fp: str = "fp"
) -> PurchaseRequest:
    return PurchaseRequest(
        sale_id=sale_id,
        channel_id="ch_test",
        idempotency_key=key or uuid.uuid4().hex,
        fingerprint=fp,
        user_id=user,
        quantity=qty,
        payment_ref=pay,
    )


async def attempt(ledger: Ledger, req: PurchaseRequest, now: int = T0 + 1) -> str:
    try:
        res = await ledger.reserve(req, now=now)
    except errors.FlashgateError as exc:
        return exc.code
    return "replayed" if res.replayed else res.status


async def test_concurrent_buyers_get_exactly_the_stock(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=50)
    results = await asyncio.gather(
        *[attempt(ledger, request(sale_id, f"user-{i}")) for i in range(500)]
    )
    assert results.count("reserved") == 50
    assert results.count("sold_out") == 450
    stock = await ledger.stock(sale_id)
    assert stock is not None
    assert stock["available"] == 0 and stock["reserved"] == 50 and stock["total"] == 50
    assert await runtime.redis.xlen(runtime.keys.events(sale_id)) == 50
    held = await runtime.redis.hvals(runtime.keys.buyers(sale_id))
    assert sorted(held) == ["1"] * 50


async def test_per_user_limit_holds_under_concurrency(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=100, limit=2)
    results = await asyncio.gather(
        *[attempt(ledger, request(sale_id, "greedy")) for _ in range(50)]
    )
    assert results.count("reserved") == 2
    assert results.count("purchase_limit_exceeded") == 48
    # quantity counts against the limit, not the number of orders
    assert await attempt(ledger, request(sale_id, "bulk", qty=3)) == "purchase_limit_exceeded"
    assert await attempt(ledger, request(sale_id, "bulk", qty=2)) == "reserved"


async def test_idempotent_retries_return_the_original_order(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=10)
    req = request(sale_id, "u1", key="same-key")
    first = await ledger.reserve(req, now=T0 + 1)
    replays = await asyncio.gather(*[ledger.reserve(req, now=T0 + 2) for _ in range(20)])
    assert {r.order_id for r in replays} == {first.order_id}
    assert all(r.replayed and r.expires_at_ms == first.expires_at_ms for r in replays)
    with pytest.raises(errors.IdempotencyMismatch):
        await ledger.reserve(request(sale_id, "u1", key="same-key", fp="other"), now=T0 + 3)
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["reserved"] == 1
    # the same key still answers after the sale closed: the original answer wins
    late = await ledger.reserve(req, now=T0 + 10_000_000)
    assert late.order_id == first.order_id


async def test_concurrent_first_attempts_with_one_key_make_one_order(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=10)
    req = request(sale_id, "u1", key="raced")
    results = await asyncio.gather(*[ledger.reserve(req, now=T0 + 1) for _ in range(30)])
    assert len({r.order_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1


async def test_sale_window_and_missing_sale(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=5)
    assert await attempt(ledger, request(sale_id, "early"), now=T0 - 1) == "sale_not_active"
    assert await attempt(ledger, request(sale_id, "late"), now=T0 + 3_600_000) == "sale_not_active"
    assert await attempt(ledger, request(new_sale_id(), "x")) == "not_found"
    assert await attempt(ledger, request(sale_id, "many", qty=6)) == "purchase_limit_exceeded"


async def test_insufficient_stock_for_quantity(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=2, limit=5)
    assert await attempt(ledger, request(sale_id, "u", qty=3)) == "insufficient_stock"
    assert await attempt(ledger, request(sale_id, "u", qty=2)) == "reserved"
    assert await attempt(ledger, request(sale_id, "v")) == "sold_out"


async def test_prepaid_purchase_is_confirmed_at_once(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=3)
    res = await ledger.reserve(request(sale_id, "u", pay="pay-1"), now=T0 + 1)
    assert res.status == "confirmed"
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["confirmed"] == 1 and stock["reserved"] == 0
    assert await runtime.redis.zcard(runtime.keys.deadlines(sale_id)) == 0


async def test_expiry_returns_stock_exactly_once_with_many_sweepers(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=20)
    for i in range(20):
        await ledger.reserve(request(sale_id, f"u{i}"), now=T0 + 1)
    assert await ledger.expire_due(sale_id, now=T0 + 2) == 0  # not yet due
    expired = await asyncio.gather(
        *[ledger.expire_due(sale_id, now=T0 + 1 + TTL_MS) for _ in range(8)]
    )
    assert sum(expired) == 20
    stock = await ledger.stock(sale_id)
    assert stock is not None
    assert stock["available"] == 20 and stock["reserved"] == 0 and stock["expired"] == 20
    assert await runtime.redis.hlen(runtime.keys.buyers(sale_id)) == 0
    # the same users can buy again once their reservation expired
    assert await attempt(ledger, request(sale_id, "u0"), now=T0 + 2 + TTL_MS) == "reserved"


async def test_cancel_and_confirm_settle_once(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=3)
    a = await ledger.reserve(request(sale_id, "a"), now=T0 + 1)
    b = await ledger.reserve(request(sale_id, "b"), now=T0 + 1)
    cancels = await asyncio.gather(
        *[ledger.cancel(sale_id, a.order_id, "ch_test", now=T0 + 2) for _ in range(10)]
    )
    assert set(cancels) == {"cancelled"}
    with pytest.raises(errors.OrderCancelled):
        await ledger.confirm(sale_id, a.order_id, "ch_test", "p", now=T0 + 3)
    assert (await ledger.confirm(sale_id, b.order_id, "ch_test", "p", now=T0 + 3))[0] == "confirmed"
    assert (await ledger.confirm(sale_id, b.order_id, "ch_test", "p", now=T0 + 4))[0] == "confirmed"
    with pytest.raises(errors.OrderNotCancellable):
        await ledger.cancel(sale_id, b.order_id, "ch_test", now=T0 + 5)
    with pytest.raises(errors.NotFound):  # another channel can't touch it
        await ledger.cancel(sale_id, b.order_id, "ch_other", now=T0 + 5)
    stock = await ledger.stock(sale_id)
    assert stock == {
        "total": 3,
        "available": 2,
        "reserved": 0,
        "confirmed": 1,
        "delivered": 0,
        "cancelled": 1,
        "expired": 0,
        "refunded": 0,
        "voided": 0,
    }


async def test_confirm_after_deadline_expires_the_reservation(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=1)
    res = await ledger.reserve(request(sale_id, "slow"), now=T0 + 1)
    with pytest.raises(errors.ReservationExpired):
        await ledger.confirm(sale_id, res.order_id, "ch_test", "p", now=T0 + 1 + TTL_MS)
    stock = await ledger.stock(sale_id)
    assert stock is not None and stock["available"] == 1 and stock["expired"] == 1
    assert await ledger.expire_due(sale_id, now=T0 + 2 * TTL_MS) == 0  # already settled


async def test_flushed_script_cache_is_survived(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=40)
    first = await asyncio.gather(*[attempt(ledger, request(sale_id, f"a{i}")) for i in range(20)])
    await runtime.redis.script_flush()
    second = await asyncio.gather(*[attempt(ledger, request(sale_id, f"b{i}")) for i in range(30)])
    assert (first + second).count("reserved") == 40
    assert (first + second).count("sold_out") == 10


async def test_add_stock_is_idempotent_per_import(runtime: Runtime) -> None:
    ledger = runtime.ledger
    sale_id = await open_sale(ledger, stock=0)
    assert await ledger.add_stock(sale_id, 7, 100) == 100
    assert await ledger.add_stock(sale_id, 7, 100) == 100
    assert await ledger.add_stock(sale_id, 8, 5) == 105
    with pytest.raises(errors.NotFound):
        await ledger.add_stock(new_sale_id(), 1, 5)
