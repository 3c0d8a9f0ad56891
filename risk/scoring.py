"""The scoring engine: lists, then admission and features, then rules, score, verdict, and a
proof-of-work challenge for the grey zone.

    lists (in memory)      allow -> ALLOW, block -> DENY      (allow wins over block)
    admission, features    limits -> 429; counters, distinct users, holdings (Redis)
    rules (config)         weights of fired rules -> score 0-100 (shadow rules only counted)
    thresholds (per sale)  score >= deny -> DENY; >= challenge -> CHALLENGE unless a fresh,
                           valid solution came with the request -> ALLOW

Two modes (FLASHGATE_RISK_INLINE):
- inline (default), `plan()` + `judge()`: the rules that need Redis features are scored inside
  lua/purchase.lua, in the reservation's own round trip; the rules decided from the request
  alone (datacenter ip, invalid ip, no user agent) are scored here and passed in as a base.
  Features can't be missing without the reservation failing too, so no failure policy applies:
  Redis down means 503 and nothing sold.
- split, `assess()`: a separate call to lua/risk_features.lua with a deadline before the
  reservation; when it can't be read in time, each rule's `on_error` decides (open by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import redis.exceptions
from redis.asyncio import Redis

from core import errors, metrics
from core.keys import Keys
from core.ledger import RiskArgs, RiskOutcome
from core.scripts import ReturnCode, Scripts
from core.settings import Settings
from risk import config as risk_config
from risk.challenge import Challenges, Verified
from risk.config import RiskConfig, SaleConfigs
from risk.engine import ALLOW, Decision, RiskContext, RiskPlan, Verdict
from risk.lists import CidrSet, RiskLists, load_datacenter_ranges
from risk.rules import FEATURE_OF, FEATURE_ORDER, RULES, Features, Inputs
from risk.signals import Signals

_FEATURE_ERRORS = (
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class _Inline(msgspec.Struct, frozen=True):
    """What judging an inline outcome needs from its plan."""

    sig: Signals
    cfg: RiskConfig
    now_s: float
    verified: Verified | None
    names: tuple[str, ...]  # feature rules in the order sent to the script
    base: tuple[tuple[int, str], ...]  # (weight, name) of request-only rules that fired
    base_shadow: tuple[str, ...]


def _per_bucket(adm: risk_config.Admission, buckets: int) -> risk_config.Admission:
    """A sale's admission limits as one stock bucket enforces them: rates (and bursts, at
    least 1) split evenly, since each bucket sees about 1/N of the buyers."""
    if buckets <= 1:
        return adm
    return risk_config.Admission(
        sale_rate=adm.sale_rate / buckets,
        sale_burst=max(1, math.ceil(adm.sale_burst / buckets)),
        channel_rate=adm.channel_rate / buckets,
        channel_burst=max(1, math.ceil(adm.channel_burst / buckets)),
    )


def _solution_marker(verified: Verified | None, now_s: float) -> tuple[str, int]:
    """The used-solution marker's id and TTL (ms) for a genuine solution; ("-", 0) otherwise."""
    if verified is not None and verified.challenge_id and verified.expires_at:
        return verified.challenge_id, max(1000, int((verified.expires_at - now_s + 5) * 1000))
    return "-", 0


_COMPILED: dict[int, tuple[RiskConfig, tuple[str, tuple[str, ...], tuple[Any, ...]]]] = {}


def _compiled(cfg: RiskConfig) -> tuple[str, tuple[str, ...], tuple[Any, ...]]:
    """A config's feature rules as purchase.lua's rule spec (with their names, in order) and its
    request-only rules; computed once per config object, not per request."""
    hit = _COMPILED.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    spec: list[str] = []
    names: list[str] = []
    request_rules: list[Any] = []
    for name, rule in cfg.rules.items():
        if rule.mode == "off":
            continue
        feature = FEATURE_OF.get(name)
        if feature is None:
            request_rules.append((name, rule))
            continue
        mode = 2 if rule.mode == "shadow" else 1
        spec.append(f"{FEATURE_ORDER.index(feature) + 1}:{rule.limit}:{rule.weight}:{mode}")
        names.append(name)
    if len(_COMPILED) > 1000:
        _COMPILED.clear()
    compiled = (";".join(spec), tuple(names), tuple(request_rules))
    _COMPILED[id(cfg)] = (cfg, compiled)
    return compiled


