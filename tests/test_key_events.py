"""The refund endpoint over HTTP, the append-only key log and the reveal audit trail."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from core.runtime import Runtime
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale
from tests.test_api import buy, stock_of
from workers.runner import Worker


async def events_of(rt: Runtime, sale_id: str) -> list[asyncpg.Record]:
    return list(
        await rt.pool.fetch(
            "SELECT e.* FROM key_events e JOIN card_keys k USING (key_id) WHERE k.sale_id = $1"
            " ORDER BY e.id",
            sale_id,
        )
    )


async def test_refund_endpoint_over_http(client: httpx.AsyncClient, runtime: Runtime) -> None:
    ch, other = await create_channel(client), await create_channel(client, "other")
    sale_id, _ = await create_sale(client, keys=3)
    reserved = (await buy(client, ch, sale_id, "u1")).json()["order_id"]
    paid = (await buy(client, ch, sale_id, "u2", payment_ref="pay-2")).json()["order_id"]
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    r = await client.get(f"/v1/orders/{paid}", headers=channel_headers(ch))
    assert r.json()["status"] == "delivered" and len(r.json()["card_keys"]) == 1

    for order_id in (reserved, paid):
        path = f"/v1/orders/{order_id}/refund"
        r = await client.post(path, headers=channel_headers(other))
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        for _ in range(2):  # a repeat answers the same
            r = await client.post(path, headers=channel_headers(ch))
            assert r.status_code == 200, r.text
            assert r.json() == {"order_id": order_id, "status": "refunded"}
        r = await client.get(f"/v1/orders/{order_id}", headers=channel_headers(ch))
        assert r.json()["status"] == "refunded" and "card_keys" not in r.json()
    r = await client.post(
        f"/v1/orders/{sale_id}.01J00000000000000000000000/refund", headers=channel_headers(ch)
    )
    assert r.status_code == 404
    r = await client.post(
        f"/v1/orders/{reserved}/confirm", headers=channel_headers(ch), json={"payment_ref": "late"}
    )
    assert r.status_code == 409 and r.json()["code"] == "order_refunded"
    r = await client.post(f"/v1/orders/{paid}/refund")
    assert r.status_code == 401

    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    stock = await stock_of(client, sale_id)
    assert (stock["available"], stock["voided"], stock["refunded"]) == (2, 1, 2)
    r = await client.get(f"/v1/orders/{paid}", headers=channel_headers(ch))  # from PG too
    assert r.json()["status"] == "refunded" and "card_keys" not in r.json()


async def test_key_lifecycle_is_logged_and_reveals_are_audited(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    ch = await create_channel(client)
    sale_id, codes = await create_sale(client, keys=2)
    order = (await buy(client, ch, sale_id, "u1", payment_ref="p")).json()["order_id"]
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    for request_id in ("req-one", "req-two"):
        r = await client.get(
            f"/v1/orders/{order}", headers={**channel_headers(ch), "X-Request-Id": request_id}
        )
        assert len(r.json()["card_keys"]) == 1
    r = await client.post(
        f"/v1/orders/{order}/refund", headers={**channel_headers(ch), "X-Request-Id": "req-refund"}
    )
    assert r.status_code == 200
    r = await client.get(f"/v1/orders/{order}", headers=channel_headers(ch))
    assert "card_keys" not in r.json()  # not revealed, so not audited

    events = await events_of(runtime, sale_id)
    key_id = next(e["key_id"] for e in events if e["event"] == "allocated")
    life = [
        (e["event"], e["order_id"], e["actor"], e["client_request_id"])
        for e in events
        if e["key_id"] == key_id
    ]
    actor = f"channel:{ch['channel_id']}"
    assert life[0][:3] == ("imported", None, "admin")
    # request_id: always the server's own (#11.9); the caller's X-Request-Id apart
    assert life[1:] == [
        ("allocated", order, "worker", None),
        ("delivered", order, "worker", None),
        ("revealed", order, actor, "req-one"),
        ("revealed", order, actor, "req-two"),
        ("voided", order, actor, "req-refund"),
    ]
    ids = [e["request_id"] for e in events if e["key_id"] == key_id]
    assert ids[1:3] == [None, None] and all(len(i) == 16 for i in ids[:1] + ids[3:])
    assert "req-one" not in ids and "req-refund" not in ids
    assert sorted(e["event"] for e in events if e["key_id"] != key_id) == ["imported"]
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    # Never the key itself, in any column.
    dump = "".join(str(dict(e)) for e in events)
    assert not any(code in dump for code in codes)


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("UPDATE key_events SET actor = 'someone else'", "append-only"),
        ("DELETE FROM key_events", "append-only"),
        ("TRUNCATE key_events", "append-only"),
        # key_events.key_id has no foreign key (migration 0004): keys are never deleted instead,
        # so no event can be left pointing at nothing.
        ("DELETE FROM card_keys", "never deleted"),
        ("TRUNCATE card_keys CASCADE", "never deleted"),
    ],
)
async def test_key_events_refuse_update_delete_truncate(
    runtime: Runtime, client: httpx.AsyncClient, statement: str, message: str
) -> None:
    await create_sale(client, keys=1)  # at least one row
    before = await runtime.pool.fetchval("SELECT count(*) FROM key_events")
    keys = await runtime.pool.fetchval("SELECT count(*) FROM card_keys")
    assert before > 0 and keys > 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=message):
        await runtime.pool.execute(statement)
    assert await runtime.pool.fetchval("SELECT count(*) FROM key_events") == before
    assert await runtime.pool.fetchval("SELECT count(*) FROM card_keys") == keys
    assert (
        await runtime.pool.fetchval(
            "SELECT count(*) FROM key_events e WHERE NOT EXISTS"
            " (SELECT 1 FROM card_keys k WHERE k.key_id = e.key_id)"
        )
        == 0
    )


async def test_admin_sale_shows_refund_counters(client: httpx.AsyncClient) -> None:
    sale_id, _ = await create_sale(client, keys=1)
    r = await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    assert "voided" not in r.json()["stock"]  # zero counters are omitted, as before
