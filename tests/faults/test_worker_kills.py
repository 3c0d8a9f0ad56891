"""Fault 1: worker processes (real `flashgate worker`) SIGKILLed at random points during a
sale, and one crashing right between the PostgreSQL commit and the ack (the
FLASHGATE_FAULT_AFTER_COMMIT hook), each restarted: every confirmed order is delivered exactly
once. Fault 6 (expiry at the sale's end with several sweepers) is at the end of this file."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from cli.stack import Child
from core import errors
from core.runtime import Runtime
from tests.faults.support import (
    audit,
    child_env,
    imports_this_tree,
    kill,
    start_worker,
    stop_all,
    wait_quiescent,
)
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.faults import FAULT_EXIT_CODE


async def _pg_vs_redis_delivered(rt: Runtime, sale: str) -> tuple[int, int]:
    pg = await rt.pool.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM orders WHERE sale_id = $1 AND status = 'delivered'",
        sale,
    )
    stock = await rt.ledger.stock(sale) or {}
    return int(pg), int(stock.get("delivered", 0))


async def run_worker_kills(
    rt: Runtime, log_dir: Path, *, seconds: float, keys: int, seed: int
) -> Counter[str]:
    rng = random.Random(seed)
    channel, _ = await make_channel(rt)
    sale, codes = await make_sale(rt, keys=keys, per_user_limit=3)
    env = child_env(rt.settings, FLASHGATE_WORKER_BATCH_SIZE="16")
    assert imports_this_tree(env)
    hook_env = {**env, "FLASHGATE_FAULT_AFTER_COMMIT": "exit"}
    stats: Counter[str] = Counter()
    spawned = 0

    def spawn(kind: str) -> Child:
        nonlocal spawned
        spawned += 1
        e = env
        if kind == "hook":
            e = {**hook_env, "FLASHGATE_FAULT_AFTER_COMMIT_BATCH": str(rng.randint(1, 3))}
        return start_worker(e, log_dir, f"{kind}-{spawned}")

    workers = {"a": spawn("plain"), "b": spawn("plain"), "hook": spawn("hook")}
    everyone: list[Child] = list(workers.values())
    confirmed: dict[str, int] = {}
    selling = True

    async def sell() -> None:
        nonlocal selling
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            qty, kind = rng.choice((1, 1, 1, 2)), rng.random()
            try:
                if kind < 0.45:  # paid in the purchase call
                    confirmed[await buy(rt, sale, channel, qty=qty, pay="pay-now")] = qty
                    continue
                order_id = await buy(rt, sale, channel, qty=qty)
                if kind < 0.85:
                    await rt.ledger.confirm(sale, order_id, channel, "pay-later")
                    confirmed[order_id] = qty
                elif kind < 0.93:
                    await rt.ledger.cancel(sale, order_id, channel)
                    stats["cancelled"] += 1
                else:
                    stats["left_reserved"] += 1
            except (errors.SoldOut, errors.InsufficientStock):
                stats["sold_out_answers"] += 1
            await asyncio.sleep(0.012)
        selling = False

    async def chaos() -> None:
        next_kill = time.monotonic() + rng.uniform(0.4, 1.2)
        while selling:
            await asyncio.sleep(0.02)
            hook = workers["hook"]
            if hook.proc.poll() is not None:  # the hook fired: just after a commit, no ack
                assert hook.proc.returncode == FAULT_EXIT_CODE, hook.tail()
                pg, redis = await _pg_vs_redis_delivered(rt, sale)
                stats["hook_exits"] += 1
                stats["hook_exits_with_pg_ahead"] += int(pg > redis)
                workers["hook"] = spawn("hook")
                everyone.append(workers["hook"])
            if time.monotonic() >= next_kill:
                slot = rng.choice(("a", "b"))  # the hook worker has a crash of its own
                kill(workers[slot])
                stats["sigkills"] += 1
                workers[slot] = spawn("plain")
                everyone.append(workers[slot])
                next_kill = time.monotonic() + rng.uniform(0.4, 1.2)

    try:
        await asyncio.gather(sell(), chaos())
        kill(workers["hook"])  # the rest of the run without the hook
        workers["hook"] = spawn("plain")
        everyone.append(workers["hook"])
        await wait_quiescent(rt, sale, confirmed, timeout_s=60)
    finally:
        stop_all(everyone)
    result = await audit(rt, sale, confirmed, codes)
    stats.update(
        processes=spawned,
        confirmed_orders=result.confirmed_orders,
        units_delivered=result.units,
        keys=keys,
    )
    return stats


@pytest.mark.timeout(120)
async def test_workers_killed_mid_sale_deliver_every_order_exactly_once(
    frt: Runtime, tmp_path: Path
) -> None:
    stats = await run_worker_kills(frt, tmp_path, seconds=7.0, keys=400, seed=6)
    print("FAULT1", json.dumps(stats))
    assert stats["sigkills"] >= 4, stats
    assert stats["hook_exits"] >= 2, stats
    assert stats["hook_exits_with_pg_ahead"] >= 1, stats  # died between commit and ack
    assert stats["confirmed_orders"] >= 100, stats


@pytest.mark.chaos
@pytest.mark.timeout(900)
async def test_chaos_workers_killed_for_a_minute(frt: Runtime, tmp_path: Path) -> None:
    seconds = float(os.environ.get("FLASHGATE_CHAOS_S", "60"))
    stats = await run_worker_kills(
        frt,
        tmp_path,
        seconds=seconds,
        keys=int(seconds * 80),
        seed=int(os.environ.get("FLASHGATE_CHAOS_SEED", "7")),
    )
    print("CHAOS1", json.dumps(stats))
    assert stats["sigkills"] >= seconds / 2 and stats["hook_exits"] >= 3, stats
