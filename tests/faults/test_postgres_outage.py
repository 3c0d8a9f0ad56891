"""Fault 3: PostgreSQL stopped for a few seconds during a sale, then started again. The gateway
keeps selling (orders wait in the streams), /readyz says postgres is down meanwhile (and stays
200: readiness needs Redis only), the workers' batches fail and back off, then catch up: nothing
lost."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from core import metrics
from core.embedded import EmbeddedPostgres, ServiceURLs
from core.runtime import Runtime
from tests.conftest import channel_headers, create_channel, create_sale, purchase_body
from tests.faults.conftest import app_client, fault_settings
from tests.faults.support import audit, wait_quiescent
from workers.runner import Worker


def _failed_batches() -> float:
    return float(metrics.WORKER_BATCHES.labels("failed")._value.get())  # noqa: SLF001


@pytest.mark.timeout(120)
async def test_postgres_stopped_mid_sale_loses_nothing(service_urls: ServiceURLs) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-pg-"))  # as core.embedded does
    pg = EmbeddedPostgres(run_dir)
    pg.start()
    settings = fault_settings(service_urls.redis_url, pg.url, FLASHGATE_DB_TIMEOUT_S="2")
    app, client = await app_client(settings)
    rt = await Runtime.open(settings)
    worker = Worker(rt)
    running = None
    try:
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            running = asyncio.create_task(worker.run())
            channel = await create_channel(client)
            sale, codes = await create_sale(client, keys=200)

            async def buy(i: int) -> str:
                r = await client.post(
                    f"/v1/sales/{sale}/purchase",
                    json=purchase_body(f"u{i}", payment_ref="pay"),
                    headers=channel_headers(channel, f"k{i}"),
                )
                assert r.status_code == 201, r.text
                return str(r.json()["order_id"])

            confirmed = {await buy(i): 1 for i in range(30)}
            await wait_quiescent(rt, sale, confirmed, timeout_s=30)
            failed_before = _failed_batches()

            pg.stop()  # fast shutdown: every connection of the pool is gone
            down_at = time.monotonic()
            r = await client.get("/readyz")  # still ready: purchases need only Redis
            assert r.status_code == 200 and r.json()["checks"]["postgres"] != "ok", r.text
            during = [await buy(i) for i in range(30, 120)]  # sold from Redis alone
            confirmed.update(dict.fromkeys(during, 1))
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))
            lag = await rt.redis.xinfo_groups(rt.keys.events(sale))
            waiting = sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in lag)
            assert waiting >= 1  # the orders wait in the stream
            delivered_during = await rt.redis.hget(rt.keys.sale(sale), "delivered")
            pg.start()  # same port, same data
            outage_s = time.monotonic() - down_at

            await wait_quiescent(rt, sale, confirmed, timeout_s=60)
            r = await client.get("/readyz")
            assert r.status_code == 200, r.text
            failed = _failed_batches() - failed_before
            assert failed >= 1  # the workers noticed, backed off and retried
            result = await audit(rt, sale, confirmed, codes)
            print(
                "FAULT3",
                json.dumps(
                    {
                        "outage_s": round(outage_s, 1),
                        "sold_during": 90,
                        "delivered_during": int(delivered_during or 0),
                        "failed_batches": failed,
                        "waiting_in_stream": waiting,
                        "delivered": result.keys_delivered,
                    }
                ),
            )
    finally:
        worker.request_stop()
        if running is not None:
            await asyncio.wait_for(running, 40)
        await client.aclose()
        await rt.close()
        pg.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
