"""Workers against real Redis and PostgreSQL: allocation, idempotent replay, crash recovery,
dead letters and the expiry sweeper. (Webhooks and SIGTERM drain: test_workers_delivery.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from core.keys import WORKER_GROUP
from core.ledger import now_ms
from core.runtime import Runtime
from tests.workers_fixtures import (
    buy,
    buy_and_confirm,
    import_keys,
    keys_by_order,
    make_channel,
    make_sale,
    order_rows,
    redis_statuses,
    revealed_codes,
)
from workers.consumer import SaleConsumer
from workers.events import fold, parse_event
from workers.persist import persist_batch
from workers.runner import Worker
from workers.sweeper import Sweeper


async def pending(rt: Runtime, sale_id: str) -> int:
    return int((await rt.redis.xpending(rt.keys.events(sale_id), WORKER_GROUP))["pending"])


async def test_confirmed_orders_get_exactly_their_keys(runtime: Runtime) -> None:
    rt = dataclasses.replace(
        runtime, settings=dataclasses.replace(runtime.settings, worker_batch_size=3)
    )  # several batches, events of one order split
    channel, _ = await make_channel(rt)
    sale, codes = await make_sale(rt, keys=12)
    paid = [await buy(rt, sale, channel, qty=2, pay="pay-1")]  # confirmed at reservation
    paid += [await buy_and_confirm(rt, sale, channel, qty=q) for q in (1, 3, 2)]
    held = await buy(rt, sale, channel, qty=1)
    dropped = await buy(rt, sale, channel, qty=1)
    await rt.ledger.cancel(sale, dropped, channel)

    assert await Worker(rt, sale_ids=[sale]).run_burst() > 0

    rows = await order_rows(rt, sale)
    allocated = await keys_by_order(rt, sale)
    assert set(allocated) == set(paid)
    for order_id in paid:
        assert rows[order_id]["status"] == "delivered"
        assert rows[order_id]["delivered_at"] is not None
        assert rows[order_id]["confirmed_at"] is not None
        assert len(allocated[order_id]) == rows[order_id]["quantity"]
        assert (await rt.ledger.order(order_id) or {})["status"] == "delivered"
    all_keys = [k for ks in allocated.values() for k in ks]
    assert len(all_keys) == len(set(all_keys)) == 8
    revealed = [c for o in paid for c in await revealed_codes(rt, o)]
    assert len(set(revealed)) == 8 and set(revealed) <= set(codes)
    assert rows[held]["status"] == "reserved"
    assert rows[dropped]["status"] == "cancelled" and rows[dropped]["ended_at"] is not None
    stock = await rt.ledger.stock(sale)
    assert stock is not None and stock["delivered"] == 8 and stock["confirmed"] == 0
    assert await pending(rt, sale) == 0


async def test_replayed_batches_allocate_nothing(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=6)
    for q in (1, 2, 1):
        await buy_and_confirm(runtime, sale, channel, qty=q)
    await Worker(runtime, sale_ids=[sale]).run_burst()
    before, rows_before = await keys_by_order(runtime, sale), await order_rows(runtime, sale)

    # The whole stream again, as new entries for the group (e.g. a restored group offset).
    await runtime.redis.xgroup_setid(runtime.keys.events(sale), WORKER_GROUP, "0")
    assert await Worker(runtime, sale_ids=[sale]).run_burst() > 0
    # And the same batch written straight to PostgreSQL once more.
    entries = await runtime.redis.xrange(runtime.keys.events(sale))
    events = [parse_event(sale, i, f) for i, f in entries]
    async with runtime.pool.acquire() as conn:
        from workers.events import from_ms

        outcome = await persist_batch(conn, sale, list(fold(events).values()), from_ms(now_ms()))
    assert outcome.keys_allocated == 0 and not outcome.short
    assert sorted(outcome.delivered) == sorted(before)

    assert await keys_by_order(runtime, sale) == before
    assert await order_rows(runtime, sale) == rows_before
    assert await pending(runtime, sale) == 0


class Crash(RuntimeError):
    pass


async def test_crash_between_commit_and_ack_is_harmless(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=5)
    orders = [await buy_and_confirm(runtime, sale, channel, qty=q) for q in (2, 1, 2)]

    async def crash(sale_id: str, outcome: object) -> None:
        raise Crash("killed after commit")

    with pytest.raises(Crash):
        await Worker(runtime, name="doomed", sale_ids=[sale], after_commit=crash).run_burst()
    committed = await keys_by_order(runtime, sale)
    assert set(committed) == set(orders)  # PG committed...
    assert await redis_statuses(runtime, orders) == {"confirmed"}
    assert await pending(runtime, sale) > 0  # ...but nothing was acked

    # Another worker takes the idle entries over and finishes the job without new keys.
    await Worker(runtime, name="heir", sale_ids=[sale]).run_burst()
    assert await keys_by_order(runtime, sale) == committed
    assert await redis_statuses(runtime, orders) == {"delivered"}
    stock = await runtime.ledger.stock(sale)
    assert stock is not None and stock["delivered"] == 5 and stock["confirmed"] == 0
    assert await pending(runtime, sale) == 0
    assert await runtime.redis.xlen(runtime.keys.dead_letters(sale)) == 0


async def test_short_of_keys_serves_whole_orders_then_dead_letters(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime)
    await import_keys(runtime, sale, 3, stock=4)  # Redis sells 4 units, PG holds 3 keys
    orders = [await buy_and_confirm(runtime, sale, channel, qty=2) for _ in range(2)]

    await Worker(runtime, sale_ids=[sale]).run_burst()

    allocated = await keys_by_order(runtime, sale)
    assert len(allocated) == 1
    (first,) = allocated
    (second,) = set(orders) - {first}
    assert len(allocated[first]) == 2
    assert (await runtime.ledger.order(first) or {})["status"] == "delivered"
    rows = await order_rows(runtime, sale)
    assert rows[second]["status"] == "confirmed"  # not half-served, not lost
    free = await runtime.pool.fetchval(
        "SELECT count(*) FROM card_keys WHERE sale_id = $1 AND order_id IS NULL", sale
    )
    assert free == 1
    dead = await runtime.redis.xrange(runtime.keys.dead_letters(sale))
    assert [(f["t"], f["o"]) for _, f in dead] == [("confirmed", second)]
    assert dead[0][1]["dl_reason"] == "delivered too many times"
    assert int(dead[0][1]["dl_deliveries"]) > runtime.settings.worker_max_deliveries
    assert await pending(runtime, sale) == 0


async def test_malformed_and_unknown_entries_go_to_dead_letters(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=1)
    good = await buy_and_confirm(runtime, sale, channel)
    stream = runtime.keys.events(sale)
    ok = {
        "t": "confirmed",
        "o": f"{sale}.01J00000000000000000000000",
        "ch": channel,
        "u": "u1",
        "q": "1",
        "at": str(now_ms()),
        "exp": "0",
        "pay": "",
    }
    poison = [
        {"t": "bogus", "o": ok["o"]},
        {**ok, "o": "not-an-order"},
        {**ok, "o": "some-other-sale.01J00000000000000000000000"},
        {**ok, "q": "many"},
        {**ok, "ch": "ch_nobody"},
    ]
    for fields in poison:
        await runtime.redis.xadd(stream, fields)

    await Worker(runtime, sale_ids=[sale]).run_burst()

    dead = await runtime.redis.xrange(runtime.keys.dead_letters(sale))
    reasons = [f["dl_reason"] for _, f in dead]
    assert reasons == [
        "malformed: unknown event type",
        "malformed: not an order id",
        "malformed: order belongs to another sale",
        "malformed: field 'q' is not an integer",
        "unknown channel",
    ]
    assert all(f["dl_src"] for _, f in dead) and dead[1][1]["o"] == "not-an-order"
    assert set(await keys_by_order(runtime, sale)) == {good}
    assert await pending(runtime, sale) == 0

    # A sale that Redis knows and PostgreSQL doesn't: its orders are parked, not lost.
    ghost, _ = await make_sale(runtime, in_pg=False)
    await import_keys_redis_only(runtime, ghost, 2)
    order = await buy(runtime, ghost, channel, pay="p")
    await Worker(runtime, sale_ids=[ghost]).run_burst()
    dead = await runtime.redis.xrange(runtime.keys.dead_letters(ghost))
    assert [(f["o"], f["dl_reason"]) for _, f in dead] == [(order, "unknown sale")]
    assert await pending(runtime, ghost) == 0


async def import_keys_redis_only(rt: Runtime, sale_id: str, n: int) -> None:
    await rt.ledger.add_stock(sale_id, 1, n)


async def test_two_sweepers_return_stock_exactly_once(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=30, ttl_ms=1000)
    t0 = now_ms()
    orders = [await buy(runtime, sale, channel, now=t0) for _ in range(20)]
    assert await Sweeper(runtime.ledger).sweep([sale], now=t0 + 999) == 0  # not due yet

    a, b = Sweeper(runtime.ledger, limit=3), Sweeper(runtime.ledger, limit=3)
    expired = await asyncio.gather(*(s.sweep([sale], now=t0 + 1000) for s in (a, b, a, b)))
    assert sum(expired) == 20
    stock = await runtime.ledger.stock(sale)
    assert stock is not None
    assert (stock["available"], stock["reserved"], stock["expired"]) == (30, 0, 20)

    await Worker(runtime, sale_ids=[sale]).run_burst()
    rows = await order_rows(runtime, sale)
    assert {rows[o]["status"] for o in orders} == {"expired"}
    assert all(rows[o]["ended_at"] is not None for o in orders)
    assert await keys_by_order(runtime, sale) == {}


async def test_consumer_rereads_its_own_pending_entries(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=2)
    order = await buy_and_confirm(runtime, sale, channel)
    c = SaleConsumer(runtime, sale, "reader")
    await c.ensure_group()
    # Read without handling (as if the process died mid-batch): the entry is ours, pending.
    await runtime.redis.xreadgroup(WORKER_GROUP, "reader", {c.stream: ">"}, count=10)
    assert await pending(runtime, sale) == 2
    # The same consumer name after a restart starts from its own pending entries.
    assert await Worker(runtime, name="reader", sale_ids=[sale]).run_burst() == 2
    assert (await runtime.ledger.order(order) or {})["status"] == "delivered"
    assert await pending(runtime, sale) == 0


async def test_concurrent_workers_never_hand_out_a_key_twice(runtime: Runtime) -> None:
    rt = dataclasses.replace(
        runtime, settings=dataclasses.replace(runtime.settings, worker_batch_size=7)
    )  # many small batches, interleaved
    channel, _ = await make_channel(rt)
    quantities = [1 + i % 3 for i in range(120)]
    sale, _ = await make_sale(rt, keys=sum(quantities))
    orders = [await buy_and_confirm(rt, sale, channel, qty=q) for q in quantities]

    await asyncio.gather(*(Worker(rt, name=f"w{i}", sale_ids=[sale]).run_burst() for i in range(4)))

    allocated = await keys_by_order(rt, sale)
    rows = await order_rows(rt, sale)
    assert set(allocated) == set(orders)
    assert all(len(allocated[o]) == rows[o]["quantity"] for o in orders)
    all_keys = [k for ks in allocated.values() for k in ks]
    assert len(all_keys) == len(set(all_keys)) == sum(quantities)
    assert await redis_statuses(rt, orders) == {"delivered"}
    assert await rt.redis.xlen(rt.keys.dead_letters(sale)) == 0
    assert await pending(rt, sale) == 0
