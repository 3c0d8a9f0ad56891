"""Issue #11.10: a large key import must not stall the gateway that serves purchases.

Replayed against a real gateway (uvicorn + uvloop in a child process): while 150k keys import,
/healthz and purchases keep answering fast, and every key lands exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from tests.conftest import new_sale_id, rfc3339
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401 - the fixture

KEYS = 200_000


async def _sale(c: httpx.AsyncClient, admin: dict[str, str]) -> str:
    sale_id, now = new_sale_id(), datetime.now(UTC)
    r = await c.post(
        "/v1/admin/sales",
        headers=admin,
        json={
            "sale_id": sale_id,
            "sku": "SKU-L",
            "name": "Large import",
            "starts_at": rfc3339(now - timedelta(seconds=1)),
            "ends_at": rfc3339(now + timedelta(hours=1)),
        },
    )
    assert r.status_code == 201, r.text
    return sale_id


async def _timed(
    c: httpx.AsyncClient, method: str, path: str, out: list[float], **kwargs: object
) -> httpx.Response:
    start = time.perf_counter()
    r = await c.request(method, path, **kwargs)  # type: ignore[arg-type]
    out.append(time.perf_counter() - start)
    return r


async def _finished(
    c: httpx.AsyncClient,
    admin: dict[str, str],
    r: httpx.Response,
) -> dict[str, object]:
    """The import's result: at once (200), or polled from its job (202)."""
    if r.status_code == 200:
        return dict(r.json())
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    while True:
        job = (await c.get(location, headers=admin)).json()
        if job["status"] != "running":
            return dict(job)
        await asyncio.sleep(0.1)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_large_import_keeps_the_gateway_responsive(live_gateway: LiveGateway) -> None:  # noqa: F811
    admin = live_gateway.admin
    async with httpx.AsyncClient(base_url=live_gateway.url, timeout=60) as c:
        shop = await _sale(c, admin)
        r = await c.post(
            f"/v1/admin/sales/{shop}/keys",
            headers=admin,
            json={"keys": [f"SHOP-{secrets.token_hex(8)}" for _ in range(1000)]},
        )
        assert r.status_code == 200, r.text
        big = await _sale(c, admin)
        tag = secrets.token_hex(4)
        body = "".join(f"BIG-{tag}-{i:07d}\n" for i in range(KEYS)) + f"BIG-{tag}-0000000\n"

        health: list[float] = []
        buys: list[float] = []
        done = asyncio.Event()

        async def probe_health() -> None:
            while not done.is_set():
                r = await _timed(c, "GET", "/healthz", health)
                assert r.status_code == 200
                await asyncio.sleep(0.02)

        async def probe_purchases() -> None:
            n = 0
            while not done.is_set():
                n += 1
                r = await _timed(
                    c,
                    "POST",
                    f"/v1/sales/{shop}/purchase",
                    buys,
                    headers={**live_gateway.channel, "Idempotency-Key": f"{tag}-{n}"},
                    json={
                        "user_id": f"u-{tag}-{n}",
                        "device_id": f"d-{n}",
                        "client_ip": f"198.51.{n // 250}.{n % 250 + 1}",
                    },
                )
                assert r.status_code == 201, r.text
                await asyncio.sleep(0.02)

        probers = [asyncio.create_task(probe_health()), asyncio.create_task(probe_purchases())]
        await asyncio.sleep(0.3)  # a baseline before the import starts
        start = time.perf_counter()
        r = await c.post(
            f"/v1/admin/sales/{big}/keys",
            content=body.encode(),
            headers={**admin, "Content-Type": "text/plain"},
        )
        result = await _finished(c, admin, r)
        took = time.perf_counter() - start
        done.set()
        await asyncio.gather(*probers)

    print(
        f"\nimport of {KEYS} keys: {took:.1f} s; /healthz n={len(health)} "
        f"median={statistics.median(health) * 1000:.1f} ms p99={_p(health, 0.99) * 1000:.1f} ms "
        f"max={max(health) * 1000:.1f} ms; purchase n={len(buys)} "
        f"median={statistics.median(buys) * 1000:.1f} ms p99={_p(buys, 0.99) * 1000:.1f} ms "
        f"max={max(buys) * 1000:.1f} ms"
    )
    assert (result["imported"], result["duplicates"], result["rejected"]) == (KEYS, 1, 0)
    assert result["stock_total"] == KEYS
    conn = await asyncpg.connect(live_gateway.database_url)
    try:
        n, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT fingerprint) FROM card_keys WHERE sale_id = $1", big
        )
    finally:
        await conn.close()
    assert n == distinct == KEYS
    assert _p(health, 0.99) < 0.2 and max(health) < 0.5
    assert _p(buys, 0.99) < 0.2 and max(buys) < 0.5
