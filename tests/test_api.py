"""The HTTP API end to end (in-process ASGI client, real Redis and PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from core.runtime import Runtime
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale, purchase_body


async def buy(
    client: httpx.AsyncClient,
    ch: dict[str, str],
    sale_id: str,
    user: str,
    key: str | None = None,
    **extra: object,
) -> httpx.Response:
    return await client.post(
        f"/v1/sales/{sale_id}/purchase",
        json=purchase_body(user, **extra),
        headers=channel_headers(ch, key or uuid.uuid4().hex),
    )


async def stock_of(client: httpx.AsyncClient, sale_id: str) -> dict[str, int]:
    r = await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    stock: dict[str, int] = r.json()["stock"]
    return stock


async def test_concurrent_buyers_over_http_get_exactly_the_stock(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=25)
    responses = await asyncio.gather(*[buy(client, ch, sale_id, f"buyer-{i}") for i in range(300)])
    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 25
    assert statuses.count(409) == 275
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"sold_out"}
    assert len({r.json()["order_id"] for r in responses if r.status_code == 201}) == 25
    assert await stock_of(client, sale_id) == {
        "total": 25,
        "available": 0,
        "reserved": 25,
        "confirmed": 0,
        "delivered": 0,
        "cancelled": 0,
        "expired": 0,
    }
    assert await runtime.redis.xlen(runtime.keys.events(sale_id)) == 25


async def test_idempotent_retry_and_mismatch(client: httpx.AsyncClient) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=5)
    first = await buy(client, ch, sale_id, "u1", key="retry-me")
    assert first.status_code == 201
    retries = await asyncio.gather(
        *[buy(client, ch, sale_id, "u1", key="retry-me") for _ in range(10)]
    )
    assert {r.status_code for r in retries} == {201}
    assert {r.json()["order_id"] for r in retries} == {first.json()["order_id"]}
    assert all(r.headers.get("idempotent-replayed") == "true" for r in retries)
    other = await buy(client, ch, sale_id, "u2", key="retry-me")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_mismatch"
    # the same key from another channel is another request
    ch2 = await create_channel(client, "other")
    assert (await buy(client, ch2, sale_id, "u2", key="retry-me")).status_code == 201
    # a user trying twice with a new key hits the per-user limit
    again = await buy(client, ch, sale_id, "u1")
    assert again.status_code == 409 and again.json()["code"] == "purchase_limit_exceeded"
    assert (await stock_of(client, sale_id))["reserved"] == 2


async def test_order_lifecycle_and_channel_isolation(client: httpx.AsyncClient) -> None:
    ch, intruder = await create_channel(client), await create_channel(client, "intruder")
    sale_id, _ = await create_sale(client, keys=3, ttl_s=60)
    order = (await buy(client, ch, sale_id, "u1")).json()
    oid = order["order_id"]
    assert order["status"] == "reserved" and order["expires_at"].endswith("Z")
    for method, path, body in [
        ("GET", f"/v1/orders/{oid}", None),
        ("POST", f"/v1/orders/{oid}/confirm", {"payment_ref": "x"}),
        ("POST", f"/v1/orders/{oid}/cancel", None),
    ]:
        r = await client.request(method, path, json=body, headers=channel_headers(intruder))
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    r = await client.get(f"/v1/orders/{oid}", headers=channel_headers(ch))
    assert r.json()["status"] == "reserved" and "card_keys" not in r.json()
    r = await client.post(f"/v1/orders/{oid}/cancel", headers=channel_headers(ch))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await client.post(f"/v1/orders/{oid}/cancel", headers=channel_headers(ch))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await client.post(
        f"/v1/orders/{oid}/confirm", json={"payment_ref": "p"}, headers=channel_headers(ch)
    )
    assert r.status_code == 409 and r.json()["code"] == "order_cancelled"
    assert (await stock_of(client, sale_id))["available"] == 3
    # prepaid: confirmed in the purchase call; confirm is then a no-op
    paid = (await buy(client, ch, sale_id, "u2", payment_ref="pay-2")).json()
    assert paid["status"] == "confirmed"
    r = await client.post(
        f"/v1/orders/{paid['order_id']}/confirm",
        json={"payment_ref": "pay-2"},
        headers=channel_headers(ch),
    )
    assert r.status_code == 202 and r.json()["status"] == "confirmed"
    r = await client.post(f"/v1/orders/{paid['order_id']}/cancel", headers=channel_headers(ch))
    assert r.status_code == 409 and r.json()["code"] == "order_not_cancellable"


async def test_sale_window(client: httpx.AsyncClient) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=1, starts_in_s=3600)
    r = await buy(client, ch, sale_id, "early")
    assert r.status_code == 409 and r.json()["code"] == "sale_not_active"
    assert (await stock_of(client, sale_id))["available"] == 1


async def test_create_sale_is_idempotent_but_not_overwritable(client: httpx.AsyncClient) -> None:
    body = {
        "sale_id": "s-" + uuid.uuid4().hex[:10],
        "sku": "A",
        "name": "A",
        "starts_at": "2030-01-01T00:00:00Z",
        "ends_at": "2030-01-01T01:00:00+01:00",
    }
    r = await client.post("/v1/admin/sales", json=body, headers=ADMIN)
    assert r.status_code == 422  # ends_at is the same instant as starts_at
    body["ends_at"] = "2030-01-01T02:00:00+01:00"
    first = await client.post("/v1/admin/sales", json=body, headers=ADMIN)
    assert first.status_code == 201, first.text
    assert first.json()["per_user_limit"] == 1 and first.json()["reservation_ttl_s"] == 300
    assert (await client.post("/v1/admin/sales", json=body, headers=ADMIN)).status_code == 201
    r = await client.post("/v1/admin/sales", json={**body, "per_user_limit": 3}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["code"] == "sale_exists"
    generated = await client.post(
        "/v1/admin/sales", headers=ADMIN, json={k: v for k, v in body.items() if k != "sale_id"}
    )
    assert generated.status_code == 201 and generated.json()["sale_id"].startswith("s-")
