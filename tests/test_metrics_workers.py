"""Worker metrics (workers/metrics.py): batches, deliveries, dead letters, expiry, the metrics
port, the heartbeat key and `flashgate worker-check`."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import httpx
import pytest
import redis as sync_redis

from cli.main import main as cli_main
from core import metrics
from core.embedded import free_port
from core.runtime import Runtime
from core.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.workers_fixtures import buy, make_channel, make_sale
from workers import metrics as worker_metrics
from workers.runner import Worker
from workers.sweeper import Sweeper


def sample(counter: Any, *labels: str) -> float:
    metric = counter.labels(*labels) if labels else counter
    if hasattr(metric, "_sum"):  # histogram: number of observations
        return sum(b.get() for b in metric._buckets)
    return float(metric._value.get())


async def test_batches_deliveries_and_expiry_are_counted(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=3, ttl_ms=1)
    before = (
        sample(metrics.ORDERS_DELIVERED),
        sample(metrics.DELIVERY_LATENCY),
        sample(metrics.WORKER_BATCH_SIZE),
        sample(metrics.RESERVATIONS_EXPIRED),
    )
    for i in range(2):
        await buy(runtime, sale, channel, pay=f"pay-{i}")  # confirmed at reservation
    assert await Worker(runtime, sale_ids=[sale]).run_burst() > 0
    await buy(runtime, sale, channel)
    await asyncio.sleep(0.01)
    assert await Sweeper(runtime.ledger).sweep([sale]) == 1
    after = (
        sample(metrics.ORDERS_DELIVERED),
        sample(metrics.DELIVERY_LATENCY),
        sample(metrics.WORKER_BATCH_SIZE),
        sample(metrics.RESERVATIONS_EXPIRED),
    )
    assert after[0] - before[0] == 2 and after[1] - before[1] == 2
    assert after[2] > before[2]
    assert after[3] - before[3] == 1


def test_dead_letter_reasons_are_a_closed_set() -> None:
    assert worker_metrics.dead_letter_reason("malformed: missing field 'qty'") == "malformed"
    assert worker_metrics.dead_letter_reason("delivered too many times") == "too_many_deliveries"
    assert worker_metrics.dead_letter_reason("no keys left for order x.123") == "rejected"


async def test_metrics_port_serves_the_worker_metrics_and_liveness(runtime: Runtime) -> None:
    worker = Worker(runtime, sale_ids=[])
    server = await worker_metrics.serve(worker, free_port(), "127.0.0.1")
    assert server is not None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert "flashgate_worker_batch_duration_seconds_bucket" in r.text
            r = await client.get("/healthz")
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert (await client.get("/nope")).status_code == 404
    finally:
        await server.stop()
    assert await worker_metrics.serve(worker, 0) is None


async def test_heartbeat_key_lives_while_the_worker_runs(runtime: Runtime) -> None:
    worker = Worker(runtime, name=f"{socket.gethostname()}-hb-test", sale_ids=[])
    task = asyncio.create_task(worker_metrics.heartbeat_loop(worker))
    key = runtime.keys.worker_heartbeat(worker.name)
    for _ in range(100):
        if await runtime.redis.exists(key):
            break
        await asyncio.sleep(0.02)
    assert 0 < await runtime.redis.ttl(key) <= worker_metrics.HEARTBEAT_TTL_S
    assert worker.name in await worker_metrics.alive_workers(runtime.redis, runtime.keys)
    assert metrics.WORKER_HEARTBEAT._value.get() > 0
    worker.request_stop()
    await asyncio.wait_for(task, 5)
    assert not await runtime.redis.exists(key)


def test_worker_check_exits_0_with_a_live_worker_else_1(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "FLASHGATE_REDIS_URL": settings.redis_url,
        "FLASHGATE_DATABASE_URL": settings.database_url.reveal(),
        "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLASHGATE_MASTER_KEY": os.environ.get("FLASHGATE_MASTER_KEY")
        or "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "FLASHGATE_KEY_PREFIX": settings.key_prefix + "c",
    }  # a prefix no other test uses
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    key = f"{env['FLASHGATE_KEY_PREFIX']}:workers:hb:{socket.gethostname()}-4242"
    client = sync_redis.Redis.from_url(settings.redis_url)
    try:
        with pytest.raises(SystemExit) as none_alive:
            cli_main(["worker-check"])
        assert none_alive.value.code == 1
        client.set(key, 1, ex=30)
        with pytest.raises(SystemExit) as alive:
            cli_main(["worker-check"])
        assert alive.value.code == 0
    finally:
        client.delete(key)
        client.close()


async def test_audit_finds_oversold_units_and_extra_keys(runtime: Runtime) -> None:
    channel, _ = await make_channel(runtime)
    sale, _ = await make_sale(runtime, keys=3)
    order = await buy(runtime, sale, channel, pay="pay-a")
    await Worker(runtime, sale_ids=[sale]).run_burst()
    assert await worker_metrics.audit(runtime.pool, [sale]) == {"oversold": 0, "duplicate_keys": 0}
    assert metrics.INVARIANT_VIOLATIONS.labels("oversold")._value.get() == 0
    # A free key handed to the delivered order too: more keys than it bought.
    await runtime.pool.execute(
        "UPDATE card_keys SET order_id = $2 WHERE key_id = (SELECT min(key_id) FROM card_keys"
        " WHERE sale_id = $1 AND order_id IS NULL)",
        sale,
        order,
    )
    # An order row for more units than the sale has keys.
    await runtime.pool.execute(
        "INSERT INTO orders (order_id, sale_id, channel_id, user_id, quantity, status,"
        " reserved_at) SELECT $2, sale_id, channel_id, 'u-x', 5, 'confirmed', now()"
        " FROM orders WHERE order_id = $1",
        order,
        order + "X",
    )
    found = await worker_metrics.audit(runtime.pool, [sale])
    assert found == {"oversold": 3, "duplicate_keys": 1}
    assert metrics.INVARIANT_VIOLATIONS.labels("duplicate_keys")._value.get() == 1
    await worker_metrics.audit(runtime.pool, [])  # no sale: nothing broken, gauges back to 0
    assert metrics.INVARIANT_VIOLATIONS.labels("duplicate_keys")._value.get() == 0
