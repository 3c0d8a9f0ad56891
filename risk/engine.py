"""The seam where risk decides, before any stock is touched.

For every purchase the gateway asks `RiskEngine.plan()`. The answer is either
- a final `Decision` (lists, risk off, or the split mode's separate features call): a DENY or
  CHALLENGE stops the purchase before the reservation script runs; or
- a `RiskPlan`: the arguments with which lua/purchase.lua scores the request in the
  reservation's own round trip; the gateway then hands the script's `RiskOutcome` to
  `RiskEngine.judge()` for the decision (reasons, counts, a challenge to solve).
An admission limit raises `core.errors.RateLimited`. The scoring engine (risk/scoring.py) is the
real one; `AllowAll` lets every request through (risk switched off).
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Any, Protocol

import msgspec

from core.ledger import RiskArgs, RiskOutcome

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Verdict(enum.Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"
    DENY = "deny"


class RiskContext(msgspec.Struct, frozen=True):
    """One purchase as risk sees it. `user_id` is the storefront's own id: users are namespaced
    by channel (`Signals.buyer`), devices and addresses are global."""

    sale_id: str
    channel_id: str
    user_id: str
    device_id: str
    client_ip: str
    user_agent: str | None
    quantity: int
    challenge_solution: str | None = None  # header Flashgate-Challenge-Solution, if sent
    idempotency_key: str = ""  # a retry of an answered key is never refused by risk
    # The request's fingerprint (the sale and whole body, as the ledger's idempotency keeps
    # it): a verdict stored under a key is honoured only for the same request.
    fingerprint: str = ""
    # client_ip as the gateway parsed it (risk.signals.parse_ip) when it checked it: parsed once
    # per purchase. None: parsed by Signals.of.
    address: IPAddress | None = None
    # A sale of several stock buckets (core/buckets.py): the buyer's home bucket's ledger shard
    # ("" = the sale itself) and the bucket count. Risk keys then live in that shard, so that
    # the inline purchase script's keys share its slot; the sale's and channels' admission
    # rates are split evenly over the buckets.
    shard: str = ""
    buckets: int = 1


class Decision(msgspec.Struct, frozen=True):
    verdict: Verdict
    score: int = 0
    reasons: tuple[str, ...] = ()
    challenge: dict[str, Any] | None = None  # with CHALLENGE: what the client must solve
    shadow: tuple[str, ...] = ()  # shadow rules that fired (reported, not acted)


ALLOW = Decision(Verdict.ALLOW)


class RiskPlan(msgspec.Struct, frozen=True):
    """Scoring to be done inside the reservation script, and what judging its outcome needs."""

    script: RiskArgs
    context: Any  # the engine's own state for judge() (signals, config, rule names...)


class RiskEngine(Protocol):
    async def plan(self, ctx: RiskContext) -> Decision | RiskPlan: ...

    def judge(self, plan: RiskPlan, outcome: RiskOutcome) -> Decision: ...


class AllowAll:
    async def plan(self, ctx: RiskContext) -> Decision | RiskPlan:
        return ALLOW

    def judge(self, plan: RiskPlan, outcome: RiskOutcome) -> Decision:
        return ALLOW
