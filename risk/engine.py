"""The seam where risk decides, before any stock is touched.

The gateway calls `RiskEngine.assess()` for every purchase; a DENY or CHALLENGE stops it before
the reservation script runs, and an admission limit raises `core.errors.RateLimited`. The
scoring engine (risk/scoring.py: lists, rules over device/ip/frequency features, proof of work)
is the real one; `AllowAll` lets every request through (risk switched off).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Verdict(enum.Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"
    DENY = "deny"


@dataclass(frozen=True)
class RiskContext:
    sale_id: str
    channel_id: str
    user_id: str
    device_id: str
    client_ip: str
    user_agent: str | None
    quantity: int
    challenge_solution: str | None = None  # header Flashgate-Challenge-Solution, if sent
    idempotency_key: str = ""  # a retry of an answered key is never refused by risk


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    score: int = 0
    reasons: tuple[str, ...] = field(default=())
    challenge: dict[str, Any] | None = None  # with CHALLENGE: what the client must solve
    shadow: tuple[str, ...] = field(default=())  # shadow rules that fired (reported, not acted)


ALLOW = Decision(Verdict.ALLOW)


class RiskEngine(Protocol):
    async def assess(self, ctx: RiskContext) -> Decision: ...


class AllowAll:
    async def assess(self, ctx: RiskContext) -> Decision:
        return ALLOW
