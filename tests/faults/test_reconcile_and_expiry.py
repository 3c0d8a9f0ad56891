"""Fault 7: reconciliation as a command and a periodic job (drift reported, exported as a
gauge). Fault 6: a sale's end passing with reservations open: they expire with several
sweepers at once and their stock returns exactly once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from core import errors, metrics
from core.ledger import now_ms
from core.reconcile import check
from core.runtime import Runtime
from tests.faults.support import ROOT, audit, child_env
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.metrics import reconcile_current
from workers.runner import Worker
from workers.sweeper import Sweeper


def _drift_gauge(sale: str, kind: str) -> float:
    return float(metrics.RECONCILE_DRIFT.labels(sale, kind)._value.get())  # noqa: SLF001


@pytest.mark.timeout(60)
async def test_reconcile_reports_drift_as_command_and_gauge(frt: Runtime) -> None:
    channel, _ = await make_channel(frt)
    sale, codes = await make_sale(frt, keys=10)
    confirmed = {await buy(frt, sale, channel, pay="pay"): 1 for _ in range(4)}
    await buy(frt, sale, channel)  # one left reserved
    await Worker(frt, sale_ids=[sale]).run_burst()
    await audit(frt, sale, confirmed, codes)
    assert (await reconcile_current(frt.redis, frt.keys, frt.pool))[sale]["stock_total"] == 0
    assert _drift_gauge(sale, "stock_total") == 0

    await frt.redis.hincrby(frt.keys.sale(sale), "total", 1)  # stock no key backs
    report = await check(frt.redis, frt.keys, frt.pool, sale)
    assert report.drift["stock_total"] == 1 and report.drift["ledger_balance"] == 1
    await reconcile_current(frt.redis, frt.keys, frt.pool)
    assert _drift_gauge(sale, "stock_total") == 1 and _drift_gauge(sale, "ledger_balance") == 1
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli.main", "reconcile", sale, "--check"],
        env=child_env(frt.settings),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert not doc["ok"] and doc["drift"]["stock_total"] == 1 and not doc["rebuilt"]
    await frt.redis.hincrby(frt.keys.sale(sale), "total", -1)

    # The periodic job: a worker's heartbeat loop runs it every reconcile_interval_s.
    import dataclasses

    rt = dataclasses.replace(
        frt, settings=dataclasses.replace(frt.settings, reconcile_interval_s=0.2)
    )
    before = metrics.RECONCILE_LAST_RUN._value.get()  # noqa: SLF001
    worker = Worker(rt, sale_ids=[sale])
    running = asyncio.create_task(worker.run())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if metrics.RECONCILE_LAST_RUN._value.get() > before:  # noqa: SLF001
            break
    worker.request_stop()
    await asyncio.wait_for(running, 30)
    assert metrics.RECONCILE_LAST_RUN._value.get() > before  # noqa: SLF001
    assert _drift_gauge(sale, "stock_total") == 0

    # A block-list entry PostgreSQL has and Redis lacks (its Redis write failed): the periodic
    # job exports it as drift; `flashgate reconcile` (durable.sync) repairs it.
    from risk import durable

    await durable.sync(frt.pool, frt.redis, frt.keys, sale, write=True)  # start level
    await reconcile_current(frt.redis, frt.keys, frt.pool)
    assert _drift_gauge(sale, "risk_list_entries") == 0
    await durable.save_list_change(frt.pool, "block", "device", [f"lost-{sale}"], add=True)
    await reconcile_current(frt.redis, frt.keys, frt.pool)
    assert _drift_gauge(sale, "risk_list_entries") == 1
    await durable.sync(frt.pool, frt.redis, frt.keys, sale, write=True)
    await reconcile_current(frt.redis, frt.keys, frt.pool)
    assert _drift_gauge(sale, "risk_list_entries") == 0
    assert f"lost-{sale}" in await frt.redis.smembers(frt.keys.risk_list("block", "device"))


@pytest.mark.timeout(60)
async def test_sale_end_with_open_reservations_returns_stock_once(frt: Runtime) -> None:
    channel, _ = await make_channel(frt)
    sale, codes = await make_sale(frt, keys=50, ttl_ms=300_000)
    now = now_ms()
    await frt.ledger.init_sale(sale, now - 60_000, now + 1_000, 10, 1_500)  # ends in 1 s
    held = [await buy(frt, sale, channel, now=now) for _ in range(30)]
    paid = {await buy(frt, sale, channel, pay="pay", now=now): 1 for _ in range(5)}
    with pytest.raises(errors.SaleNotActive):
        await buy(frt, sale, channel, now=now + 1_000)  # the end passed
    later = now + 1_600  # every reservation's deadline too
    sweepers = [Sweeper(frt.ledger, limit=7) for _ in range(8)]  # 8 workers, small batches
    expired = await asyncio.gather(*(s.sweep_sale(sale, now=later) for s in sweepers))
    assert sum(expired) == 30
    assert sum(await asyncio.gather(*(s.sweep_sale(sale, now=later) for s in sweepers))) == 0
    stock = await frt.ledger.stock(sale)
    assert stock is not None and stock["expired"] == 30 and stock["reserved"] == 0
    assert stock["available"] == 45 and stock["confirmed"] == 5
    events = await frt.redis.xrange(frt.keys.events(sale))
    assert sum(1 for _, f in events if f["t"] == "expired") == 30
    await Worker(frt, sale_ids=[sale]).run_burst()
    rows = await frt.pool.fetch(
        "SELECT status, count(*) FROM orders WHERE order_id = ANY($1) GROUP BY status", held
    )
    assert {r[0]: r[1] for r in rows} == {"expired": 30}
    await audit(frt, sale, paid, codes)
