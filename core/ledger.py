"""The Redis ledger: stock and reservations of every sale, changed only through the Lua scripts.

This is the one place where script return codes become domain errors. Sales of several stock
buckets (core/buckets.py) go through the same methods: a purchase runs on the buyer's home
bucket, an order's scripts on the bucket its id names.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

from core import errors
from core.autopipeline import AutoPipeline
from core.buckets import REFILL_ROUNDS, Refill, StockBuckets
from core.ids import (
    MAX_STOCK_BUCKETS,
    home_bucket,
    new_order_id,
    sale_of_order,
    shard_id,
    shard_of_order,
)
from core.keys import Keys
from core.scripts import ReturnCode, Scripts

# `refunded` counts refunded units (like cancelled/expired, outside the invariant); `voided`
# holds units whose keys were voided by a refund after delivery: never sold again, so
# available + reserved + confirmed + delivered + voided = total.
STOCK_FIELDS = (
    "total",
    "available",
    "reserved",
    "confirmed",
    "delivered",
    "cancelled",
    "expired",
    "refunded",
    "voided",
)
BUCKET_FIELDS = (*STOCK_FIELDS, "transit")


def now_ms() -> int:
    return int(time.time() * 1000)


def from_ms(ms: int) -> datetime:
    """A ledger time (ms since the epoch, the scripts' clock) as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


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
    ReturnCode.BAD_QUANTITY: errors.InvalidRequest,
    ReturnCode.NOT_REFUNDABLE: errors.OrderNotRefundable,
    ReturnCode.REFUNDED: errors.OrderRefunded,
}


def raise_for(code: ReturnCode) -> None:
    """Raise the domain error for a refusal code; return quietly for OK/REPLAYED."""
    if code < 0:
        raise _ERRORS[code]()


def _rfc3339(ms: int) -> str:
    spec = "seconds" if ms % 1000 == 0 else "milliseconds"
    return from_ms(ms).isoformat(timespec=spec).replace("+00:00", "Z")


def _span(ms: int) -> str:
    """A duration for people: its two largest units from the first one that isn't zero
    ("3 h 2 min", "45 s", "2 d 1 h")."""
    seconds = max(0, ms + 999) // 1000
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    first = next((i for i, (v, _) in enumerate(units) if v), 3)
    return " ".join(f"{v} {u}" for v, u in units[first : first + 2] if v) or "0 s"


def sale_not_active(sale_id: str, start_ms: int, end_ms: int, now: int) -> errors.SaleNotActive:
    """409 `sale_not_active` that says whether the sale opens later or has ended, and when
    (also as `starts_at` / `ends_at`, and a Retry-After until the opening). Error path only:
    the window comes back in the script's own reply, no extra round trip."""
    starts_at, ends_at = _rfc3339(start_ms), _rfc3339(end_ms)
    if now < start_ms:
        detail = f"sale {sale_id} opens at {starts_at} (in {_span(start_ms - now)})"
    elif now >= end_ms:
        detail = f"sale {sale_id} ended at {ends_at} ({_span(now - end_ms)} ago)"
    else:
        detail = f"sale {sale_id} is paused"
    exc = errors.SaleNotActive(detail, starts_at=starts_at, ends_at=ends_at)
    if now < start_ms:
        exc.headers = {"Retry-After": str(max(1, math.ceil((start_ms - now) / 1000)))}
    return exc


def _refuse(rc: ReturnCode, second: str, third: str, sale_id: str, now: int) -> None:
    """raise_for a reservation's reply: {-3, start ms, end ms} names the sale's window."""
    if rc is ReturnCode.SALE_NOT_ACTIVE and second and third:
        raise sale_not_active(sale_id, int(second), int(third), now)
    raise_for(rc)


class WrongBuckets(Exception):  # noqa: N818 - a routing signal, not a domain error
    """A purchase was routed by a stale bucket count; the right one is now known to the ledger
    (`Ledger.route`): plan again (risk keys are the home bucket's) and retry. Nothing was done."""


