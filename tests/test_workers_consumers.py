"""Several consumers of one sale in one worker process (worker_consumers_per_sale)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from core.keys import WORKER_GROUP
from core.runtime import Runtime
from core.settings import ConfigError, Settings
from tests.workers_fixtures import (
    buy,
    buy_and_confirm,
    keys_by_order,
    make_channel,
    make_sale,
    order_rows,
    redis_statuses,
)
from workers.consumer import SaleConsumer
from workers.runner import Worker


def crew(runtime: Runtime, consumers: int, batch: int) -> Runtime:
    return dataclasses.replace(
        runtime,
        settings=dataclasses.replace(
            runtime.settings, worker_consumers_per_sale=consumers, worker_batch_size=batch
        ),
    )


async def pending(rt: Runtime, sale_id: str) -> int:
    return int((await rt.redis.xpending(rt.keys.events(sale_id), WORKER_GROUP))["pending"])


async def group_consumers(rt: Runtime, sale_id: str) -> dict[str, int]:
    info: list[dict[str, Any]] = await rt.redis.xinfo_consumers(
        rt.keys.events(sale_id), WORKER_GROUP
    )
    return {str(c["name"]): int(c["pending"]) for c in info}


async def test_consumers_of_one_sale_share_it_without_a_key_twice(runtime: Runtime) -> None:
    rt = crew(runtime, consumers=4, batch=5)  # small batches: one order's events split up
    channel, _ = await make_channel(rt)
    quantities = [1 + i % 3 for i in range(60)]
    sale, _ = await make_sale(rt, keys=sum(quantities) + 1)  # + 1 for the held order
    paid = []
    for i, q in enumerate(quantities):
        if i % 2:
            paid.append(await buy(rt, sale, channel, qty=q, pay=f"pay-{i}"))
        else:  # reserved and confirmed: two events, likely read by two consumers
            paid.append(await buy_and_confirm(rt, sale, channel, qty=q))
    held = await buy(rt, sale, channel, qty=1)

    worker = Worker(rt, name="crew", sale_ids=[sale])
    assert await worker.run_burst() > 0

    # Every consumer of the crew read from the sale's stream, under names of its own.
    assert await group_consumers(rt, sale) == {"crew": 0, "crew/2": 0, "crew/3": 0, "crew/4": 0}
    allocated = await keys_by_order(rt, sale)
    rows = await order_rows(rt, sale)
    assert set(allocated) == set(paid)
    assert all(len(allocated[o]) == rows[o]["quantity"] for o in paid)
    all_keys = [k for ks in allocated.values() for k in ks]
    assert len(all_keys) == len(set(all_keys)) == sum(quantities)
    assert {rows[o]["status"] for o in paid} == {"delivered"}
    assert all(rows[o]["confirmed_at"] is not None for o in paid)
    assert rows[held]["status"] == "reserved"
    assert await redis_statuses(rt, paid) == {"delivered"}
    stock = await rt.ledger.stock(sale)
    assert stock is not None and stock["delivered"] == sum(quantities)
    assert stock["confirmed"] == 0
    assert await pending(rt, sale) == 0
    assert await rt.redis.xlen(rt.keys.dead_letters(sale)) == 0


class Crash(RuntimeError):
    pass


async def test_one_failing_consumer_fails_the_burst_and_loses_nothing(runtime: Runtime) -> None:
    rt = crew(runtime, consumers=3, batch=4)
    channel, _ = await make_channel(rt)
    sale, _ = await make_sale(rt, keys=40)
    orders = [await buy(rt, sale, channel, qty=1, pay=f"p{i}") for i in range(40)]
    commits = 0

    async def crash_on_third(sale_id: str, outcome: object) -> None:
        nonlocal commits
        commits += 1
        if commits == 3:
            raise Crash("killed after commit")

    # The failure itself propagates (not wrapped in an ExceptionGroup); the other consumers
    # are cancelled wherever they are, and what they held stays pending.
    with pytest.raises(Crash):
        await Worker(rt, name="doomed", sale_ids=[sale], after_commit=crash_on_third).run_burst()
    assert await pending(rt, sale) > 0

    await Worker(rt, name="heir", sale_ids=[sale]).run_burst()
    allocated = await keys_by_order(rt, sale)
    assert set(allocated) == set(orders)
    all_keys = [k for ks in allocated.values() for k in ks]
    assert len(all_keys) == len(set(all_keys)) == 40
    assert await redis_statuses(rt, orders) == {"delivered"}
    assert await pending(rt, sale) == 0
    assert await rt.redis.xlen(rt.keys.dead_letters(sale)) == 0


async def test_a_restarted_worker_rereads_the_pending_lists_of_all_its_consumers(
    runtime: Runtime,
) -> None:
    rt = crew(runtime, consumers=2, batch=10)
    channel, _ = await make_channel(rt)
    sale, _ = await make_sale(rt, keys=4)
    orders = [await buy(rt, sale, channel, pay=f"p{i}") for i in range(4)]
    worker = Worker(rt, name="again", sale_ids=[sale])
    stream = rt.keys.events(sale)
    await (await worker.consumer(sale, 0)).ensure_group()
    # Both consumers read without handling (the process died): each holds two entries.
    for index in (0, 1):
        await rt.redis.xreadgroup(WORKER_GROUP, worker.consumer_name(index), {stream: ">"}, count=2)
    assert await group_consumers(rt, sale) == {"again": 2, "again/2": 2}

    # Same names after the restart: each consumer finishes its own entries, no reclaim wait.
    assert await Worker(rt, name="again", sale_ids=[sale]).run_burst() == 4
    assert await redis_statuses(rt, orders) == {"delivered"}
    assert await pending(rt, sale) == 0


def test_consumers_per_sale_setting() -> None:
    env = {
        "FLASHGATE_REDIS_URL": "redis://127.0.0.1:1/0",
        "FLASHGATE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "FLASHGATE_ADMIN_TOKEN": "hB6eak3fLDwfFu-idEGZvjYlNrYS-1DaDjadJjUAPKA",
        "FLASHGATE_MASTER_KEY": "A" * 43 + "=",
    }
    assert Settings.from_env(env).worker_consumers_per_sale == 3
    assert (
        Settings.from_env(
            {**env, "FLASHGATE_WORKER_CONSUMERS_PER_SALE": "1"}
        ).worker_consumers_per_sale
        == 1
    )
    with pytest.raises(ConfigError, match="FLASHGATE_WORKER_CONSUMERS_PER_SALE"):
        Settings.from_env({**env, "FLASHGATE_WORKER_CONSUMERS_PER_SALE": "0"})


async def test_a_partial_batch_lingers_for_more_entries(runtime: Runtime) -> None:
    """worker_linger_ms: a busy consumer's read that finds less than a batch waits, then takes
    what arrived meanwhile into the same PostgreSQL transaction (fewer, larger batches at an
    opening); an idle consumer handles the first entry at once."""
    rt = dataclasses.replace(
        runtime,
        settings=dataclasses.replace(runtime.settings, worker_linger_ms=300, worker_batch_size=100),
    )
    channel, _ = await make_channel(rt)
    sale, _ = await make_sale(rt, keys=5)
    c = SaleConsumer(rt, sale, "linger")
    await c.ensure_group()
    assert await c.step(None) == 0  # nothing pending yet; from now on, new entries
    # Idle: the first order is handled at once, no lingering.
    started = asyncio.get_running_loop().time()
    idle = await buy(rt, sale, channel, qty=1, pay="pay-0")
    assert await c.step(1000) == 1
    assert asyncio.get_running_loop().time() - started < 0.25
    # Busy now (a batch just handled): a partial read waits for more.
    first = await buy(rt, sale, channel, qty=1, pay="pay-1")
    step = asyncio.create_task(c.step(1000))
    await asyncio.sleep(0.1)  # the step has read the first order and lingers
    second = await buy(rt, sale, channel, qty=1, pay="pay-2")
    assert await step == 2  # one batch, both orders
    assert set(await keys_by_order(rt, sale)) == {idle, first, second}
    assert await pending(rt, sale) == 0
