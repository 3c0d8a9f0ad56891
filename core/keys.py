"""Every Redis key Flashgate uses, built here and nowhere else.

All keys of one sale carry the hash tag `{s:<sale_id>}`, so every script's KEYS share one slot
and the scripts run unchanged on Redis Cluster. Scripts never build key names themselves.

Order ids embed their sale id (`<sale_id>.<ulid>`) so that an order can be routed to its sale's
slot without a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.ids import sale_of_order


@dataclass(frozen=True)
class Keys:
    prefix: str = "fg"

    # -- global (not part of any script) -------------------------------------------------
    def active_sales(self) -> str:
        """SET of sale ids whose streams workers consume and whose reservations they sweep."""
        return f"{self.prefix}:sales:active"

    def channels(self) -> str:
        """HASH api-key hash (hex) -> channel id, the hot path's view of channel credentials."""
        return f"{self.prefix}:channels"

    # -- per sale --------------------------------------------------------------------------
    def _tag(self, sale_id: str) -> str:
        return f"{self.prefix}:{{s:{sale_id}}}"

    def sale(self, sale_id: str) -> str:
        """HASH: window, limits and the stock ledger (total/available/reserved/confirmed/...)."""
        return f"{self._tag(sale_id)}:sale"

    def buyers(self, sale_id: str) -> str:
        """HASH user id -> units held (reserved + confirmed + delivered)."""
        return f"{self._tag(sale_id)}:buyers"

    def idempotency(self, sale_id: str) -> str:
        """HASH `<channel>:<Idempotency-Key>` -> the original answer of that purchase."""
        return f"{self._tag(sale_id)}:idem"

    def deadlines(self, sale_id: str) -> str:
        """ZSET order id -> reservation deadline (ms); the expiry sweeper's work list."""
        return f"{self._tag(sale_id)}:deadlines"

    def events(self, sale_id: str) -> str:
        """STREAM of order events (reserved, confirmed, cancelled, expired) for the workers."""
        return f"{self._tag(sale_id)}:events"

    def dead_letters(self, sale_id: str) -> str:
        """STREAM of events that kept failing; kept for operators, never dropped."""
        return f"{self._tag(sale_id)}:dead"

    def imports(self, sale_id: str) -> str:
        """SET of key-import ids already added to the stock (makes add_stock idempotent)."""
        return f"{self._tag(sale_id)}:imports"

    def order(self, order_id: str) -> str:
        """HASH of one order's live state."""
        return f"{self._tag(sale_of_order(order_id))}:o:{order_id}"


WORKER_GROUP = "flashgate-workers"