class RefundRequest(msgspec.Struct, frozen=True):
    """What refund.lua said: the order as Redis knows it, and whether PostgreSQL must settle."""

    order_id: str
    channel_id: str
    status: str  # "refunded" (settled), or "confirmed" / "delivered" while pending
    user_id: str
    quantity: int
    created_ms: int
    pending: bool


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
    """`pipe`: run the scripts, and the order reads buyers poll, auto-pipelined (single-node
    Redis); other reads use `redis`."""

    def __init__(self, redis: Redis, keys: Keys, pipe: AutoPipeline | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.pipe = pipe
        self.scripts = Scripts(redis, pipe)
        self.buckets = StockBuckets(redis, keys, self.scripts)

    def route(self, sale_id: str, user_id: str) -> tuple[int, int]:
        """(bucket count, home bucket) of a buyer, from what this process knows: no round trip
        (a stale count is corrected by the script, see WrongBuckets)."""
        n = self.buckets.known(sale_id)
        return n, home_bucket(user_id, n)

    # -- sales and stock ----------------------------------------------------------------
    async def init_sale(
        self,
        sale_id: str,
        starts_at_ms: int,
        ends_at_ms: int,
        per_user_limit: int,
        ttl_ms: int,
        buckets: int = 1,
    ) -> None:
        """Create (or update) the sale's ledger: one per stock bucket, bucket 0 last, so that
        a buyer routed by bucket 0's count always finds their home bucket."""
        if not 1 <= buckets <= MAX_STOCK_BUCKETS:
            raise errors.InvalidRequest(f"stock_buckets: 1..{MAX_STOCK_BUCKETS}")
        k = self.keys
        for b in reversed(range(buckets)):
            code, existing = await self.scripts.init_sale(
                keys=[k.sale(shard_id(sale_id, b))],
                args=[starts_at_ms, ends_at_ms, per_user_limit, ttl_ms, buckets, b],
            )
            if code == ReturnCode.WRONG_BUCKETS:
                raise errors.SaleExists(f"the sale has {existing} stock bucket(s)")
        self.buckets.learn(sale_id, buckets)
        await self.redis.sadd(k.active_sales(), sale_id)

    async def add_stock(self, sale_id: str, import_id: int, count: int) -> int:
        """Add a committed import's keys to the stock (once per import id and bucket, spread
        over the sale's buckets); returns the sale's total."""
        k = self.keys
        n = await self.buckets.count(sale_id) or 1
        base, extra = divmod(count, n)
        total = 0
        for b in range(n):
            # The remainder goes to other buckets on each import, not always the first ones.
            share = base + (1 if (b - import_id) % n < extra else 0)
            shard = shard_id(sale_id, b)
            code, bucket_total = await self.scripts.add_stock(
                keys=[k.sale(shard), k.imports(shard)], args=[import_id, share]
            )
            raise_for(ReturnCode(code))
            total += int(bucket_total)
        return total

    async def stock(self, sale_id: str) -> dict[str, int] | None:
        """The sale's ledger; for several buckets, their sum (per bucket: `bucket_stock`)."""
        n = await self.buckets.count(sale_id)
        if n is None:
            return None
        if n == 1:
            values = await self.redis.hmget(self.keys.sale(sale_id), ["start", *STOCK_FIELDS])
            if values[0] is None:
                return None
            return {f: int(v or 0) for f, v in zip(STOCK_FIELDS, values[1:], strict=True)}
        rows = await self.bucket_stock(sale_id)
        return {f: sum(r[f] for r in rows) for f in STOCK_FIELDS} if rows else None

    async def bucket_stock(self, sale_id: str) -> list[dict[str, int]]:
        """Each bucket's ledger (with `transit`: units withdrawn, their transfer not settled)."""
        n = await self.buckets.count(sale_id) or 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(n):
                pipe.hmget(self.keys.sale(shard_id(sale_id, b)), list(BUCKET_FIELDS))
            rows = cast(list[list[Any]], await pipe.execute())
        return [{f: int(v or 0) for f, v in zip(BUCKET_FIELDS, row, strict=True)} for row in rows]

    # -- orders -------------------------------------------------------------------------
    async def reserve(self, req: PurchaseRequest, now: int | None = None) -> Reservation:
        now = now_ms() if now is None else now
        while True:
            buckets, home = self.route(req.sale_id, req.user_id)
            rc, order_id, status, value = await self._reserve(req, now, buckets, home)
            if rc is not ReturnCode.WRONG_BUCKETS:
                break
            self.buckets.learn(req.sale_id, value)
        if rc is ReturnCode.BUCKET_SHORT:
            return await self._refill_and_reserve(req, now, buckets, home)
        _refuse(rc, order_id, status, req.sale_id, now)
        return Reservation(order_id, status, value, rc is ReturnCode.REPLAYED)

    async def _reserve(
        self,
        req: PurchaseRequest,
        now: int,
        buckets: int,
        home: int,
    ) -> tuple[ReturnCode, str, str, int]:
        """reserve.lua on the home bucket: (code, order id, status, 4th value)."""
        k, sale, shard = self.keys, req.sale_id, shard_id(req.sale_id, home)
        order_id = new_order_id(sale, now, home)
        code, order_id, status, value = await self.scripts.reserve(
            keys=[
                k.sale(shard),
                k.buyers(shard),
                k.idempotency(shard),
                k.deadlines(shard),
                k.events(shard),
                k.order(order_id),
            ],
            args=[
                now,
                order_id,
                f"{req.channel_id}:{req.idempotency_key}",
                req.fingerprint,
                req.channel_id,
                req.user_id,
                req.quantity,
                req.payment_ref,
                buckets,
            ],
        )
        return ReturnCode(code), order_id, status, int(value)

    async def _refill_and_reserve(
        self, req: PurchaseRequest, now: int, buckets: int, home: int
    ) -> Reservation:
        """The home bucket had fewer units than asked for: bring units in from other buckets
        and reserve there again, until it works or the sale is proven unable to supply them."""
        for _ in range(REFILL_ROUNDS):
            outcome = await self.buckets.refill(req.sale_id, buckets, home, req.quantity, now)
            if outcome is Refill.EMPTY:
                raise errors.SoldOut()
            if outcome is Refill.SHORT:
                raise errors.InsufficientStock()
            if outcome is Refill.GAVE_UP:
                break
            rc, order_id, status, value = await self._reserve(req, now, buckets, home)
            if rc is not ReturnCode.BUCKET_SHORT:  # reserved, replayed, or a refusal
                _refuse(rc, order_id, status, req.sale_id, now)
                return Reservation(order_id, status, value, rc is ReturnCode.REPLAYED)
        # Every unit seen was taken by others first, or units stayed in transit: nothing was
        # reserved, so a retry with the same Idempotency-Key is safe.
        raise errors.ServiceUnavailable("stock is moving between buckets; retry")

    async def purchase(
        self,
        req: PurchaseRequest,
        risk: RiskArgs,
        now: int | None = None,
        *,
        route: tuple[int, int] = (1, 0),
    ) -> tuple[Reservation | None, RiskOutcome]:
        """`reserve` with the risk engine's scoring in the same script and round trip.

        `route` is the (bucket count, home bucket) the risk keys were built for (`Ledger.route`).
        Returns (None, outcome) when risk refused the purchase (nothing reserved); raises the
        ledger's domain errors, RateLimited for an admission limit, and WrongBuckets when the
        route was stale (plan again and retry).
        """
        k, sale = self.keys, req.sale_id
        buckets, home = route
        shard = shard_id(sale, home)
        now = now_ms() if now is None else now
        order_id = new_order_id(sale, now, home)
        code, order_id, status, value, score, fired, shadow, solution = await self.scripts.purchase(
            keys=[
                k.sale(shard),
                k.buyers(shard),
                k.idempotency(shard),
                k.deadlines(shard),
                k.events(shard),
                k.order(order_id),
                *risk.keys,
            ],
            args=[
                now,
                order_id,
                f"{req.channel_id}:{req.idempotency_key}",
                req.fingerprint,
                req.channel_id,
                req.user_id,
                req.quantity,
                req.payment_ref,
                *risk.args,
                buckets,
            ],
        )
        rc = ReturnCode(code)
        if rc is ReturnCode.WRONG_BUCKETS:
            self.buckets.learn(sale, int(value))
            raise WrongBuckets()
        refused = rc if rc in (ReturnCode.RISK_DENIED, ReturnCode.RISK_CHALLENGE) else None
        outcome = RiskOutcome(
            refused, int(score), _positions(fired), _positions(shadow), int(solution)
        )
        if rc is ReturnCode.RATE_LIMITED:
            raise errors.RateLimited(math.ceil(int(value) / 1000), limit=status)
        if refused is not None:
            return None, outcome
        if rc is ReturnCode.BUCKET_SHORT:
            # Risk allowed it (and counted it); the retries after the refill are plain
            # reservations, so that the attempt is not scored twice.
            return await self._refill_and_reserve(req, now, buckets, home), outcome
        _refuse(rc, order_id, status, sale, now)
        return Reservation(order_id, status, int(value), rc is ReturnCode.REPLAYED), outcome

    def _order_keys(self, order_id: str) -> list[str]:
        """The keys of an order's scripts: those of the bucket its id names."""
        k, shard = self.keys, shard_of_order(order_id)
        return [
            k.sale(shard),
            k.order(order_id),
            k.deadlines(shard),
            k.events(shard),
            k.buyers(shard),
        ]

    async def confirm(
        self,
        sale_id: str,
        order_id: str,
        channel_id: str,
        payment_ref: str,
        now: int | None = None,
    ) -> tuple[str, int]:
        code, status, expires_at = await self.scripts.confirm(
            keys=self._order_keys(order_id),
            args=[now_ms() if now is None else now, order_id, channel_id, payment_ref],
        )
        raise_for(ReturnCode(code))
        return status, int(expires_at)

    async def cancel(
        self, sale_id: str, order_id: str, channel_id: str, now: int | None = None
    ) -> str:
        code, status = await self.scripts.cancel(
            keys=self._order_keys(order_id),
            args=[now_ms() if now is None else now, order_id, channel_id],
        )
        raise_for(ReturnCode(code))
        if code == ReturnCode.OK and self.buckets.known(sale_id) > 1:
            await self.buckets.undrain(sale_id)  # the unit is back: let every bucket look
        return str(status)

    async def request_refund(
        self,
        order_id: str,
        channel_id: str,
        now: int | None = None,
    ) -> RefundRequest:
        """refund.lua: a reserved order is refunded at once (stock back); a confirmed or
        delivered one is marked requested (`pending`), to be settled by core/refunds.py."""
        code, status, user, qty, created = await self.scripts.refund(
            keys=self._order_keys(order_id),
            args=[now_ms() if now is None else now, order_id, channel_id],
        )
        rc = ReturnCode(code)
        raise_for(rc)
        if rc is ReturnCode.OK:
            await self._undrain_if_buckets(order_id)
        return RefundRequest(
            order_id,
            channel_id,
            str(status),
            str(user),
            int(qty),
            int(created),
            pending=rc is ReturnCode.REFUND_PENDING,
        )

    async def finish_refund(
        self,
        order_id: str,
        outcome: str,
        now: int | None = None,
    ) -> tuple[ReturnCode, str]:
        """refund_finish.lua: apply PostgreSQL's decision ("returned" | "voided") to the
        ledger, once. Returns (code, outcome applied)."""
        k, shard = self.keys, shard_of_order(order_id)
        code, applied = await self.scripts.refund_finish(
            keys=[k.sale(shard), k.order(order_id), k.buyers(shard)],
            args=[now_ms() if now is None else now, outcome],
        )
        rc = ReturnCode(code)
        if rc is ReturnCode.OK and applied == "returned":
            await self._undrain_if_buckets(order_id)
        return rc, str(applied)

    async def _undrain_if_buckets(self, order_id: str) -> None:
        sale_id = sale_of_order(order_id)
        if self.buckets.known(sale_id) > 1:
            await self.buckets.undrain(sale_id)  # a unit is back: let every bucket look

    async def expire_due(self, sale_id: str, now: int | None = None, limit: int = 500) -> int:
        """Expire reservations of one ledger shard (a sale, or one of its stock buckets:
        `buckets.shards`) whose deadline passed; returns how many expired.

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
            keys=[
                k.sale(sale_id),
                key,
                k.events(sale_id),
                k.buyers(sale_id),
                *(k.order(order_id) for order_id in due),
            ],
            args=[now, *due],
        )
        return sum(1 for code in codes if code == ReturnCode.OK)

    async def shards(self, sale_id: str) -> list[str]:
        """The ledger shards of a sale, one per stock bucket (workers consume and sweep each)."""
        return await self.buckets.shards(sale_id)

    async def recover_transfers(self, sale_id: str, now: int | None = None) -> int:
        """Finish the sale's transfers between buckets left pending by a crash."""
        return await self.buckets.recover(sale_id, now_ms() if now is None else now)

    async def mark_delivered(self, order_ids: list[str], now: int | None = None) -> list[int]:
        """Flip confirmed orders to delivered (after their keys are committed): one script call
        per sale for the whole batch. Returns one code per order, in order."""
        if not order_ids:
            return []
        now = now_ms() if now is None else now
        by_shard: dict[str, list[int]] = {}
        for i, order_id in enumerate(order_ids):
            by_shard.setdefault(shard_of_order(order_id), []).append(i)
        codes = [0] * len(order_ids)
        for shard, positions in by_shard.items():
            replies = await self.scripts.deliver(
                keys=[self.keys.sale(shard), *(self.keys.order(order_ids[i]) for i in positions)],
                args=[now],
            )
            for i, code in zip(positions, replies, strict=True):
                codes[i] = int(code)
        return codes

    async def order(self, order_id: str) -> dict[str, str] | None:
        """An order's live state (every buyer's poll reads it: through the pipe when there is
        one, a flat RESP2 reply of field, value, ...)."""
        key = self.keys.order(order_id)
        if self.pipe is None:
            data = cast(dict[str, str], await self.redis.hgetall(key))
        else:
            flat = await self.pipe.execute("HGETALL", key)
            data = dict(zip(flat[::2], flat[1::2], strict=True))
        return data or None
