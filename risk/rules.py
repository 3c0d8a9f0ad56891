"""The named rules: each looks at one request's signals and features and says whether it fires.

A rule is a function `(inputs, limit) -> bool | None`; `None` means its feature could not be
read in time, and the rule's `on_error` policy decides (open = does not fire, closed = fires).
Weights, limits and modes live in the config (risk/rules.json), not here.

To add a rule: write the function, add it to RULES, give it an entry in rules.json (a rule
missing from the config is off), and document it in docs/RISK.md.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from risk.signals import Signals


class Features(msgspec.Struct, frozen=True):
    """What lua/risk_features.lua returns for one admitted request (this request included)."""

    user_1s: int
    user_60s: int
    device_1s: int
    device_60s: int
    ip_1s: int
    ip_60s: int
    subnet_1s: int
    subnet_60s: int
    device_users: int  # distinct users seen on this device during the sale
    ip_users: int  # distinct users seen from this ip during the sale
    user_held: int  # units the user already holds in the sale
    solution_fresh: bool


class Inputs(msgspec.Struct, frozen=True):
    signals: Signals
    features: Features | None  # None: the features call failed or timed out
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


# Feature rules fire when a feature exceeds the rule's limit. Inline (purchase.lua) they are
# scored in Redis by the feature's position in FEATURE_ORDER, the order the Lua returns them.
FEATURE_ORDER = tuple(f for f in Features.__struct_fields__ if f != "solution_fresh")
FEATURE_OF: dict[str, str] = {
    "user_burst": "user_1s",
    "user_rate": "user_60s",
    "device_burst": "device_1s",
    "device_rate": "device_60s",
    "device_many_users": "device_users",
    "ip_burst": "ip_1s",
    "ip_rate": "ip_60s",
    "ip_many_users": "ip_users",
    "subnet_burst": "subnet_1s",
    "subnet_rate": "subnet_60s",
    "user_holds": "user_held",
}

RULES: dict[str, Rule] = {
    **{name: _above(feature) for name, feature in FEATURE_OF.items()},
    "datacenter_ip": lambda inputs, limit: inputs.datacenter,
    "invalid_ip": lambda inputs, limit: inputs.signals.address is None,
    "no_user_agent": lambda inputs, limit: inputs.signals.user_agent is None,
}

NEEDS_FEATURES = frozenset(FEATURE_OF)
