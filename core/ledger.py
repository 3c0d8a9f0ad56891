"""The Redis ledger: stock and reservations of every sale, changed only through the Lua scripts.

This is the one place where script return codes become domain errors.
"""

from __future__ import annotations

import math
import time
from typing import cast

import msgspec
from redis.asyncio import Redis

from core import errors
from core.autopipeline import AutoPipeline
from core.ids import new_order_id, sale_of_order
from core.keys import Keys
from core.scripts import ReturnCode, Scripts

STOCK_FIELDS = ("total", "available", "reserved", "confirmed", "delivered", "cancelled", "expired")


def now_ms() -> int:
    return int(time.time() * 1000)


_ERRORS: dict[ReturnCode, type[errors.FlashgateError]] = {
    ReturnCode.SOLD_OUT: errors.SoldOut,
    ReturnCode.LIMIT_EXCEEDED: errors.PurchaseLimitExceeded,
    ReturnCode.SALE_NOT_ACTIVE: errors.SaleNotActive,
    ReturnCode.NO_SALE: errors.NotFound,
    ReturnCode.IDEMPOTENCY_MISMATCH: errors.IdempotencyMismatch,
    ReturnCode.INSUFFICIENT_STOCK: errors.InsufficientStock,
    ReturnCode.NO_ORDER: errors.NotFound,
    ReturnCode.EXPIRED: errors.ReservationExpired,
    ReturnCode.CANCELLED: errors.OrderCancelled,
    ReturnCode.NOT_CANCELLABLE: errors.OrderNotCancellable,
}


def raise_for(code: ReturnCode) -> None:
    """Raise the domain error for a refusal code; return quietly for OK/REPLAYED."""
    if code < 0:
        raise _ERRORS[code]()


class Reservation(msgspec.Struct, frozen=True):
    order_id: str
    status: str
    expires_at_ms: int
    replayed: bool


class RiskArgs(msgspec.Struct, frozen=True):
    """What purchase.lua needs from the risk engine: its KEYS[7..16] and ARGV[9..17]."""

    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]


class RiskOutcome(msgspec.Struct, frozen=True):
    """What purchase.lua says of the risk side of one purchase."""

    refused: ReturnCode | None  # RISK_DENIED or RISK_CHALLENGE; None when it went on
    score: int
    fired: tuple[int, ...]  # 1-based positions of the fired feature rules in the rule spec
    shadow: tuple[int, ...]
    solution: int  # 0 none used, 1 a fresh solution used, 2 the solution was already used


def _positions(csv: str) -> tuple[int, ...]:
    return tuple(int(p) for p in csv.split(",")) if csv else ()


class PurchaseRequest(msgspec.Struct, frozen=True):
    sale_id: str
    channel_id: str
    idempotency_key: str
    fingerprint: str
    user_id: str
    quantity: int
    payment_ref: str = ""


