"""Low-stock events (workers/lowstock.py) and the keys-imported counter, on the real Redis and
PostgreSQL: an event happens once per sale and total however many workers look, a restock arms
it again, and the heartbeat loop is what fires it."""

from __future__ import annotations

import asyncio

import httpx

from core import metrics
from core.runtime import Runtime
from tests.conftest import ADMIN, create_sale
from tests.workers_fixtures import buy, import_keys, make_channel, make_sale
from workers import lowstock
from workers import metrics as worker_metrics
from workers.runner import Worker


def value(counter: object, *labels: str) -> float:
    child = counter.labels(*labels) if labels else counter  # type: ignore[attr-defined]
    return float(child._value.get())


async def rows(rt: Runtime, sale_id: str) -> dict[str, dict[str, int]]:
    stock = await rt.ledger.stock(sale_id)
    assert stock is not None
    return {sale_id: stock}


def test_low_is_a_share_of_the_total() -> None:
    assert lowstock.is_low({"total": 100, "available": 9}, 0.1)
    assert not lowstock.is_low({"total": 100, "available": 10}, 0.1)
    assert lowstock.is_low({"total": 5, "available": 0}, 0.1)
    assert not lowstock.is_low({"total": 0, "available": 0}, 0.1)  # no stock yet: new, not low


async def test_each_low_stock_event_happens_once_and_a_restock_rearms_it(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=20)
    before = value(metrics.LOW_STOCK_EVENTS)
    for _ in range(18):
        await buy(runtime, sale, channel)  # 2 of 20 left: 10%, not under it
    assert await lowstock.check(runtime.redis, runtime.keys, await rows(runtime, sale), 0.1) == []
    await buy(runtime, sale, channel)  # 1 of 20 left: under 10%
    seen = await rows(runtime, sale)
    # Eight workers looking at once: one event.
    results = await asyncio.gather(
        *(lowstock.check(runtime.redis, runtime.keys, seen, 0.1) for _ in range(8))
    )
    assert sorted(r for r in results if r) == [[sale]]
    assert await lowstock.check(runtime.redis, runtime.keys, seen, 0.1) == []
    assert value(metrics.LOW_STOCK_EVENTS) - before == 1

    await import_keys(runtime, sale, 10)  # total 30, 11 left: not low
    assert await lowstock.check(runtime.redis, runtime.keys, await rows(runtime, sale), 0.1) == []
    for _ in range(9):
        await buy(runtime, sale, channel)  # 2 of 30 left
    assert await lowstock.check(runtime.redis, runtime.keys, await rows(runtime, sale), 0.1) == [
        sale
    ]
    assert value(metrics.LOW_STOCK_EVENTS) - before == 2


async def test_the_heartbeat_fires_the_event(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=4)
    for _ in range(4):
        await buy(runtime, sale, channel)
    worker = Worker(runtime, name="lowstock-hb", sale_ids=[sale])
    beating = asyncio.create_task(worker_metrics.heartbeat_loop(worker))
    try:
        for _ in range(200):
            if await runtime.redis.hexists(runtime.keys.low_stock(sale), "4"):  # 0 of 4 left
                break
            await asyncio.sleep(0.02)
        assert await runtime.redis.hexists(runtime.keys.low_stock(sale), "4")
    finally:
        worker.request_stop()
        await asyncio.wait_for(beating, 5)


async def test_imports_are_counted_by_result(client: httpx.AsyncClient) -> None:
    sale_id, _ = await create_sale(client)
    before = [value(metrics.KEYS_IMPORTED, r) for r in ("imported", "duplicate", "rejected")]
    r = await client.post(
        f"/v1/admin/sales/{sale_id}/keys",
        headers=ADMIN,
        json={"keys": ["LS-A-0001", "LS-A-0002", "LS-A-0001", "bad\x00key"]},
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    after = [value(metrics.KEYS_IMPORTED, r) for r in ("imported", "duplicate", "rejected")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        doc["imported"],
        doc["duplicates"],
        doc["rejected"],
    ]
    assert doc["imported"] == 2 and doc["duplicates"] + doc["rejected"] == 2
