"""Bad input on every endpoint: the right 4xx, problem+json with a stable code, nothing changed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from core.runtime import Runtime
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale, purchase_body


async def snapshot(runtime: Runtime, sale_id: str) -> tuple[Any, ...]:
    r, k = runtime.redis, runtime.keys
    counts = await runtime.pool.fetchrow(
        "SELECT (SELECT count(*) FROM channels) c, (SELECT count(*) FROM sales) s,"
        " (SELECT count(*) FROM card_keys) k, (SELECT count(*) FROM key_imports) i"
    )
    return (
        await r.hgetall(k.sale(sale_id)),
        await r.xlen(k.events(sale_id)),
        await r.hgetall(k.buyers(sale_id)),
        await r.hlen(k.idempotency(sale_id)),
        tuple(counts),
    )


@pytest.fixture
async def world(client: httpx.AsyncClient) -> dict[str, Any]:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=3)
    r = await client.post(
        f"/v1/sales/{sale_id}/purchase",
        json=purchase_body("owner"),
        headers=channel_headers(ch, "k-owner"),
    )
    return {"ch": ch, "sale_id": sale_id, "order_id": r.json()["order_id"]}


def cases(w: dict[str, Any]) -> list[tuple[str, str, dict[str, str], Any, int, str]]:
    sale, order, ch = w["sale_id"], w["order_id"], w["ch"]
    buy = f"/v1/sales/{sale}/purchase"
    store = channel_headers(ch, "k-" + uuid.uuid4().hex)
    good = purchase_body("someone")
    return [
        # (method, path, headers, body (dict = JSON, str/bytes = raw), status, code)
        ("POST", buy, {"Idempotency-Key": "k"}, good, 401, "unauthorized"),
        (
            "POST",
            buy,
            {"Authorization": "Bearer nope", "Idempotency-Key": "k"},
            good,
            401,
            "unauthorized",
        ),
        ("POST", buy, {"Authorization": "Basic abc"}, good, 401, "unauthorized"),
        ("POST", buy, channel_headers(ch), good, 422, "invalid_request"),  # no Idempotency-Key
        ("POST", buy, channel_headers(ch, "x" * 200), good, 422, "invalid_request"),
        ("POST", buy, store, "{not json", 400, "malformed_request"),
        ("POST", buy, store, b"\xff\xfe", 400, "malformed_request"),
        ("POST", buy, store, "[]", 422, "invalid_request"),
        ("POST", buy, store, {"client_ip": "1.2.3.4", "device_id": "d"}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "quantity": 0}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "quantity": 1000}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "quantity": "1"}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "user_id": "a b"}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "user_id": "u\x00"}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "user_id": "x" * 129}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "user_id": "用户"}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "admin": True}, 422, "invalid_request"),
        ("POST", buy, store, {**good, "user_agent": "u" * 600}, 422, "invalid_request"),
        ("POST", buy, store, "[" * 5000 + "]" * 5000, 422, "invalid_request"),  # deep nesting
        ("POST", buy, store, "x" * (70 * 1024), 413, "payload_too_large"),
        (
            "POST",
            buy,
            {**store, "Content-Type": "application/x-www-form-urlencoded"},
            "user_id=a&client_ip=1.2.3.4&device_id=d",
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            buy,
            {**store, "Content-Type": "text/plain"},
            '{"user_id":"a"}',
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            buy,
            store,
            '{"user_id":"a","client_ip":"1.2.3.4","device_id":"d","user_id":"b"}',
            422,
            "invalid_request",
        ),
        ("POST", "/v1/admin/channels", ADMIN, '{"name":"a","name":"b"}', 422, "invalid_request"),
        ("POST", "/v1/sales/NO%20SUCH/purchase", store, good, 404, "not_found"),
        ("POST", "/v1/sales/t-missing-sale/purchase", store, good, 404, "not_found"),
        ("GET", buy, store, None, 405, "method_not_allowed"),
        ("GET", "/v1/nowhere", store, None, 404, "not_found"),
        ("POST", f"/v1/orders/{order}/confirm", channel_headers(ch), {}, 422, "invalid_request"),
        ("POST", f"/v1/orders/{order}/confirm", channel_headers(ch), "{", 400, "malformed_request"),
        ("POST", f"/v1/orders/{order}/confirm", {}, {"payment_ref": "p"}, 401, "unauthorized"),
        (
            "POST",
            "/v1/orders/not-an-order/confirm",
            channel_headers(ch),
            {"payment_ref": "p"},
            404,
            "not_found",
        ),
        (
            "POST",
            f"/v1/orders/{sale}.01ARZ3NDEKTSV4RRFFQ69G5FAV/confirm",
            channel_headers(ch),
            {"payment_ref": "p"},
            404,
            "not_found",
        ),
        ("POST", "/v1/orders/x/cancel", channel_headers(ch), None, 404, "not_found"),
        ("GET", "/v1/orders/x", channel_headers(ch), None, 404, "not_found"),
        (
            "GET",
            f"/v1/orders/{order}",
            {"Authorization": "Bearer fgk_wrong"},
            None,
            401,
            "unauthorized",
        ),
        ("POST", "/v1/admin/channels", {}, {"name": "x"}, 401, "unauthorized"),
        (
            "POST",
            "/v1/admin/channels",
            {"Authorization": f"Bearer {ch['api_key']}"},
            {"name": "x"},
            401,
            "unauthorized",
        ),
        ("POST", "/v1/admin/channels", ADMIN, {"name": ""}, 422, "invalid_request"),
        (
            "POST",
            "/v1/admin/channels",
            ADMIN,
            {"name": "x", "webhook_url": "ftp://x"},
            422,
            "invalid_request",
        ),
        ("POST", "/v1/admin/channels", ADMIN, "nope", 400, "malformed_request"),
        ("POST", "/v1/admin/sales", ADMIN, {"sku": "a"}, 422, "invalid_request"),
        (
            "POST",
            "/v1/admin/sales",
            ADMIN,
            {"sku": "a", "name": "b", "starts_at": "yesterday", "ends_at": "2030-01-01T00:00:00Z"},
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/admin/sales",
            ADMIN,
            {
                "sku": "a",
                "name": "b",
                "starts_at": "2030-01-01T00:00:00",
                "ends_at": "2030-01-02T00:00:00",
            },
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/admin/sales",
            ADMIN,
            {
                "sale_id": "Bad{Tag}",
                "sku": "a",
                "name": "b",
                "starts_at": "2030-01-01T00:00:00Z",
                "ends_at": "2030-01-02T00:00:00Z",
            },
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/admin/sales",
            ADMIN,
            {
                "sku": "a",
                "name": "b",
                "starts_at": "2030-01-01T00:00:00Z",
                "ends_at": "2030-01-02T00:00:00Z",
                "per_user_limit": 0,
            },
            422,
            "invalid_request",
        ),
        ("GET", "/v1/admin/sales/t-missing", ADMIN, None, 404, "not_found"),
        ("GET", f"/v1/admin/sales/{sale}", {}, None, 401, "unauthorized"),
    ]


async def test_bad_input_gets_4xx_and_changes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, world: dict[str, Any]
) -> None:
    before = await snapshot(runtime, world["sale_id"])
    failures = []
    for method, path, headers, body, status, code in cases(world):
        kwargs: dict[str, Any] = {"headers": dict(headers)}
        if isinstance(body, dict):
            kwargs["json"] = body
        elif body is not None:
            kwargs["content"] = body
            kwargs["headers"].setdefault("Content-Type", "application/json")
        r = await client.request(method, path, **kwargs)
        ok = (
            r.status_code == status
            and r.headers.get("content-type") == "application/problem+json"
            and r.json().get("code") == code
            and r.json().get("status") == status
        )
        if not ok:
            failures.append(f"{method} {path} {str(body)[:40]!r}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert await snapshot(runtime, world["sale_id"]) == before


async def test_unauthorized_carries_www_authenticate(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/admin/sales/x")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {
        "redis": "ok",
        "scripts": "ok",
        "postgres": "ok",
        "migrations": "ok",
    }


async def test_unknown_sale_ids_cost_postgresql_at_most_a_budget(client: httpx.AsyncClient) -> None:
    """404s for sprayed sale ids stay 404s, and whether a sale is paused comes from one read
    of the known sales per KNOWN_TTL_S, not a PostgreSQL query per 404 (gateway/sale_guard.py)."""
    from gateway import sale_guard

    channel = await create_channel(client)
    before = sale_guard.probes_made[0]
    answers = await asyncio.gather(
        *(
            client.post(
                f"/v1/sales/nope-{uuid.uuid4().hex[:12]}/purchase",
                json=purchase_body("u-spray"),
                headers=channel_headers(channel, uuid.uuid4().hex),
            )
            for _ in range(200)
        )
    )
    assert {r.status_code for r in answers} == {404}
    assert 0 <= sale_guard.probes_made[0] - before <= 2
