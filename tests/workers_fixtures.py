"""Data for the worker tests, written straight to PostgreSQL and the Redis ledger.

The workers don't depend on the gateway, so neither do their tests: a channel, a sale and
its card keys are inserted here the way the admin API stores them (sealed secrets, keyed
fingerprints, stock added per committed import).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

from core.crypto import fingerprint, open_sealed, seal, show_webhook_secret
from core.ids import new_channel_id
from core.ledger import PurchaseRequest
from core.runtime import Runtime


def new_sale_id() -> str:
    return "w-" + uuid.uuid4().hex[:16]


async def make_channel(rt: Runtime, webhook_url: str | None = None) -> tuple[str, str]:
    """A channel row; returns (channel id, webhook_secret as the API shows it)."""
    channel_id, secret = new_channel_id(), secrets.token_bytes(32)
    async with rt.pool.acquire() as conn:
        dek_id, dek = await rt.keyring.new_dek(conn, "webhook")
        nonce, sealed = seal(dek, secret, channel_id.encode())
        await conn.execute(
            "INSERT INTO channels (channel_id, name, api_key_hash, webhook_url, webhook_secret,"
            " webhook_dek_id) VALUES ($1, 'shop', $2, $3, $4, $5)",
            channel_id,
            secrets.token_bytes(32),
            webhook_url,
            nonce + sealed,
            dek_id,
        )
    return channel_id, show_webhook_secret(secret)


async def make_sale(
    rt: Runtime,
    *,
    keys: int = 0,
    per_user_limit: int = 10,
    ttl_ms: int = 300_000,
    in_pg: bool = True,
    sale_id: str | None = None,
    buckets: int = 1,
) -> tuple[str, list[str]]:
    """An open sale (PG row + Redis ledger) with `keys` imported codes; returns (id, codes)."""
    sale_id, now = sale_id or new_sale_id(), datetime.now(UTC)
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    if in_pg:
        await rt.pool.execute(
            "INSERT INTO sales (sale_id, sku, name, starts_at, ends_at, per_user_limit,"
            " reservation_ttl_s, stock_buckets) VALUES ($1, 'SKU', 'Worker test', $2, $3, $4,"
            " $5, $6)",
            sale_id,
            start,
            end,
            per_user_limit,
            max(1, ttl_ms // 1000),
            buckets,
        )
    await rt.ledger.init_sale(
        sale_id,
        int(start.timestamp() * 1000),
        int(end.timestamp() * 1000),
        per_user_limit,
        ttl_ms,
        buckets,
    )
    codes = await import_keys(rt, sale_id, keys) if keys else []
    return sale_id, codes


async def import_keys(rt: Runtime, sale_id: str, n: int, *, stock: int | None = None) -> list[str]:
    """Insert n sealed keys in one import, then add `stock` (default n) units to Redis."""
    codes = [f"{sale_id}-KEY-{i:04d}-{secrets.token_hex(6)}" for i in range(n)]
    async with rt.pool.acquire() as conn, conn.transaction():
        fp_key = await rt.keyring.fingerprint_key(conn)
        dek_id, dek = await rt.keyring.new_dek(conn, "card_keys")
        import_id: int = await conn.fetchval(
            "INSERT INTO key_imports (sale_id, imported, duplicates, rejected)"
            " VALUES ($1, $2, 0, 0) RETURNING import_id",
            sale_id,
            n,
        )
        sealed = [seal(dek, c.encode(), sale_id.encode()) for c in codes]
        await conn.executemany(
            "INSERT INTO card_keys (sale_id, import_id, fingerprint, dek_id, nonce, ciphertext)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (sale_id, import_id, fingerprint(fp_key, c), dek_id, nonce, ct)
                for c, (nonce, ct) in zip(codes, sealed, strict=True)
            ],
        )
    await rt.ledger.add_stock(sale_id, import_id, n if stock is None else stock)
    return codes


async def buy(
    rt: Runtime,
    sale_id: str,
    channel_id: str,
    *,
    qty: int = 1,
    pay: str = "",
    user: str | None = None,
    now: int | None = None,
) -> str:
    """Reserve (and, with a payment ref, confirm at once); returns the order id."""
    user = user or "u-" + uuid.uuid4().hex[:8]
    req = PurchaseRequest(
        sale_id, channel_id, uuid.uuid4().hex, "fp-" + uuid.uuid4().hex, user, qty, pay
    )
    return (await rt.ledger.reserve(req, now=now)).order_id


async def buy_and_confirm(rt: Runtime, sale_id: str, channel_id: str, *, qty: int = 1) -> str:
    order_id = await buy(rt, sale_id, channel_id, qty=qty)
    await rt.ledger.confirm(sale_id, order_id, channel_id, "pay-" + uuid.uuid4().hex[:6])
    return order_id


async def keys_by_order(rt: Runtime, sale_id: str) -> dict[str, list[int]]:
    rows = await rt.pool.fetch(
        "SELECT order_id, key_id FROM card_keys WHERE sale_id = $1 AND order_id IS NOT NULL"
        " ORDER BY key_id",
        sale_id,
    )
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r["order_id"], []).append(r["key_id"])
    return out


async def revealed_codes(rt: Runtime, order_id: str) -> list[str]:
    async with rt.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT sale_id, dek_id, nonce, ciphertext FROM card_keys WHERE order_id = $1",
            order_id,
        )
        return [
            open_sealed(
                await rt.keyring.dek(conn, r["dek_id"]),
                r["nonce"],
                r["ciphertext"],
                r["sale_id"].encode(),
            ).decode()
            for r in rows
        ]


async def order_rows(rt: Runtime, sale_id: str) -> dict[str, dict[str, object]]:
    rows = await rt.pool.fetch("SELECT * FROM orders WHERE sale_id = $1", sale_id)
    return {r["order_id"]: dict(r) for r in rows}


async def redis_statuses(rt: Runtime, orders: list[str]) -> set[str]:
    return {(await rt.ledger.order(o) or {}).get("status", "") for o in orders}
