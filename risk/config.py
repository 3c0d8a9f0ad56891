"""The risk configuration: a versioned file (risk/rules.json by default) and per-sale overrides.

Both are validated when loaded: unknown fields or rules, out-of-range numbers and thresholds
in the wrong order are errors that name the path (`$.rules.user_burst.weight`). An override is
a partial document merged over the file (objects merge key by key, values replace).
"""

from __future__ import annotations

import asyncio
import copy
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from redis.asyncio import Redis

from core.keys import Keys
from risk.rules import RULES

Percent = Annotated[int, Meta(ge=0, le=100)]
# Bounds that keep every value meaningful and the Lua arithmetic exact (GCRA in microseconds
# as integers in a double): a rate is 0 (unlimited) or MIN_RATE..MAX_RATE requests per second,
# so one emission interval lies between 1 us and 100 s; a burst is 1..MAX_BURST intervals.
MIN_RATE, MAX_RATE = 0.01, 1_000_000.0
MAX_BURST = 1_000_000
Rate = Annotated[float, Meta(ge=0, le=MAX_RATE)]
Burst = Annotated[int, Meta(ge=1, le=MAX_BURST)]
MAX_LIMIT = 1_000_000  # a rule's limit (requests in a window, distinct users, units held)


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class RuleConfig(_Base, frozen=True):
    weight: Percent
    limit: Annotated[int, Meta(ge=0, le=MAX_LIMIT)] = 0
    mode: Literal["on", "shadow", "off"] = "on"  # shadow: counted, never acts
    on_error: Literal["open", "closed"] = "open"  # features unreadable: skip / fire


class Thresholds(_Base, frozen=True):
    challenge: Annotated[int, Meta(ge=1, le=101)] = 40  # score >= challenge -> challenge
    deny: Annotated[int, Meta(ge=1, le=101)] = 80  # score >= deny -> deny (101: never)


class Admission(_Base, frozen=True):
    """GCRA limits, requests per second with a burst; a rate of 0 means unlimited, any other
    is MIN_RATE..MAX_RATE. Off (0) by default and in the shipped rules.json: a limit nobody
    sized for the sale would cap a big channel silently (docs/RISK.md, "Admission limits");
    set them per sale (an override) or in the file. A 429 names the one that answered."""

    sale_rate: Rate = 0
    sale_burst: Burst = 1
    channel_rate: Rate = 0
    channel_burst: Burst = 1


class ChallengeConfig(_Base, frozen=True):
    """Proof of work: the solver tries on average work/2 hashes, from min_work at the challenge
    threshold up to max_work just below the deny threshold."""

    min_work: Annotated[int, Meta(ge=1, le=100_000_000)] = 20_000
    max_work: Annotated[int, Meta(ge=1, le=100_000_000)] = 500_000
    ttl_s: Annotated[int, Meta(ge=5, le=3600)] = 120


class RiskConfig(_Base, frozen=True):
    version: Annotated[int, Meta(ge=1, le=1)]  # the only format so far
    rules: dict[str, RuleConfig]
    thresholds: Thresholds = Thresholds()
    admission: Admission = Admission()
    challenge: ChallengeConfig = ChallengeConfig()


class ConfigInvalid(ValueError):
    """The config or an override does not validate; the message names the path."""


def _check_rules(doc: Any) -> None:
    """Each rule on its own first, so that an error names it (`$.rules.user_burst.limit`, not
    msgspec's `$.rules[...].limit`)."""
    rules = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(rules, dict):
        return
    for name, rule in rules.items():
        try:
            msgspec.convert(rule, RuleConfig)
        except msgspec.ValidationError as exc:
            text = str(exc)
            text = (
                text.replace("`$", f"`$.rules.{name}")
                if " - at `$" in text
                else f"{text} - at `$.rules.{name}`"
            )
            raise ConfigInvalid(text) from None


