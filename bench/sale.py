"""The benchmarks' sale: a channel and one sale open now, its stock put straight into the Redis
ledger (Ledger.add_stock under a made-up import id: the purchase path never reads card keys)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from core.runtime import Runtime
from core.settings import Settings


async def open_sale(
    url: str,
    token: str,
    settings: Settings,
    sale_id: str,
    stock: int,
    *,
    channel: str,
    sku: str,
    name: str,
    buckets: int = 1,
) -> str:
    """Create the channel and the sale through the admin API, add `stock` units; returns the
    channel's API key."""
    now = datetime.now(UTC)
    async with httpx.AsyncClient(
        base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    ) as admin:
        r = await admin.post("/v1/admin/channels", json={"name": channel})
        r.raise_for_status()
        api_key = str(r.json()["api_key"])
        r = await admin.post(
            "/v1/admin/sales",
            json={
                "sale_id": sale_id,
                "sku": sku,
                "name": name,
                "starts_at": (now - timedelta(seconds=5)).isoformat(),
                "ends_at": (now + timedelta(hours=2)).isoformat(),
                "per_user_limit": 100,
                "reservation_ttl_s": 3600,
                "stock_buckets": buckets,
            },
        )
        r.raise_for_status()
    rt = await Runtime.open(settings, run_migrations=False)
    try:
        await rt.ledger.add_stock(sale_id, 1, stock)
    finally:
        await rt.close()
    return api_key
