"""The benchmark's parts that can rot quietly: the output parsers, the ratio arithmetic, and the
bench-only routes (off by default; the naive design answers like the real purchase)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from bench import naive
from bench.parse import median_ratio, parse_redis_benchmark, parse_wrk
from core.settings import Settings
from tests.conftest import ADMIN

WRK = """Running 10s test @ http://127.0.0.1:8000/v1/bench/ping
  2 threads and 64 connections
  Latency Distribution
     50%    3.68ms
     75%    5.00ms
     90%    8.00ms
     99%    1.20s
  171510 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  17151.00
"""


def test_parsers_and_ratios() -> None:
    run = parse_wrk(WRK)
    assert (run.rps, run.p50_ms, run.p99_ms) == (17151.0, 3.68, 1200.0)
    assert (run.requests, run.non2xx, run.socket_errors) == (171510, 7, 3)
    csv = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
           '"p99_latency_ms","max_latency_ms"\n"INCR","155039.00","0.2","0.1","0.20","0.4",'
           '"0.49","1.0"\n')
    r = parse_redis_benchmark(csv)
    assert (r.rps, r.p50_ms, r.p99_ms) == (155039.0, 0.2, 0.49)
    # pair by pair: (10/5, 30/10, 8/8) -> median 2, not median(a)/median(b) = 10/8
    assert median_ratio([10, 30, 8], [5, 10, 8]) == 2.0


@pytest.fixture(scope="module")
async def bench_client(settings: Settings, runtime: object) -> AsyncIterator[httpx.AsyncClient]:
    from gateway.app import create_app
    from risk.engine import AllowAll

    app = create_app(dataclasses.replace(settings, bench_endpoints=True), risk=AllowAll())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            yield c


async def test_bench_routes_are_off_by_default(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/bench/ping")).status_code == 404


async def test_naive_purchase_decrements_one_row(bench_client: httpx.AsyncClient,
                                                 database_url: str) -> None:
    assert (await bench_client.get("/v1/bench/ping")).json() == {"ok": True}
    r = await bench_client.post("/v1/admin/channels", json={"name": "b"}, headers=ADMIN)
    key = r.json()["api_key"]
    sale_id = "nb-" + uuid.uuid4().hex[:8]
    await naive.create_sale(database_url, sale_id, stock=2, per_user_limit=1, ttl_ms=60_000)
    path = f"/v1/bench/naive/{sale_id}/purchase"

    async def buy(user: str, idem: str) -> httpx.Response:
        return await bench_client.post(path, json={
            "user_id": user, "client_ip": "203.0.113.9", "device_id": "d"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem})

    first = await buy("u1", "k1")
    assert first.status_code == 201 and first.json()["order_id"].startswith(sale_id + ".")
    replay = await buy("u1", "k1")
    assert replay.json()["order_id"] == first.json()["order_id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert (await buy("u1", "k2")).json()["code"] == "purchase_limit_exceeded"
    assert (await buy("u2", "k3")).status_code == 201
    assert (await buy("u3", "k4")).json()["code"] == "sold_out"
