"""The seam where risk decides, before any stock is touched.

The gateway calls `RiskEngine.assess()` for every purchase; a DENY or CHALLENGE stops it before
the reservation script runs. The scoring engine (rules over device/IP/frequency signals) plugs
in here; until then `AllowAll` lets every request through.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


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


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    score: int = 0
    reasons: tuple[str, ...] = field(default=())


ALLOW = Decision(Verdict.ALLOW)


class RiskEngine(Protocol):
    async def assess(self, ctx: RiskContext) -> Decision: ...


class AllowAll:
    async def assess(self, ctx: RiskContext) -> Decision:
        return ALLOW