class Ledger:
    """`pipe`: run the scripts auto-pipelined (single-node Redis); other reads use `redis`."""

    def __init__(self, redis: Redis, keys: Keys, pipe: AutoPipeline | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, pipe)

    # -- sales and stock ----------------------------------------------------------------
    async def init_sale(
        self, sale_id: str, starts_at_ms: int, ends_at_ms: int, per_user_limit: int, ttl_ms: int
    ) -> None:
        k = self.keys
        await self.scripts.init_sale(
            keys=[k.sale(sale_id)], args=[starts_at_ms, ends_at_ms, per_user_limit, ttl_ms]
        )
        await self.redis.sadd(k.active_sales(), sale_id)

    async def add_stock(self, sale_id: str, import_id: int, count: int) -> int:
        """Add a committed import's keys to the stock (once per import id); returns the total."""
        k = self.keys
        code, total = await self.scripts.add_stock(
            keys=[k.sale(sale_id), k.imports(sale_id)], args=[import_id, count]
        )
        raise_for(ReturnCode(code))
        return int(total)

    async def stock(self, sale_id: str) -> dict[str, int] | None:
        values = await self.redis.hmget(self.keys.sale(sale_id), ["start", *STOCK_FIELDS])
        if values[0] is None:
            return None
        return {f: int(v or 0) for f, v in zip(STOCK_FIELDS, values[1:], strict=True)}

    # -- orders -------------------------------------------------------------------------
    async def reserve(self, req: PurchaseRequest, now: int | None = None) -> Reservation:
        k, sale = self.keys, req.sale_id
        now = now_ms() if now is None else now
        order_id = new_order_id(sale, now)
        code, order_id, status, expires_at = await self.scripts.reserve(
            keys=[
                k.sale(sale), k.buyers(sale), k.idempotency(sale),
                k.deadlines(sale), k.events(sale), k.order(order_id),
            ],
            args=[
                now, order_id, f"{req.channel_id}:{req.idempotency_key}", req.fingerprint,
                req.channel_id, req.user_id, req.quantity, req.payment_ref,
            ],
        )
        rc = ReturnCode(code)
        raise_for(rc)
        return Reservation(order_id, status, int(expires_at), rc is ReturnCode.REPLAYED)

    async def purchase(self, req: PurchaseRequest, risk: RiskArgs, now: int | None = None,
                       ) -> tuple[Reservation | None, RiskOutcome]:
        """`reserve` with the risk engine's scoring in the same script and round trip.

        Returns (None, outcome) when risk refused the purchase (nothing reserved); raises the
        ledger's domain errors, and RateLimited for an admission limit.
        """
        k, sale = self.keys, req.sale_id
        now = now_ms() if now is None else now
        order_id = new_order_id(sale, now)
        code, order_id, status, value, score, fired, shadow, solution = (
            await self.scripts.purchase(
                keys=[
                    k.sale(sale), k.buyers(sale), k.idempotency(sale),
                    k.deadlines(sale), k.events(sale), k.order(order_id), *risk.keys,
                ],
                args=[
                    now, order_id, f"{req.channel_id}:{req.idempotency_key}", req.fingerprint,
                    req.channel_id, req.user_id, req.quantity, req.payment_ref, *risk.args,
                ],
            )
        )
        rc = ReturnCode(code)
        refused = rc if rc in (ReturnCode.RISK_DENIED, ReturnCode.RISK_CHALLENGE) else None
        outcome = RiskOutcome(refused, int(score), _positions(fired), _positions(shadow),
                              int(solution))
        if rc is ReturnCode.RATE_LIMITED:
            raise errors.RateLimited(math.ceil(int(value) / 1000))
        if refused is not None:
            return None, outcome
        raise_for(rc)
        return Reservation(order_id, status, int(value), rc is ReturnCode.REPLAYED), outcome

    def _order_keys(self, order_id: str, sale_id: str) -> list[str]:
        k = self.keys
        return [
            k.sale(sale_id), k.order(order_id), k.deadlines(sale_id),
            k.events(sale_id), k.buyers(sale_id),
        ]

    async def confirm(
        self, sale_id: str, order_id: str, channel_id: str, payment_ref: str,
        now: int | None = None,
    ) -> tuple[str, int]:
        code, status, expires_at = await self.scripts.confirm(
            keys=self._order_keys(order_id, sale_id),
            args=[now_ms() if now is None else now, order_id, channel_id, payment_ref],
        )
        raise_for(ReturnCode(code))
        return status, int(expires_at)

    async def cancel(
        self, sale_id: str, order_id: str, channel_id: str, now: int | None = None
    ) -> str:
        code, status = await self.scripts.cancel(
            keys=self._order_keys(order_id, sale_id),
            args=[now_ms() if now is None else now, order_id, channel_id],
        )
        raise_for(ReturnCode(code))
        return str(status)

    async def expire_due(self, sale_id: str, now: int | None = None, limit: int = 500) -> int:
        """Expire reservations of one sale whose deadline passed; returns how many expired.

        Several sweepers may run this at once: the script settles each order exactly once.
        """
        now = now_ms() if now is None else now
        k = self.keys
        key = k.deadlines(sale_id)
        due = cast(list[str], await self.redis.zrangebyscore(key, "-inf", now, 0, limit))
        if not due:
            return 0
        # One script call for the batch (a pipeline of EVALSHAs is refused on Redis Cluster).
        codes = await self.scripts.expire(
            keys=[k.sale(sale_id), key, k.events(sale_id), k.buyers(sale_id),
                  *(k.order(order_id) for order_id in due)],
            args=[now, *due],
        )
        return sum(1 for code in codes if code == ReturnCode.OK)

    async def mark_delivered(self, order_ids: list[str], now: int | None = None) -> list[int]:
        """Flip confirmed orders to delivered (after their keys are committed): one script call
        per sale for the whole batch. Returns one code per order, in order."""
        if not order_ids:
            return []
        now = now_ms() if now is None else now
        by_sale: dict[str, list[int]] = {}
        for i, order_id in enumerate(order_ids):
            by_sale.setdefault(sale_of_order(order_id), []).append(i)
        codes = [0] * len(order_ids)
        for sale_id, positions in by_sale.items():
            replies = await self.scripts.deliver(
                keys=[self.keys.sale(sale_id),
                      *(self.keys.order(order_ids[i]) for i in positions)],
                args=[now],
            )
            for i, code in zip(positions, replies, strict=True):
                codes[i] = int(code)
        return codes

    async def order(self, order_id: str) -> dict[str, str] | None:
        data = cast(dict[str, str], await self.redis.hgetall(self.keys.order(order_id)))
        return data or None
