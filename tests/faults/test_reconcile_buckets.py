"""Reconciliation of a sale with stock buckets: Redis loses every bucket's ledger; the sale is
paused, `reconcile` rebuilds all of them from PostgreSQL once, and selling goes on without
overselling (the rebuilt buckets hold exactly the units PostgreSQL says are free)."""

from __future__ import annotations

import pytest

from core import errors
from core.ids import shard_id
from core.reconcile import check, reconcile
from core.runtime import Runtime
from tests.faults.support import audit
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.runner import Worker

BUCKETS = 3


async def _wipe(rt: Runtime, sale_id: str) -> int:
    """Delete every Redis key of the sale's buckets, as a Redis restarted empty would."""
    gone = 0
    for b in range(BUCKETS):
        tag = rt.keys.sale(shard_id(sale_id, b)).rsplit(":", 1)[0]
        async for key in rt.redis.scan_iter(match=tag.replace("[", "\\[") + ":*", count=500):
            gone += await rt.redis.delete(key)
    return gone


@pytest.mark.timeout(60)
async def test_bucketed_sale_lost_in_redis_is_rebuilt_once(frt: Runtime) -> None:
    channel, _ = await make_channel(frt)
    sale, codes = await make_sale(frt, keys=12, buckets=BUCKETS, per_user_limit=1)
    confirmed = {await buy(frt, sale, channel, pay="pay", user=f"u-{i}"): 1 for i in range(5)}
    await buy(frt, sale, channel, user="u-reserved")  # left reserved
    await Worker(frt, sale_ids=[sale]).run_burst()
    await audit(frt, sale, confirmed, codes)
    assert (await check(frt.redis, frt.keys, frt.pool, sale)).ok

    assert await _wipe(frt, sale) > 0
    lost = await check(frt.redis, frt.keys, frt.pool, sale)
    assert lost.drift.get("missing_ledger")

    report = await reconcile(frt.ledger, frt.pool, sale, write=True)
    assert report.rebuilt and report.ok, report.as_dict()
    again = await reconcile(frt.ledger, frt.pool, sale, write=True)
    assert not again.rebuilt and again.ok
    stock = await frt.ledger.stock(sale)
    assert stock is not None
    assert (stock["total"], stock["delivered"], stock["reserved"], stock["available"]) == (
        12,
        5,
        1,
        6,
    ), stock

    # Selling goes on: the earlier buyers' limits held, then exactly the 6 free units.
    with pytest.raises(errors.PurchaseLimitExceeded):
        await buy(frt, sale, channel, user="u-0")
    sold, refused = 0, 0
    for i in range(20):
        try:
            await buy(frt, sale, channel, user=f"v-{i}")
            sold += 1
        except (errors.SoldOut, errors.InsufficientStock):
            refused += 1
    assert (sold, refused) == (6, 14)
    assert (await check(frt.redis, frt.keys, frt.pool, sale)).ok
