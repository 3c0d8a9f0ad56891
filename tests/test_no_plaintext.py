"""After a small sale (import, purchases, confirm, delivery, reveal, refund, and a few errors) no
plaintext card key is anywhere but in the reveal responses: not in any PostgreSQL table or
column, any Redis key or value, the gateway's or workers' logs, /metrics, or any other body.
"""

from __future__ import annotations

import logging
import uuid

import httpx
import pytest
from redis.asyncio import Redis

from core.logging import JsonFormatter
from core.runtime import Runtime
from gateway.routes.metrics import metrics_app
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale, purchase_body
from workers.runner import Worker


def needles(codes: list[str]) -> list[bytes]:
    """Each code as text, and as PostgreSQL prints bytea (hex)."""
    return [c.encode() for c in codes] + [c.encode().hex().encode() for c in codes]


async def postgres_hits(rt: Runtime, codes: list[str]) -> list[str]:
    patterns = ["%" + n.decode() + "%" for n in needles(codes)]
    tables = await rt.pool.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    assert {"card_keys", "orders", "key_events", "webhook_outbox", "data_keys"} <= {
        t["table_name"] for t in tables
    }
    hits = []
    for t in tables:
        name = t["table_name"]
        n = await rt.pool.fetchval(
            f'SELECT count(*) FROM "{name}" AS row WHERE row::text LIKE ANY($1::text[])', patterns
        )
        if n:
            hits.append(f"{name}: {n} row(s)")
    return hits


async def redis_hits(url: str, codes: list[str]) -> list[str]:
    found = needles(codes)
    raw = Redis.from_url(url)  # bytes in, bytes out
    hits = []
    try:
        async for key in raw.scan_iter(count=1000):
            kind = (await raw.type(key)).decode()
            values: list[bytes] = [key]
            if kind == "string":
                values.append(await raw.get(key) or b"")
            elif kind == "hash":
                values += [b for kv in (await raw.hgetall(key)).items() for b in kv]
            elif kind == "set":
                values += list(await raw.smembers(key))
            elif kind == "zset":
                values += list(await raw.zrange(key, 0, -1))
            elif kind == "list":
                values += list(await raw.lrange(key, 0, -1))
            elif kind == "stream":
                values += [
                    b for _, fields in await raw.xrange(key) for kv in fields.items() for b in kv
                ]
            values.append(await raw.dump(key) or b"")
            if any(n in v for v in values for n in found):
                hits.append(key.decode(errors="replace"))
    finally:
        await raw.aclose()
    return hits


async def test_no_plaintext_card_key_anywhere(
    client: httpx.AsyncClient, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[tuple[str, bytes]] = []  # every response but the reveals

    async def call(method: str, path: str, **kw: object) -> httpx.Response:
        r = await client.request(method, path, **kw)  # type: ignore[arg-type]
        bodies.append((f"{method} {path} {r.status_code}", r.content))
        return r

    ch = await create_channel(client, webhook_url="http://127.0.0.1:9/hooks")
    other = await create_channel(client, "other")
    sale_id, codes = await create_sale(client, keys=4)
    # Imports that fail or repeat: never an echo of a code.
    await call(
        "POST",
        f"/v1/admin/sales/{sale_id}/keys",
        headers=ADMIN,
        json={"keys": [codes[0], codes[1]]},
    )  # duplicates
    await call(
        "POST", f"/v1/admin/sales/{sale_id}/keys", headers=ADMIN, json={"keys": [codes[2], 5]}
    )
    await call(
        "POST",
        f"/v1/admin/sales/{sale_id}/keys",
        headers={**ADMIN, "Content-Type": "text/csv"},
        content=f"serial\n{codes[3]}\n",
    )
    await call(
        "POST",
        f"/v1/admin/sales/{sale_id}/keys",
        headers={**ADMIN, "Content-Type": "text/plain"},
        content=f"{codes[1]}\x07bell\n".encode(),
    )

    orders = []
    for i in range(5):
        r = await call(
            "POST",
            f"/v1/sales/{sale_id}/purchase",
            json=purchase_body(f"u{i}"),
            headers=channel_headers(ch, uuid.uuid4().hex),
        )
        if r.status_code == 201:
            orders.append(r.json()["order_id"])
    assert len(orders) == 4  # the fifth is sold out
    for order in orders[:3]:
        await call(
            "POST",
            f"/v1/orders/{order}/confirm",
            headers=channel_headers(ch),
            json={"payment_ref": "pay-" + order[-4:]},
        )
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    revealed = []
    for order in orders[:3]:
        r = await client.get(f"/v1/orders/{order}", headers=channel_headers(ch))
        revealed += r.json()["card_keys"]
    assert set(revealed) <= set(codes) and len(revealed) == 3
    await call("POST", f"/v1/orders/{orders[0]}/refund", headers=channel_headers(ch))
    await call("POST", f"/v1/orders/{orders[3]}/refund", headers=channel_headers(ch))
    await call("POST", f"/v1/orders/{orders[1]}/refund", headers=channel_headers(other))
    await call(
        "POST",
        f"/v1/orders/{orders[0]}/confirm",
        headers=channel_headers(ch),
        json={"payment_ref": "again"},
    )
    await call("GET", f"/v1/orders/{orders[0]}", headers=channel_headers(ch))
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    await call("GET", f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    metrics_port = httpx.ASGITransport(app=metrics_app(runtime, 0.0))  # its private port
    async with httpx.AsyncClient(transport=metrics_port, base_url="http://metrics.test") as m:
        r = await m.get("/metrics")
        bodies.append((f"GET /metrics (metrics port) {r.status_code}", r.content))
    assert sum(1 for what, _ in bodies if " 4" in what) >= 4  # errors were returned

    found = needles(codes)
    assert [what for what, body in bodies if any(n in body for n in found)] == []
    assert await postgres_hits(runtime, codes) == []
    assert await redis_hits(runtime.settings.redis_url, codes) == []
    formatter = JsonFormatter()
    logs = "\n".join([caplog.text, *(formatter.format(r) for r in caplog.records)]).encode()
    assert caplog.records  # the gateway and workers did log
    assert not any(n in logs for n in found)
    # The scanners do find what is there: the sale id is in both stores, in plain text.
    assert "card_keys: 4 row(s)" in await postgres_hits(runtime, [sale_id])
    assert await redis_hits(runtime.settings.redis_url, [sale_id])
