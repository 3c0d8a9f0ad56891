"""Low-stock events: a sale's available units fall under a share of its total.

Checked by every worker on its heartbeat (workers/metrics.py), from the ledger rows it has just
read for the stock gauges: no extra read, nothing on the purchase path. Each event happens once
per sale and total, however many workers see it: the first to HSETNX the sale's total into
`keys.low_stock(sale)` owns it, counts it (flashgate_low_stock_events_total) and logs it. A
restock changes the total and so arms the event again. This is the seam for the low-stock
alerts to channels still to come (a webhook to the sale's channels from here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from core import metrics
from core.keys import Keys

log = logging.getLogger("flashgate.workers")


def is_low(row: Mapping[str, int], fraction: float) -> bool:
    """Under `fraction` of the total left, as the FlashgateLowStock alert reads it
    (available / total < fraction); a sale with no stock yet is not low, it is new."""
    total = row.get("total", 0)
    return total > 0 and row.get("available", 0) < total * fraction


async def check(
    redis: Any,
    keys: Keys,
    sales: Mapping[str, Mapping[str, int]],
    fraction: float,
    now_ms: int | None = None,
) -> list[str]:
    """Record the low-stock events of these ledger rows; returns the sales that went low now."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    fired = []
    for sale_id, row in sales.items():
        if "available" not in row or not is_low(row, fraction):
            continue
        if await redis.hsetnx(keys.low_stock(sale_id), str(row["total"]), now_ms):
            fired.append(sale_id)
            metrics.LOW_STOCK_EVENTS.inc()
            log.warning(
                "sale %s is low on stock: %d of %d units left",
                sale_id,
                row["available"],
                row["total"],
            )
    return fired
