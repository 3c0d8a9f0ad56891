"""The expiry sweeper: reservations past their deadline give their stock back.

Several workers may sweep the same sale at once; expire.lua settles each order exactly once,
so the sweep needs no lock. The resulting `expired` events reach PostgreSQL through the stream.
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
        """Expire every due reservation of one sale; returns how many this call expired."""
        total = 0
        while True:
            due = await self.ledger.expire_due(sale_id, now=now, limit=self.limit)
            total += due
            if due < self.limit:
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
