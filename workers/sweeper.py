"""The expiry sweeper: reservations past their deadline give their stock back.

Several workers may sweep the same sale at once; expire.lua settles each order exactly once,
so the sweep needs no lock. The resulting `expired` events reach PostgreSQL through the stream.
A sale of several stock buckets is swept bucket by bucket; the sweep also finishes transfers
between its buckets that a crash left pending (core/buckets.py, every step idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from core.ledger import Ledger
from workers import metrics as worker_metrics

log = logging.getLogger(__name__)

SWEEP_LIMIT = 500  # orders per script round trip; a sale with more due is swept again at once


class Sweeper:
    def __init__(self, ledger: Ledger, limit: int = SWEEP_LIMIT) -> None:
        self.ledger = ledger
        self.limit = limit

    async def sweep_sale(self, sale_id: str, now: int | None = None) -> int:
        """Expire every due reservation of one sale (each of its stock buckets); returns how
        many this call expired."""
        shards = await self.ledger.shards(sale_id)
        total = 0
        for shard in shards:
            while True:
                due = await self.ledger.expire_due(shard, now=now, limit=self.limit)
                total += due
                if due < self.limit:
                    break
        if len(shards) > 1:
            if total:
                await self.ledger.buckets.undrain(sale_id)  # units back: every bucket may look
            finished = await self.ledger.recover_transfers(sale_id, now)
            if finished:
                log.info("sale %s: finished %d pending transfer(s)", sale_id, finished)
        return total

    async def sweep(self, sale_ids: Iterable[str], now: int | None = None) -> int:
        total = 0
        for sale_id in sale_ids:
            expired = await self.sweep_sale(sale_id, now)
            worker_metrics.expired(expired)
            if expired:
                log.info("sale %s: expired %d reservation(s)", sale_id, expired)
            total += expired
        return total
