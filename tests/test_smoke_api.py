from __future__ import annotations

import httpx

from tests.conftest import channel_headers, create_channel, create_sale, purchase_body


async def test_purchase_confirm_flow(client: httpx.AsyncClient) -> None:
    ch = await create_channel(client)
    sale_id, codes = await create_sale(client, keys=5)
    r = await client.post(
        f"/v1/sales/{sale_id}/purchase", json=purchase_body("u1"), headers=channel_headers(ch, "k1")
    )
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "reserved"
    r = await client.post(
        f"/v1/orders/{order['order_id']}/confirm",
        json={"payment_ref": "p1"},
        headers=channel_headers(ch),
    )
    assert r.status_code == 202, r.text
    r = await client.get(f"/v1/orders/{order['order_id']}", headers=channel_headers(ch))
    assert r.status_code == 200 and r.json()["status"] == "confirmed"
