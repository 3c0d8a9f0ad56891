"""The Lua scripts (lua/*.lua), loaded once per client, and the enum of their return codes.

Scripts are package data, read with importlib.resources; a line `--!include NAME` is replaced
by lua/includes/NAME.lua so that shared Lua lives in one place. redis-py's AsyncScript runs
them with EVALSHA and reloads on NOSCRIPT, so a flushed script cache is survived. Given an
AutoPipeline (single-node Redis), the scripts run through it instead (core/autopipeline.py: the
same EVALSHA, NOSCRIPT fallback and errors, with concurrent calls sharing round trips).
"""

from __future__ import annotations

import enum
import re
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from core.autopipeline import AutoPipeline, PipelinedScript

_INCLUDE = re.compile(r"^--!include (\w+)$", re.MULTILINE)


class ReturnCode(enum.IntEnum):
    """Return codes shared by all scripts (see each script's header)."""

    OK = 0
    REPLAYED = 1  # idempotent replay / nothing left to do
    REFUND_PENDING = 2  # refund: requested; PostgreSQL settles it, then refund_finish
    SOLD_OUT = -1
    LIMIT_EXCEEDED = -2
    SALE_NOT_ACTIVE = -3
    NO_SALE = -4
    IDEMPOTENCY_MISMATCH = -5
    INSUFFICIENT_STOCK = -6
    NO_ORDER = -7
    EXPIRED = -8
    CANCELLED = -9
    NOT_CANCELLABLE = -10
    NOT_DELIVERABLE = -11
    RATE_LIMITED = -12  # risk_features/purchase: an admission limit refused the request
    RISK_DENIED = -13  # purchase: the score reached the deny threshold
    RISK_CHALLENGE = -14  # purchase: the score asks for proof of work
    BUCKET_SHORT = -15  # reserve/purchase, sale of several buckets: this bucket is short
    WRONG_BUCKETS = -16  # reserve/purchase/init_sale: the sale has another bucket count
    BAD_QUANTITY = -17  # reserve/purchase: the quantity is not a whole number >= 1
    NOT_REFUNDABLE = -18  # refund: the order was cancelled or expired (nothing was paid)
    REFUNDED = -19  # confirm/cancel: the order was refunded


SCRIPT_NAMES = (
    "init_sale",
    "add_stock",
    "reserve",
    "purchase",
    "confirm",
    "cancel",
    "expire",
    "deliver",
    "risk_features",
    "withdraw",
    "deposit",
    "settle",
    "mark_drained",
    "restore_sale",
    "refund",
    "refund_finish",
    "merge_orders",
)


@cache
def source(name: str) -> str:
    text = resources.files("lua").joinpath(f"{name}.lua").read_text()

    def include(match: re.Match[str]) -> str:
        return resources.files("lua").joinpath(f"includes/{match.group(1)}.lua").read_text()

    return _INCLUDE.sub(include, text)


class Scripts:
    """One script object per Lua file: redis-py's AsyncScript bound to one client, or a
    PipelinedScript on `pipe`. Both are called as `await script(keys=[...], args=[...])`."""

    def __init__(self, redis: Redis, pipe: AutoPipeline | None = None) -> None:
        def script(name: str) -> Any:
            text = source(name)
            return PipelinedScript(pipe, text) if pipe is not None else redis.register_script(text)

        self.init_sale = script("init_sale")
        self.add_stock = script("add_stock")
        self.reserve = script("reserve")
        self.purchase = script("purchase")
        self.confirm = script("confirm")
        self.cancel = script("cancel")
        self.expire = script("expire")
        self.deliver = script("deliver")
        self.risk_features = script("risk_features")
        self.withdraw = script("withdraw")
        self.deposit = script("deposit")
        self.settle = script("settle")
        self.mark_drained = script("mark_drained")
        self.restore_sale = script("restore_sale")
        self.refund = script("refund")
        self.refund_finish = script("refund_finish")
        self.merge_orders = script("merge_orders")

    def all(self) -> list[AsyncScript | PipelinedScript]:
        return [getattr(self, name) for name in SCRIPT_NAMES]

    async def load(self, redis: Redis) -> None:
        """Pre-load every script so the first purchase doesn't pay for SCRIPT LOAD."""
        for script in self.all():
            script.sha = await redis.script_load(script.script)
