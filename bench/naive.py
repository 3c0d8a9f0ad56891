"""The naive design's tables, in a schema of their own (never in the migrations).

What a team would build without the Redis ledger: one stock row per sale, decremented under its
row lock, and an orders table, all in one PostgreSQL transaction per purchase
(gateway/routes/bench.py serves it when FLASHGATE_BENCH_ENDPOINTS is on).
"""

from __future__ import annotations

import asyncpg

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench_naive;
CREATE TABLE IF NOT EXISTS bench_naive.stock (
    sale_id         text PRIMARY KEY,
    available       integer NOT NULL CHECK (available >= 0),
    per_user_limit  integer NOT NULL,
    ttl_ms          bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS bench_naive.orders (
    order_id        text PRIMARY KEY,
    sale_id         text NOT NULL,
    channel_id      text NOT NULL,
    idempotency_key text NOT NULL,
    user_id         text NOT NULL,
    quantity        integer NOT NULL,
    expires_at      bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS bench_naive_orders_user ON bench_naive.orders (sale_id, user_id);
"""


async def create_sale(
    database_url: str, sale_id: str, stock: int, per_user_limit: int, ttl_ms: int
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO bench_naive.stock (sale_id, available, per_user_limit, ttl_ms)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (sale_id) DO UPDATE SET available ="
            " EXCLUDED.available",
            sale_id,
            stock,
            per_user_limit,
            ttl_ms,
        )
    finally:
        await conn.close()


async def drop(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS bench_naive CASCADE")
    finally:
        await conn.close()
