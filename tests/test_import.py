"""Key import: formats, duplicates, rejected lines, encryption at rest, stock sync."""

from __future__ import annotations

import httpx

from core.runtime import Runtime
from tests.conftest import ADMIN, create_sale


async def _import(
    client: httpx.AsyncClient, sale_id: str, content: str | bytes, content_type: str
) -> httpx.Response:
    return await client.post(
        f"/v1/admin/sales/{sale_id}/keys",
        content=content,
        headers={**ADMIN, "Content-Type": content_type},
    )


async def _stock_total(client: httpx.AsyncClient, sale_id: str) -> int:
    r = await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    total: int = r.json()["stock"]["total"]
    return total


async def test_plain_text_with_duplicates_and_malformed_lines(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    sale_id, _ = await create_sale(client)
    body = "AAAA-1111\n\nBBBB-2222\r\nAAAA-1111\n  CCCC-3333  \nbad\x07code\n" + "x" * 600 + "\n"
    r = await _import(client, sale_id, body, "text/plain")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "import_id": r.json()["import_id"],
        "imported": 3,
        "duplicates": 1,
        "rejected": 2,
        "stock_total": 3,
        "rejected_lines": [6, 7],
    }
    # importing the same codes again (even into another sale) adds nothing
    other, _ = await create_sale(client)
    r = await _import(client, other, "CCCC-3333\nDDDD-4444\n", "text/plain")
    assert (r.json()["imported"], r.json()["duplicates"], r.json()["stock_total"]) == (1, 1, 1)
    assert await _stock_total(client, sale_id) == 3


async def test_csv_and_json(client: httpx.AsyncClient) -> None:
    sale_id, _ = await create_sale(client)
    csv_body = "serial,Code,note\n1,CSV-0001,a\n2,CSV-0002,b\n3,,c\n"
    r = await _import(client, sale_id, csv_body, "text/csv; charset=utf-8")
    assert (r.json()["imported"], r.json()["rejected"]) == (2, 1)
    r = await client.post(
        f"/v1/admin/sales/{sale_id}/keys",
        headers=ADMIN,
        json={"keys": ["JSON-1", "JSON-2", "CSV-0001"]},
    )
    assert (r.json()["imported"], r.json()["duplicates"], r.json()["stock_total"]) == (2, 1, 4)


async def test_bad_imports_write_nothing(client: httpx.AsyncClient, runtime: Runtime) -> None:
    sale_id, _ = await create_sale(client)
    cases = [
        ("serial,value\n1,X\n", "text/csv", 422, "invalid_request"),
        (b"\xff\xfe\x00bad", "text/plain", 422, "invalid_request"),
        ("A\nB\n", "application/xml", 415, "unsupported_media_type"),
        ('{"keys": "not-a-list"}', "application/json", 422, "invalid_request"),
        ('{"keys": [1, 2]}', "application/json", 422, "invalid_request"),
        ('{"keys": [', "application/json", 400, "malformed_request"),
    ]
    for content, ctype, status, code in cases:
        r = await _import(client, sale_id, content, ctype)
        assert (r.status_code, r.json()["code"]) == (status, code), (ctype, r.text)
    r = await _import(client, "t-no-such-sale", "A\n", "text/plain")
    assert r.status_code == 404
    r = await client.post(
        f"/v1/admin/sales/{sale_id}/keys", content="A\n", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 401
    assert await _stock_total(client, sale_id) == 0
    count = await runtime.pool.fetchval(
        "SELECT count(*) FROM card_keys WHERE sale_id = $1", sale_id
    )
    assert count == 0


async def test_keys_are_encrypted_at_rest(client: httpx.AsyncClient, runtime: Runtime) -> None:
    sale_id, codes = await create_sale(client, keys=20)
    rows = await runtime.pool.fetch(
        "SELECT fingerprint, nonce, ciphertext, dek_id FROM card_keys WHERE sale_id = $1", sale_id
    )
    assert len(rows) == 20
    blob = b"".join(r["fingerprint"] + r["nonce"] + r["ciphertext"] for r in rows)
    for code in codes:
        assert code.encode() not in blob
    # no text column anywhere holds a code
    dump = await runtime.pool.fetch(
        "SELECT row_to_json(t)::text AS j FROM (SELECT * FROM card_keys WHERE sale_id = $1) t",
        sale_id,
    )
    text = "".join(r["j"] for r in dump)
    assert not any(code in text for code in codes)
    wrapped = await runtime.pool.fetchrow(
        "SELECT master_key_id FROM data_keys WHERE dek_id = $1", rows[0]["dek_id"]
    )
    assert wrapped["master_key_id"] == runtime.settings.active_master_key.key_id


async def test_import_that_missed_redis_is_restocked(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    sale_id, _ = await create_sale(client, keys=4)
    # Simulate a crash between the PostgreSQL commit and the Redis stock step.
    await runtime.pool.execute(
        "UPDATE key_imports SET stocked_at = NULL WHERE sale_id = $1", sale_id
    )
    await runtime.redis.srem(
        runtime.keys.imports(sale_id), *await runtime.redis.smembers(runtime.keys.imports(sale_id))
    )
    await runtime.redis.hset(runtime.keys.sale(sale_id), mapping={"total": 0, "available": 0})
    r = await _import(client, sale_id, "LATE-1\n", "text/plain")
    assert r.json()["stock_total"] == 5