def parse(doc: Any) -> RiskConfig:
    _check_rules(doc)
    try:
        cfg = msgspec.convert(doc, RiskConfig)
    except msgspec.ValidationError as exc:
        raise ConfigInvalid(str(exc)) from None
    unknown = sorted(set(cfg.rules) - set(RULES))
    if unknown:
        raise ConfigInvalid(f"unknown rules: {', '.join(unknown)} - at `$.rules`")
    if cfg.thresholds.challenge > cfg.thresholds.deny:
        raise ConfigInvalid("thresholds.challenge must not exceed thresholds.deny")
    if cfg.challenge.min_work > cfg.challenge.max_work:
        raise ConfigInvalid("challenge.min_work must not exceed challenge.max_work")
    for name in ("sale_rate", "channel_rate"):
        rate = getattr(cfg.admission, name)
        if 0 < rate < MIN_RATE:
            raise ConfigInvalid(
                f"Expected `float` of 0 (unlimited) or >= {MIN_RATE} - at `$.admission.{name}`"
            )
    return cfg


def load(path: str | Path | None = None) -> RiskConfig:
    """The config file (default: the rules.json shipped in this package)."""
    if path:
        raw = Path(path).read_bytes()
    else:
        raw = resources.files("risk").joinpath("rules.json").read_bytes()
    name = path or "risk/rules.json"
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigInvalid(f"{name}: not valid JSON: {exc}") from None
    try:
        return parse(doc)
    except ConfigInvalid as exc:  # at start-up: say which file
        raise ConfigInvalid(f"{name}: {exc}") from None


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def with_override(base: RiskConfig, override: dict[str, Any]) -> RiskConfig:
    if "version" in override:
        raise ConfigInvalid("an override can't change `version` - at `$.version`")
    return parse(_merge(msgspec.to_builtins(base), override))


class SaleConfigs:
    """Each sale's effective config: the file merged with the sale's override (kept in Redis),
    cached in process for `ttl_s` so that the hot path rarely pays a round trip for it."""

    def __init__(self, redis: Redis, keys: Keys, base: RiskConfig, ttl_s: float) -> None:
        self.redis, self.keys, self.base, self.ttl_s = redis, keys, base, ttl_s
        self._cache: dict[str, tuple[RiskConfig, float]] = {}
        self._loading: dict[str, asyncio.Future[RiskConfig]] = {}

    async def get(self, sale_id: str) -> RiskConfig:
        hit = self._cache.get(sale_id)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        # Single flight: at a sale's opening second every request misses at once; one read
        # serves them all instead of a stampede that drains the connection pool.
        loading = self._loading.get(sale_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(sale_id))
            self._loading[sale_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(sale_id, None))
        return await asyncio.shield(loading)

    async def _load(self, sale_id: str) -> RiskConfig:
        now = time.monotonic()
        raw = await self.redis.get(self.keys.risk_config(sale_id))
        cfg = self.base
        if raw:
            try:
                cfg = with_override(self.base, msgspec.json.decode(raw))
            except (ConfigInvalid, msgspec.DecodeError):
                cfg = self.base  # validated when stored; the file changed under it since
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[sale_id] = (cfg, now + self.ttl_s)
        return cfg

    async def override(self, sale_id: str) -> dict[str, Any]:
        raw = await self.redis.get(self.keys.risk_config(sale_id))
        doc: dict[str, Any] = msgspec.json.decode(raw) if raw else {}
        return doc

    async def set_override(self, sale_id: str, override: dict[str, Any]) -> RiskConfig:
        """Validate and store a sale's override (an empty one removes it)."""
        cfg = with_override(self.base, override)
        await self.store_override(sale_id, override)
        return cfg

    async def store_override(self, sale_id: str, override: dict[str, Any]) -> None:
        """Store an override already validated (with_override) in Redis."""
        key = self.keys.risk_config(sale_id)
        if override:
            await self.redis.set(key, msgspec.json.encode(override))
        else:
            await self.redis.delete(key)
        self._cache.pop(sale_id, None)
