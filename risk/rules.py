"""The named rules: each looks at one request's signals and features and says whether it fires.

A rule is a function `(inputs, limit) -> bool | None`; `None` means its feature could not be
read in time, and the rule's `on_error` policy decides (open = does not fire, closed = fires).
Weights, limits and modes live in the config (risk/rules.json), not here.

To add a rule: write the function, add it to RULES, give it an entry in rules.json (a rule
missing from the config is off), and document it in docs/RISK.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from risk.signals import Signals


@dataclass(frozen=True)
class Features:
    """What lua/risk_features.lua returns for one admitted request (this request included)."""

    user_1s: int
    user_60s: int
    device_1s: int
    device_60s: int
    ip_1s: int
    ip_60s: int
    subnet_1s: int
    subnet_60s: int
    device_users: int   # distinct users seen on this device during the sale
    ip_users: int       # distinct users seen from this ip during the sale
    user_held: int      # units the user already holds in the sale
    solution_fresh: bool


@dataclass(frozen=True)
class Inputs:
    signals: Signals
    features: Features | None   # None: the features call failed or timed out
    datacenter: bool


Rule = Callable[[Inputs, int], bool | None]


def _above(feature: str) -> Rule:
    def rule(inputs: Inputs, limit: int) -> bool | None:
        if inputs.features is None:
            return None
        value: int = getattr(inputs.features, feature)
        return value > limit

    rule.__doc__ = f"{feature} > limit"
    return rule


RULES: dict[str, Rule] = {
    "user_burst": _above("user_1s"),
    "user_rate": _above("user_60s"),
    "device_burst": _above("device_1s"),
    "device_rate": _above("device_60s"),
    "device_many_users": _above("device_users"),
    "ip_burst": _above("ip_1s"),
    "ip_rate": _above("ip_60s"),
    "ip_many_users": _above("ip_users"),
    "subnet_burst": _above("subnet_1s"),
    "subnet_rate": _above("subnet_60s"),
    "user_holds": _above("user_held"),
    "datacenter_ip": lambda inputs, limit: inputs.datacenter,
    "invalid_ip": lambda inputs, limit: inputs.signals.address is None,
    "no_user_agent": lambda inputs, limit: inputs.signals.user_agent is None,
}

NEEDS_FEATURES = frozenset(
    name for name in RULES if name not in ("datacenter_ip", "invalid_ip", "no_user_agent")
)