class ScoringEngine:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        config: RiskConfig,
        datacenter: CidrSet,
        challenge_secret: bytes,
        timeout_s: float = 0.05,
        cache_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        inline: bool = True,
    ) -> None:
        self.keys = keys
        self.configs = SaleConfigs(redis, keys, config, cache_ttl_s)
        self.lists = RiskLists(redis, keys, cache_ttl_s)
        self.datacenter = datacenter
        self.challenges = Challenges(challenge_secret)
        self.timeout_s = timeout_s
        self.clock = clock
        self.inline = inline
        self.counts: Counter[str] = metrics.RiskCounts()  # mirrored into Prometheus counters
        self._script = Scripts(redis).risk_features

    @classmethod
    def from_settings(cls, redis: Redis, keys: Keys, settings: Settings) -> ScoringEngine:
        if settings.risk_challenge_secret is not None:
            secret = settings.risk_challenge_secret.reveal().encode()
        else:
            secret = hmac.new(
                settings.active_master_key.material, b"flashgate/risk/challenge", hashlib.sha256
            ).digest()
        return cls(
            redis,
            keys,
            config=risk_config.load(settings.risk_config_file or None),
            datacenter=load_datacenter_ranges(settings.risk_datacenter_file or None),
            challenge_secret=secret,
            timeout_s=settings.risk_timeout_ms / 1000,
            cache_ttl_s=settings.risk_cache_ttl_s,
            inline=settings.risk_inline,
        )

    # -- inline mode ------------------------------------------------------------------------
    async def plan(self, ctx: RiskContext) -> Decision | RiskPlan:
        if not self.inline:
            return await self.assess(ctx)
        prelude = await self._prelude(ctx)
        if isinstance(prelude, Decision):
            return prelude
        sig, cfg, now_s, verified = prelude
        # Rules decided from the request alone: scored here, passed in as the base score.
        inputs = Inputs(sig, None, sig.address is not None and sig.address in self.datacenter)
        base: list[tuple[int, str]] = []
        base_shadow: list[str] = []
        spec, names, request_rules = _compiled(cfg)
        for name, rule in request_rules:
            if RULES[name](inputs, rule.limit):
                if rule.mode == "shadow":
                    base_shadow.append(name)
                else:
                    base.append((rule.weight, name))
        k, sale = self.keys, ctx.shard or sig.sale_id
        challenge_id, solution_ttl_ms = _solution_marker(verified, now_s)
        adm, t = _per_bucket(cfg.admission, ctx.buckets), cfg.thresholds
        script = RiskArgs(
            keys=(
                k.risk_admission(sale),
                k.risk_admission(sale, sig.channel_id),
                k.risk_counter(sale, "u", sig.buyer),
                k.risk_counter(sale, "d", sig.device_id),
                k.risk_counter(sale, "i", sig.ip),
                k.risk_counter(sale, "s", sig.subnet),
                k.risk_distinct_users(sale, "d", sig.device_id),
                k.risk_distinct_users(sale, "i", sig.ip),
                k.risk_solution(sale, challenge_id),
                k.risk_verdicts(sale),
            ),
            args=(
                adm.sale_rate,
                adm.sale_burst,
                adm.channel_rate,
                adm.channel_burst,
                solution_ttl_ms,
                min(100, sum(w for w, _ in base)),
                t.challenge,
                t.deny,
                spec,
            ),
        )
        return RiskPlan(
            script, _Inline(sig, cfg, now_s, verified, names, tuple(base), tuple(base_shadow))
        )

    def judge(self, plan: RiskPlan, outcome: RiskOutcome) -> Decision:
        p: _Inline = plan.context
        rules = p.cfg.rules
        fired = [*p.base, *((rules[p.names[i - 1]].weight, p.names[i - 1]) for i in outcome.fired)]
        fired.sort(key=lambda wn: (-wn[0], wn[1]))
        reasons = tuple(n for _, n in fired)
        shadow = (*p.base_shadow, *(p.names[i - 1] for i in outcome.shadow))
        for name in reasons:
            self.counts[f"rule:{name}:fired"] += 1
        for name in shadow:
            self.counts[f"rule:{name}:shadow"] += 1
        if outcome.refused is ReturnCode.RISK_DENIED:
            return self._decide(Decision(Verdict.DENY, outcome.score, reasons, shadow=shadow))
        if outcome.refused is ReturnCode.RISK_CHALLENGE:
            problem = (p.verified.problem or "solution_replayed") if p.verified else None
            if outcome.solution == 2:
                problem = "solution_replayed"
            if problem:
                self.counts[f"challenge:{problem}"] += 1
                reasons = (*reasons, problem)
            return self._decide(
                self._challenge(p.cfg, p.sig, outcome.score, reasons, shadow, p.now_s)
            )
        if outcome.solution == 1:
            self.counts["challenge:solved"] += 1
            reasons = (*reasons, "challenge_solved")
        return self._decide(Decision(Verdict.ALLOW, outcome.score, reasons, shadow=shadow))

    def _listed(self, lists: Any, sig: Signals) -> Decision | None:
        listed = lists.match(sig)
        if listed is None:
            return None
        action, kind = listed
        self.counts[f"list:{action}:{kind}"] += 1
        if action == "allow":
            return self._decide(Decision(Verdict.ALLOW, 0, (f"allow_list_{kind}",)))
        return self._decide(Decision(Verdict.DENY, 100, (f"block_list_{kind}",)))

    def _challenge(
        self,
        cfg: RiskConfig,
        sig: Signals,
        score: int,
        reasons: tuple[str, ...],
        shadow: tuple[str, ...],
        now_s: float,
    ) -> Decision:
        """A proof-of-work challenge whose work grows with the score."""
        t, c = cfg.thresholds, cfg.challenge
        span = max(1, t.deny - t.challenge)
        work = c.min_work + int(min(1.0, (score - t.challenge) / span) * (c.max_work - c.min_work))
        challenge = self.challenges.issue(sig, work, c.ttl_s, now_s)
        return Decision(Verdict.CHALLENGE, score, reasons, challenge, shadow)

    # -- split mode -------------------------------------------------------------------------
    def _decide(self, decision: Decision) -> Decision:
        self.counts[f"verdict:{decision.verdict.value}"] += 1
        return decision

    async def _prelude(
        self, ctx: RiskContext
    ) -> Decision | tuple[Signals, RiskConfig, float, Verified | None]:
        """Both modes start here: a list match decides at once; otherwise the request's signals,
        its sale's config, the clock and the presented solution (checked, not yet spent)."""
        sig = Signals.of(ctx)
        listed = self._listed(await self.lists.current(), sig)
        if listed is not None:
            return listed
        cfg = await self.configs.get(ctx.sale_id)
        now_s = self.clock()
        verified = (
            self.challenges.verify(ctx.challenge_solution, sig, now_s)
            if ctx.challenge_solution
            else None
        )
        return sig, cfg, now_s, verified

    async def assess(self, ctx: RiskContext) -> Decision:
        prelude = await self._prelude(ctx)
        if isinstance(prelude, Decision):
            return prelude
        sig, cfg, now_s, verified = prelude
        features, score_it = await self._features(
            sig, cfg, now_s, verified, ctx.idempotency_key, ctx.shard, ctx.buckets, ctx.fingerprint
        )
        if not score_it:
            self.counts["passed:replay_or_unknown_sale"] += 1
            return ALLOW  # the reservation replays its answer, or answers 404 or 409
        inputs = Inputs(sig, features, sig.address is not None and sig.address in self.datacenter)
        score, reasons, shadow = self._score(cfg, inputs)

        t = cfg.thresholds
        if score >= t.deny:
            return self._decide(Decision(Verdict.DENY, score, reasons, shadow=shadow))
        if score < t.challenge:
            return self._decide(Decision(Verdict.ALLOW, score, reasons, shadow=shadow))
        if (
            verified is not None
            and verified.challenge_id
            and features is not None
            and features.solution_fresh
        ):
            self.counts["challenge:solved"] += 1
            return self._decide(
                Decision(Verdict.ALLOW, score, (*reasons, "challenge_solved"), shadow=shadow)
            )
        if verified is not None:
            problem = verified.problem or "solution_replayed"
            self.counts[f"challenge:{problem}"] += 1
            reasons = (*reasons, problem)
        return self._decide(self._challenge(cfg, sig, score, reasons, shadow, now_s))

    def _score(
        self, cfg: RiskConfig, inputs: Inputs
    ) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        fired: list[tuple[int, str]] = []
        shadow: list[str] = []
        for name, rule in cfg.rules.items():
            if rule.mode == "off":
                continue
            hit = RULES[name](inputs, rule.limit)
            if hit is None:  # its feature is unavailable: the rule's failure policy decides
                self.counts[f"rule:{name}:unavailable"] += 1
                hit = rule.on_error == "closed"
            if not hit:
                continue
            if rule.mode == "shadow":
                self.counts[f"rule:{name}:shadow"] += 1
                shadow.append(name)
            else:
                self.counts[f"rule:{name}:fired"] += 1
                fired.append((rule.weight, name))
        fired.sort(key=lambda wn: (-wn[0], wn[1]))
        score = min(100, sum(w for w, _ in fired))
        return score, tuple(n for _, n in fired), tuple(shadow)

    async def _features(
        self,
        sig: Signals,
        cfg: RiskConfig,
        now_s: float,
        verified: Verified | None,
        idempotency_key: str,
        shard: str = "",
        buckets: int = 1,
        fingerprint: str = "",
    ) -> tuple[Features | None, bool]:
        """(features, whether to score): not for an unknown sale, a sale not open now or an
        idempotent replay, which the reservation script answers. Raises RateLimited, and
        IdempotencyMismatch for a key first seen with another request; features None when
        unreadable."""
        k, sale = self.keys, shard or sig.sale_id
        challenge_id, solution_ttl_ms = _solution_marker(verified, now_s)
        adm = _per_bucket(cfg.admission, buckets)
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self._script(
                    keys=[
                        k.sale(sale),
                        k.risk_admission(sale),
                        k.risk_admission(sale, sig.channel_id),
                        k.risk_counter(sale, "u", sig.buyer),
                        k.risk_counter(sale, "d", sig.device_id),
                        k.risk_counter(sale, "i", sig.ip),
                        k.risk_counter(sale, "s", sig.subnet),
                        k.risk_distinct_users(sale, "d", sig.device_id),
                        k.risk_distinct_users(sale, "i", sig.ip),
                        k.buyers(sale),
                        k.risk_solution(sale, challenge_id),
                        k.idempotency(sale),
                        k.risk_memo(sale),
                    ],
                    args=[
                        int(now_s * 1000),
                        sig.buyer,
                        adm.sale_rate,
                        adm.sale_burst,
                        adm.channel_rate,
                        adm.channel_burst,
                        solution_ttl_ms,
                        f"{sig.channel_id}:{idempotency_key}" if idempotency_key else "",
                        fingerprint,
                    ],
                )
        except _FEATURE_ERRORS:
            self.counts["features:unavailable"] += 1
            return None, True
        code = ReturnCode(int(result[0]))
        if code in (ReturnCode.NO_SALE, ReturnCode.REPLAYED, ReturnCode.SALE_NOT_ACTIVE):
            return None, False
        if code is ReturnCode.IDEMPOTENCY_MISMATCH:
            raise errors.IdempotencyMismatch()
        if code is ReturnCode.RATE_LIMITED:
            self.counts["rate_limited"] += 1
            raise errors.RateLimited(math.ceil(int(result[1]) / 1000), limit=result[2])
        v = [int(x) for x in result[2:]]
        return Features(
            user_1s=v[0],
            user_60s=v[1],
            device_1s=v[2],
            device_60s=v[3],
            ip_1s=v[4],
            ip_60s=v[5],
            subnet_1s=v[6],
            subnet_60s=v[7],
            device_users=v[8],
            ip_users=v[9],
            user_held=v[10],
            solution_fresh=bool(v[11]),
        ), True
