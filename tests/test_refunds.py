"""Refunds against real Redis, PostgreSQL and the real worker code (burst mode), with each race
of a refund against delivery, expiry and other refunds driven into a fixed order.

After every scenario the ledger balances (available + reserved + confirmed + delivered +
voided = total) and agrees with PostgreSQL: keys held by live orders = delivered units, voided
keys = voided units, free keys = units not yet keyed; every order has one status in both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import pytest

from core import errors, reconcile
from core.card_keys import reveal
from core.keys import WORKER_GROUP
from core.ledger import now_ms
from core.refunds import RETURNED, VOIDED, RefundTarget, from_ms, refund_order, settle
from core.runtime import Runtime
from core.scripts import ReturnCode
from tests.conftest import until
from tests.workers_fixtures import buy, buy_and_confirm, make_channel, make_sale, order_rows
from workers import persist
from workers.runner import Worker
from workers.sweeper import Sweeper

ACTOR = "channel:test"


async def refund(rt: Runtime, order_id: str, channel: str) -> str:
    return await refund_order(rt, order_id, channel, actor=ACTOR)


async def agree(rt: Runtime, sale: str) -> dict[str, int]:
    """The ledger balances and matches PostgreSQL (after the workers settled); returns it."""
    stock = await rt.ledger.stock(sale)
    assert stock is not None
    held = sum(stock[f] for f in ("available", "reserved", "confirmed", "delivered", "voided"))
    assert held == stock["total"], stock
    assert min(stock.values()) >= 0, stock
    pg = await rt.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE order_id IS NULL) AS free,"
        " count(*) FILTER (WHERE order_id IS NOT NULL AND voided_at IS NULL) AS live,"
        " count(*) FILTER (WHERE voided_at IS NOT NULL) AS voided,"
        " count(*) FILTER (WHERE voided_at IS NOT NULL AND order_id IS NULL) AS voided_free"
        " FROM card_keys WHERE sale_id = $1",
        sale,
    )
    assert pg["voided_free"] == 0
    assert pg["live"] == stock["delivered"], (dict(pg), stock)
    assert pg["voided"] == stock["voided"], (dict(pg), stock)
    assert pg["free"] == stock["available"] + stock["reserved"] + stock["confirmed"]
    rows = await order_rows(rt, sale)
    for order_id, row in rows.items():
        live = await rt.ledger.order(order_id) or {}
        assert live.get("status") == row["status"], order_id
        assert "rf" not in live, order_id  # no refund left half-done
        if row["status"] == "refunded":
            assert live.get("rfo") == row["refund_outcome"], order_id
    pending = await rt.redis.xpending(rt.keys.events(sale), WORKER_GROUP)
    assert pending["pending"] == 0
    report = await reconcile.check(rt.redis, rt.keys, rt.pool, sale)  # flashgate reconcile
    assert report.quiescent and report.ok, report.drift
    return stock


async def lock_waiters(rt: Runtime) -> int:
    return int(
        await rt.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"
        )
    )


async def voided_keys(rt: Runtime, order_id: str) -> list[asyncpg.Record]:
    return list(
        await rt.pool.fetch(
            "SELECT key_id, order_id, voided_at FROM card_keys WHERE order_id = $1", order_id
        )
    )


async def revealed(rt: Runtime, order_id: str) -> list[str]:
    async with rt.pool.acquire() as conn:
        return await reveal(conn, rt.keyring, order_id, actor=ACTOR)


# -- before delivery: the stock returns exactly once -------------------------------------------
async def test_reserved_refund_returns_stock_once_against_expiry_and_replays(
    runtime: Runtime,
) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=4, ttl_ms=1000)
    t0 = now_ms()
    first = await buy(runtime, sale, channel, now=t0)
    second = await buy(runtime, sale, channel, now=t0)

    # Ten refunds at once and a sweep past the deadline: one of them gives the unit back.
    answers = await asyncio.gather(*(refund(runtime, first, channel) for _ in range(10)))
    assert set(answers) == {"refunded"}
    assert await Sweeper(runtime.ledger).sweep([sale], now=t0 + 5000) == 1  # only `second`
    stock = await runtime.ledger.stock(sale)
    assert stock is not None
    assert (stock["available"], stock["reserved"], stock["refunded"], stock["expired"]) == (
        4,
        0,
        1,
        1,
    )
    # Expired first, then a refund: nothing was paid, nothing comes back twice.
    with pytest.raises(errors.OrderNotRefundable):
        await refund(runtime, second, channel)
    with pytest.raises(errors.OrderRefunded):
        await runtime.ledger.confirm(sale, first, channel, "pay-late")
    with pytest.raises(errors.OrderRefunded):
        await runtime.ledger.cancel(sale, first, channel)
    with pytest.raises(errors.NotFound):
        await refund(runtime, first, "ch_someone_else")

    await Worker(runtime, sale_ids=[sale]).run_burst()
    rows = await order_rows(runtime, sale)
    assert (rows[first]["status"], rows[first]["refund_outcome"]) == ("refunded", RETURNED)
    assert rows[first]["refunded_at"] is not None
    assert rows[second]["status"] == "expired"
    assert (await agree(runtime, sale))["available"] == 4


async def test_confirmed_refund_before_any_worker_returns_stock(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=3)
    order = await buy_and_confirm(runtime, sale, channel, qty=2)
    assert await refund(runtime, order, channel) == "refunded"  # PG had no row yet
    assert await refund(runtime, order, channel) == "refunded"

    await Worker(runtime, sale_ids=[sale]).run_burst()  # reserved, confirmed, refund events
    assert await voided_keys(runtime, order) == []  # never given a key
    row = (await order_rows(runtime, sale))[order]
    assert (row["status"], row["refund_outcome"]) == ("refunded", RETURNED)
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["confirmed"], stock["refunded"]) == (3, 0, 2)


# -- the race with a worker delivering the order ------------------------------------------------
async def test_refund_between_workers_commit_and_deliver_voids_the_keys(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, codes = await make_sale(runtime, keys=3)
    order = await buy_and_confirm(runtime, sale, channel, qty=2)
    codes_in_redis: list[int] = []

    async def refund_now(sale_id: str, outcome: persist.BatchOutcome) -> None:
        if order not in outcome.delivered or codes_in_redis:
            return
        # The worker has committed the keys; deliver.lua has not run yet.
        assert await refund(runtime, order, channel) == "refunded"
        codes_in_redis.extend(await runtime.ledger.mark_delivered([order]))

    await Worker(runtime, sale_ids=[sale], after_commit=refund_now).run_burst()
    assert codes_in_redis == [ReturnCode.NOT_DELIVERABLE]  # and deliver.lua finds it refunded
    keys = await voided_keys(runtime, order)
    assert len(keys) == 2 and all(k["voided_at"] is not None for k in keys)
    assert await revealed(runtime, order) == []
    row = (await order_rows(runtime, sale))[order]
    assert (row["status"], row["refund_outcome"]) == ("refunded", VOIDED)
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["voided"], stock["delivered"]) == (1, 2, 0)

    # The voided keys are never sold again: the one unit left gets the one free key.
    other = await buy_and_confirm(runtime, sale, channel)
    with pytest.raises(errors.SoldOut):
        await buy_and_confirm(runtime, sale, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    (got,) = await revealed(runtime, other)
    assert got in codes
    assert {k["key_id"] for k in await voided_keys(runtime, other)}.isdisjoint(
        {k["key_id"] for k in keys}
    )
    await agree(runtime, sale)


async def test_refund_waiting_on_the_workers_transaction_voids_the_keys(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel)
    allocate = persist._allocate
    task: list[asyncio.Task[str]] = []

    async def allocate_then_refund(*args: Any) -> tuple[list[str], list[str], int]:
        out = await allocate(*args)  # inside the worker's transaction: keys assigned
        task.append(asyncio.create_task(refund(runtime, order, channel)))

        async def refund_blocked() -> bool:  # on the worker's uncommitted order row
            return await lock_waiters(runtime) >= 1

        await until(refund_blocked)
        return out

    monkeypatch.setattr(persist, "_allocate", allocate_then_refund)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    monkeypatch.setattr(persist, "_allocate", allocate)
    assert await task[0] == "refunded"
    await Worker(runtime, sale_ids=[sale]).run_burst()  # the refund's own stream event
    row = (await order_rows(runtime, sale))[order]
    assert (row["status"], row["refund_outcome"]) == ("refunded", VOIDED)
    assert len(await voided_keys(runtime, order)) == 1
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["voided"]) == (1, 1)


async def test_worker_waiting_on_the_refunds_transaction_allocates_nothing(
    runtime: Runtime,
) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel)
    req = await runtime.ledger.request_refund(order, channel)
    assert req.pending and req.status == "confirmed"
    target = RefundTarget(order, channel, req.user_id, req.quantity, from_ms(req.created_ms))
    async with runtime.pool.acquire() as conn, conn.transaction():
        assert await settle(conn, target, from_ms(now_ms()), actor=ACTOR) == RETURNED
        burst = asyncio.create_task(Worker(runtime, sale_ids=[sale]).run_burst())

        async def worker_blocked() -> bool:
            return await lock_waiters(runtime) >= 1

        await until(worker_blocked)  # the worker's upsert waits for this transaction
    await burst
    assert await voided_keys(runtime, order) == []
    code, outcome = await runtime.ledger.finish_refund(order, RETURNED)
    assert (code, outcome) == (ReturnCode.REPLAYED, RETURNED)  # the worker finished it
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["voided"], stock["refunded"]) == (2, 0, 1)


async def test_refund_after_delivery_voids_keys_and_stock_stays_out(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel, qty=2)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    assert len(await revealed(runtime, order)) == 2
    answers = await asyncio.gather(*(refund(runtime, order, channel) for _ in range(5)))
    assert set(answers) == {"refunded"}
    await Worker(runtime, sale_ids=[sale]).run_burst()
    assert await revealed(runtime, order) == []
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["delivered"], stock["voided"]) == (0, 0, 2)
    with pytest.raises(errors.SoldOut):
        await buy(runtime, sale, channel)


# -- a gateway dying half-way: the worker finishes the refund -----------------------------------
@pytest.mark.parametrize("steps", ["requested", "settled"])
async def test_refund_left_half_done_is_finished_by_a_worker(runtime: Runtime, steps: str) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()  # delivered
    req = await runtime.ledger.request_refund(order, channel)
    assert req.pending and req.status == "delivered"
    if steps == "settled":
        target = RefundTarget(order, channel, req.user_id, req.quantity, from_ms(req.created_ms))
        async with runtime.pool.acquire() as conn:
            assert await settle(conn, target, from_ms(now_ms()), actor=ACTOR) == VOIDED
        assert await revealed(runtime, order) == []  # voided already
    # ...and the gateway died here.
    await Worker(runtime, sale_ids=[sale]).run_burst()
    assert (await runtime.ledger.order(order) or {})["status"] == "refunded"
    stock = await agree(runtime, sale)
    assert (stock["available"], stock["voided"]) == (1, 1)
    assert await refund(runtime, order, channel) == "refunded"  # the client's retry


async def test_many_refunds_deliveries_and_expiries_at_once(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=60, ttl_ms=1000)
    t0 = now_ms()
    paid = [await buy_and_confirm(runtime, sale, channel) for _ in range(30)]
    held = [await buy(runtime, sale, channel, now=t0) for _ in range(10)]
    await Worker(runtime, name="early", sale_ids=[sale]).run_burst()  # some delivered first
    paid += [await buy_and_confirm(runtime, sale, channel) for _ in range(10)]
    targets = paid[::2] + held[::2]

    async def refund_unless_expired(order_id: str) -> str:
        try:
            return await refund(runtime, order_id, channel)
        except errors.OrderNotRefundable:  # the sweeper got there first
            return "expired"

    await asyncio.gather(
        *(refund_unless_expired(o) for o in targets for _ in range(2)),
        *(Worker(runtime, name=f"w{i}", sale_ids=[sale]).run_burst() for i in range(2)),
        Sweeper(runtime.ledger).sweep([sale], now=t0 + 5000),
    )
    await Worker(runtime, name="late", sale_ids=[sale]).run_burst()
    stock = await agree(runtime, sale)
    rows = await order_rows(runtime, sale)
    refunded = [o for o in targets if rows[o]["status"] == "refunded"]
    assert set(paid[::2]) <= set(refunded)
    assert {rows[o]["status"] for o in held} <= {"refunded", "expired"}
    assert stock["refunded"] == len(refunded)
    assert stock["delivered"] == len(paid) - len(paid[::2])
    assert stock["reserved"] == stock["confirmed"] == 0


# -- the webhook ---------------------------------------------------------------------------------
async def test_refund_webhook_goes_through_the_outbox(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime, webhook_url="http://127.0.0.1:9/hook")
    sale, codes = await make_sale(runtime, keys=2)
    early = await buy(runtime, sale, channel)
    late = await buy_and_confirm(runtime, sale, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    for order in (early, late):
        await refund(runtime, order, channel)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    rows = await runtime.pool.fetch(
        "SELECT order_id, payload FROM webhook_outbox WHERE order_id = ANY($1::text[])"
        " AND event = 'order.refunded'",
        [early, late],
    )
    bodies = {r["order_id"]: msgspec.json.decode(r["payload"]) for r in rows}
    assert set(bodies) == {early, late}
    assert bodies[early]["keys_voided"] == 0 and bodies[late]["keys_voided"] == 1
    assert all(b["event"] == "order.refunded" and b["sale_id"] == sale for b in bodies.values())
    assert not any(code.encode() in r["payload"] for r in rows for code in codes)
