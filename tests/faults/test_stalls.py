"""Fault 5: connections that stall (bytes stop, nothing closes) or are cut, through a TCP proxy:
gateway <-> Redis answers 503 problem+json with Retry-After within the configured timeout;
worker <-> PostgreSQL batches time out, are logged and retried, and catch up. Never a hang."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from core import metrics
from core.embedded import ServiceURLs
from core.runtime import Runtime
from tests.conftest import channel_headers, create_channel, create_sale, purchase_body
from tests.faults.conftest import app_client, fault_settings
from tests.faults.support import TcpProxy, audit, wait_quiescent
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.runner import Worker

REDIS_TIMEOUT_S = 0.5
DB_TIMEOUT_S = 1.0


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


@pytest.fixture
async def redis_proxy(service_urls: ServiceURLs) -> AsyncIterator[TcpProxy]:
    target = urlsplit(service_urls.redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


async def _timed_purchase(
    client: httpx.AsyncClient, channel: dict[str, str], sale: str, i: int
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await client.post(
        f"/v1/sales/{sale}/purchase",
        json=purchase_body(f"u{i}"),
        headers=channel_headers(channel, f"k{i}"),
    )
    return r, time.monotonic() - started


@pytest.mark.timeout(60)
async def test_gateway_redis_stall_answers_503_within_the_timeout(
    redis_proxy: TcpProxy, service_urls: ServiceURLs, faults_database: str
) -> None:
    settings = fault_settings(
        via(service_urls.redis_url, redis_proxy.port),
        faults_database,
        FLASHGATE_REDIS_TIMEOUT_S=str(REDIS_TIMEOUT_S),
    )
    direct = await Runtime.open(
        fault_settings(service_urls.redis_url, faults_database, prefix=settings.key_prefix)
    )
    app, client = await app_client(settings)
    try:
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            channel = await create_channel(client)
            sale, codes = await create_sale(client, keys=40)
            before = [await _timed_purchase(client, channel, sale, i) for i in range(5)]
            assert all(r.status_code == 201 for r, _ in before)

            redis_proxy.pause()
            stalled = await asyncio.gather(
                *(_timed_purchase(client, channel, sale, i) for i in range(5, 25))
            )
            started = time.monotonic()
            ready = await client.get("/readyz")
            ready_s = time.monotonic() - started
            redis_proxy.resume()
            for r, took in stalled:
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["code"] == "service_unavailable" and r.headers["retry-after"]
                assert took < REDIS_TIMEOUT_S + 0.5, took
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
            assert ready_s < 2.5

            redis_proxy.cut()  # dropped, not stalled: fails at once, the next call reconnects
            cut = [await _timed_purchase(client, channel, sale, i) for i in range(25, 27)]
            assert all(r.status_code in (201, 503) for r, _ in cut)
            # Every client retries with its Idempotency-Key: one order per key, at most.
            after = [await _timed_purchase(client, channel, sale, i) for i in range(5, 40)]
            assert all(r.status_code in (201, 409) for r, _ in after), [
                r.text for r, _ in after if r.status_code not in (201, 409)
            ]
            orders = {r.json()["order_id"] for r, _ in [*before, *after] if r.status_code == 201}
            await Worker(direct).run_burst()
            stock = await direct.ledger.stock(sale)
            assert stock is not None and stock["reserved"] == len(orders) == 40 - stock["available"]
            print(
                "FAULT5-REDIS",
                json.dumps(
                    {
                        "stalled_requests": len(stalled),
                        "max_s": round(max(t for _, t in stalled), 3),
                        "timeout_s": REDIS_TIMEOUT_S,
                        "readyz_s": round(ready_s, 3),
                        "orders_after_retries": len(orders),
                    }
                ),
            )
            _ = codes
    finally:
        await client.aclose()
        await direct.close()


@pytest.mark.timeout(60)
async def test_worker_postgres_stall_times_out_and_catches_up(
    frt: Runtime, service_urls: ServiceURLs, faults_database: str
) -> None:
    target = urlsplit(faults_database)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    settings = fault_settings(
        service_urls.redis_url,
        via(faults_database, proxy.port),
        prefix=frt.settings.key_prefix,
        FLASHGATE_DB_TIMEOUT_S=str(DB_TIMEOUT_S),
    )
    wrt = await Runtime.open(settings)
    worker = Worker(wrt)
    running = asyncio.create_task(worker.run())
    try:
        channel, _ = await make_channel(frt)
        sale, codes = await make_sale(frt, keys=60)
        confirmed = {await buy(frt, sale, channel, pay="pay"): 1 for _ in range(10)}
        await wait_quiescent(frt, sale, confirmed, timeout_s=30)
        failed = metrics.WORKER_BATCHES.labels("failed")
        failed_before = failed._value.get()  # noqa: SLF001

        proxy.pause()
        stalled_at = time.monotonic()
        confirmed.update({await buy(frt, sale, channel, pay="pay"): 1 for _ in range(30)})
        while failed._value.get() == failed_before:  # noqa: SLF001
            assert time.monotonic() - stalled_at < 2 * DB_TIMEOUT_S + 1, "the batch hung"
            await asyncio.sleep(0.05)
        first_failure_s = time.monotonic() - stalled_at
        await asyncio.sleep(1.0)
        proxy.resume()
        await wait_quiescent(frt, sale, confirmed, timeout_s=30)
        result = await audit(frt, sale, confirmed, codes)
        print(
            "FAULT5-PG",
            json.dumps(
                {
                    "first_failure_s": round(first_failure_s, 2),
                    "timeout_s": DB_TIMEOUT_S,
                    "failed_batches": failed._value.get() - failed_before,  # noqa: SLF001
                    "delivered": result.keys_delivered,
                }
            ),
        )
    finally:
        proxy.resume()
        worker.request_stop()
        await asyncio.wait_for(running, 40)
        await wrt.close()
        await proxy.close()
