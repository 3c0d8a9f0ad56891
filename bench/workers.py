"""The workers' benchmark: orders persisted and keys allocated per second from a full stream.

Per repetition: a fresh sale (PostgreSQL row and Redis ledger), N sealed dummy card keys
inserted in one statement, N orders reserved and confirmed at once through the ledger (payment
ref in the reservation), so the sale's stream holds N confirmed-order events. Then one
`Worker.run_burst()` (one process with its `worker_consumers_per_sale` consumers of the sale, as
in production) is timed until the stream is drained: every order upserted, its key allocated
`FOR UPDATE SKIP LOCKED`, the webhook outbox written, Redis marked delivered, entries acked.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from core.crypto import seal
from core.ids import new_channel_id
from core.ledger import PurchaseRequest
from core.runtime import Runtime
from workers.runner import Worker


async def _setup(rt: Runtime, n: int) -> str:
    sale_id = "bw-" + uuid.uuid4().hex[:12]
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=1), now + timedelta(hours=1)
    channel_id = new_channel_id()
    async with rt.pool.acquire() as conn, conn.transaction():
        dek_id, dek = await rt.keyring.new_dek(conn, "webhook")
        nonce, sealed = seal(dek, os.urandom(32), channel_id.encode())
        await conn.execute(
            "INSERT INTO channels (channel_id, name, api_key_hash, webhook_url, webhook_secret,"
            " webhook_dek_id) VALUES ($1, 'bench', $2, NULL, $3, $4)",
            channel_id,
            os.urandom(32),
            nonce + sealed,
            dek_id,
        )
        await conn.execute(
            "INSERT INTO sales (sale_id, sku, name, starts_at, ends_at, per_user_limit,"
            " reservation_ttl_s) VALUES ($1, 'SKU', 'Workers bench', $2, $3, 1, 3600)",
            sale_id,
            start,
            end,
        )
        import_id = await conn.fetchval(
            "INSERT INTO key_imports (sale_id, imported, duplicates, rejected)"
            " VALUES ($1, $2, 0, 0) RETURNING import_id",
            sale_id,
            n,
        )
        dek_id, dek = await rt.keyring.new_dek(conn, "card_keys")
        sealed_keys = [seal(dek, f"BENCH-{i:07d}".encode(), sale_id.encode()) for i in range(n)]
        await conn.execute(
            "INSERT INTO card_keys (sale_id, import_id, fingerprint, dek_id, nonce, ciphertext)"
            " SELECT $1, $2, f, $3, nn, c FROM unnest($4::bytea[], $5::bytea[], $6::bytea[])"
            " AS t(f, nn, c)",
            sale_id,
            import_id,
            dek_id,
            [os.urandom(32) for _ in range(n)],
            [s[0] for s in sealed_keys],
            [s[1] for s in sealed_keys],
        )
    await rt.ledger.init_sale(
        sale_id, int(start.timestamp() * 1000), int(end.timestamp() * 1000), 1, 3_600_000
    )
    await rt.ledger.add_stock(sale_id, import_id, n)
    sem = asyncio.Semaphore(256)

    async def buy(i: int) -> None:
        async with sem:
            await rt.ledger.reserve(
                PurchaseRequest(sale_id, channel_id, f"k{i}", f"fp{i}", f"u{i}", 1, f"pay-{i}")
            )

    await asyncio.gather(*(buy(i) for i in range(n)))
    return sale_id


async def one_run(rt: Runtime, n: int) -> tuple[float, int]:
    """(orders/s, orders delivered) for one drained stream of n confirmed orders."""
    sale_id = await _setup(rt, n)
    worker = Worker(rt, name="bench-" + sale_id, sale_ids=[sale_id])
    t0 = time.perf_counter()
    await worker.run_burst(timeout_s=600)
    elapsed = time.perf_counter() - t0
    stock = await rt.ledger.stock(sale_id) or {}
    delivered = int(stock.get("delivered", 0))
    await rt.redis.srem(rt.keys.active_sales(), sale_id)  # leave nothing for other workers
    return delivered / elapsed, delivered
