"""The demo's audit: from what buyers were told and what they received, check the invariants.

Invariants (any breach makes the demo exit 1):
- oversold == 0: no more reservations than stock, and the sale's own ledger never shows
  available < 0 or totals that do not add up;
- reserved == min(stock, buyers x per-user limit): demand above stock sells out exactly;
- no buyer holds more than the per-user limit; an Idempotency-Key never yields two orders,
  and a retry of a successful purchase gets that same order back;
- every reservation is confirmed and every confirmed order delivered (lost_orders == 0);
- no card key is delivered to two orders (duplicate_keys == 0), and every delivered key is
  one that was imported (an unknown key counts as a lost order: its buyer got garbage).

Risk refusals are answers, not errors: 403 `risk_denied` is final for its key (a later 201 on
it is an idempotency violation), 428 `challenge_required` and 429 `rate_limited` are not (the
same key may succeed after a solution or a wait). Users refused by risk on every attempt never
reached the ledger, so "demand" above counts the users the ledger answered (201 or 409).

Attempts are classed honest or bot (the plan's bot farm). Per class the report gives reserved,
denied (403), challenged (428), rate limited (429), and the keys each class received. Bots
getting a few keys before the farm is detected is expected and reported, never a failure;
it becomes a warning when bots got more than BOT_KEY_WARN of the keys, or risk refused honest
buyers.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from cli.load import NET_RETRY, SECOND, SOLVED, UNPLANNED, Attempt

DENIED, CHALLENGED, RATE_LIMITED = 403, 428, 429
NOT_FINAL = frozenset({CHALLENGED, RATE_LIMITED})  # the same key may still succeed
BOT_KEY_WARN = 0.10  # warn (not fail) when bots got more than this share of the keys


@dataclass
class Delivery:
    order_id: str
    confirm_sent_at: float | None = None
    confirmed_at: float | None = None
    delivered_at: float | None = None  # PostgreSQL's orders.delivered_at
    confirmed_in_ledger_at: float | None = None  # orders.confirmed_at: the gateway's confirm
    confirm_error: str | None = None
    delivered_seen_at: float | None = None
    card_keys: list[str] = field(default_factory=list)
    quantity: int = 1
    polls: int = 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(0, min(len(ordered), rank) - 1)]


@dataclass
class ClassStats:
    """One class of buyers (honest or bot): its planned attempts and the first answer to each,
    the orders it reserved and the card keys it received."""

    users: int = 0
    attempts: int = 0
    reserved: int = 0  # distinct orders
    denied: int = 0  # planned attempts answered 403 risk_denied
    challenged: int = 0  # ... 428 challenge_required
    rate_limited: int = 0  # ... 429 rate_limited
    solved: int = 0  # challenges solved and retried with the same key
    keys: int = 0  # card keys delivered to this class
    users_with_key: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # risk reasons of 403s and 428s

    def as_dict(self) -> dict[str, int]:
        return {
            "users": self.users,
            "attempts": self.attempts,
            "reserved": self.reserved,
            "denied": self.denied,
            "challenged": self.challenged,
            "rate_limited": self.rate_limited,
            "keys": self.keys,
            "users_with_key": self.users_with_key,
        }


@dataclass
class Audit:
    stock: int
    buyers: int
    attempts: int
    reserved: int
    confirmed: int
    delivered: int
    oversold: int
    duplicate_keys: int
    lost_orders: int
    idempotency_violations: int
    limit_violations: int
    errors: int  # keys never answered below 500, after retries (403/428/429 are answers)
    purchase_p50_ms: float
    purchase_p99_ms: float
    delivery_p50_ms: float
    delivery_p99_ms: float
    burst_s: float
    purchase_rps: float
    elapsed_s: float = 0.0
    classes: dict[str, ClassStats] = field(default_factory=dict)  # "honest", "bot"
    farm: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        keys = (
            "stock",
            "attempts",
            "buyers",
            "reserved",
            "confirmed",
            "delivered",
            "oversold",
            "duplicate_keys",
            "lost_orders",
            "idempotency_violations",
            "limit_violations",
            "errors",
            "purchase_p50_ms",
            "purchase_p99_ms",
            "delivery_p50_ms",
            "delivery_p99_ms",
            "purchase_rps",
            "burst_s",
            "elapsed_s",
        )
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        for name in ("honest", "bot"):
            c = self.classes.get(name) or ClassStats()
            out.update({f"{name}_{k}": v for k, v in c.as_dict().items()})
        out["ok"] = self.ok
        return out


def _stock_breaches(sale: dict[str, Any], stock_total: int) -> tuple[int, list[str]]:
    stock = sale.get("stock") or {}
    notes: list[str] = []
    breach = 0
    available = int(stock.get("available", 0))
    if available < 0:
        breach += -available
        notes.append(f"ledger shows available={available}")
    total = int(stock.get("total", stock_total))
    if total != stock_total:
        notes.append(f"ledger total={total}, imported {stock_total}")
        breach += max(0, total - stock_total)
    held = sum(int(stock.get(k, 0)) for k in ("available", "reserved", "confirmed", "delivered"))
    if held != total:  # each unit is in exactly one of these states
        breach += max(0, held - total)
        notes.append(f"ledger available+reserved+confirmed+delivered={held}, total={total}")
    return breach, notes


def _by_class(
    attempts: list[Attempt],
    planned: list[Attempt],
    bots: frozenset[str],
    honest_users: int,
    deliveries: dict[str, Delivery],
) -> dict[str, ClassStats]:
    out = {"honest": ClassStats(users=honest_users), "bot": ClassStats(users=len(bots))}

    def of(user: str) -> ClassStats:
        return out["bot" if user in bots else "honest"]

    for a in planned:
        c = of(a.user_id)
        c.attempts += 1
        if a.status == DENIED:
            c.denied += 1
        elif a.status == CHALLENGED:
            c.challenged += 1
        elif a.status == RATE_LIMITED:
            c.rate_limited += 1
        if a.status in (DENIED, CHALLENGED) and a.reasons:
            c.reasons.update(a.reasons.split(","))
    owner: dict[str, str] = {}
    for a in attempts:
        if a.status == 201 and a.order_id:
            owner[a.order_id] = a.user_id
        if a.kind == SOLVED and a.status not in (DENIED, CHALLENGED):
            of(a.user_id).solved += 1
    for user in owner.values():
        of(user).reserved += 1
    with_key: dict[str, set[str]] = {"honest": set(), "bot": set()}
    for d in deliveries.values():
        buyer = owner.get(d.order_id)
        if buyer is None or not d.card_keys or d.delivered_seen_at is None:
            continue
        name = "bot" if buyer in bots else "honest"
        out[name].keys += len(d.card_keys)
        with_key[name].add(buyer)
    for name, users in with_key.items():
        out[name].users_with_key = len(users)
    return out


def audit(
    *,
    stock_total: int,
    imported: set[str],
    buyers: int,
    per_user_limit: int,
    attempts: list[Attempt],
    deliveries: dict[str, Delivery],
    sale: dict[str, Any],
    opens_at: float,
    imported_count: int,
    load_procs: int,
    concurrency: int,
    bots: frozenset[str] = frozenset(),
    farm: str = "",
) -> Audit:
    """`buyers` counts the honest buyers; `bots` are the bot farm's user ids."""
    failures: list[str] = []
    warnings: list[str] = []
    planned = [a for a in attempts if a.kind not in UNPLANNED]

    # Idempotency: per key, at most one order, and a success is never followed by a final
    # refusal (a 428 or 429 before a 201 is fine: the key was not processed yet).
    by_key: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_key[(a.user_id, a.idem_key)].append(a)
    idem_violations = replays = 0
    for answers in by_key.values():
        orders = {a.order_id for a in answers if a.status == 201}
        refused = [a for a in answers if 400 <= a.status < 500 and a.status not in NOT_FINAL]
        if len(orders) > 1 or (orders and refused):
            idem_violations += 1
        elif orders:
            replays += sum(1 for a in answers if a.status == 201) - 1

    # Per-user limit, and what second tries (a new key) were told.
    orders_by_user: dict[str, set[str]] = defaultdict(set)
    for a in attempts:
        if a.status == 201:
            orders_by_user[a.user_id].add(a.order_id)
    limit_violations = sum(1 for o in orders_by_user.values() if len(o) > per_user_limit)
    second = Counter(a.code or str(a.status) for a in planned if a.kind == SECOND)
    codes = Counter(a.code or str(a.status) for a in attempts)
    errors = sum(
        1
        for (_, _), answers in by_key.items()
        if all(a.status == 0 or a.status >= 500 for a in answers)
    )

    reserved = len({a.order_id for a in attempts if a.status == 201})
    # Demand: users the ledger answered (a 201 or a 409); risk refused the others outright.
    reached = {a.user_id for a in attempts if a.status in (201, 409)}
    expected = min(stock_total, len(reached) * per_user_limit)
    ledger_breach, ledger_notes = _stock_breaches(sale, stock_total)
    oversold = max(reserved - stock_total, ledger_breach, 0)  # two views of the same excess

    confirmed = [d for d in deliveries.values() if d.confirmed_at is not None]
    delivered = [d for d in confirmed if d.delivered_seen_at is not None]
    key_use = Counter(k for d in delivered for k in d.card_keys)
    duplicate_keys = sum(n - 1 for n in key_use.values() if n > 1)
    unknown = {k for k in key_use if k not in imported}
    short = [d for d in delivered if len(d.card_keys) != d.quantity]
    tainted = {d.order_id for d in delivered if any(k in unknown for k in d.card_keys)}
    lost = (len(confirmed) - len(delivered)) + len(tainted | {d.order_id for d in short})
    ledger_delivered = int((sale.get("stock") or {}).get("delivered", len(delivered)))

    if oversold or ledger_notes:
        failures.append(f"oversold by {oversold}; " + "; ".join(ledger_notes))
    if reserved != expected:
        failures.append(f"reserved {reserved}, expected {expected}")
    if idem_violations:
        failures.append(f"{idem_violations} Idempotency-Keys answered inconsistently")
    if limit_violations:
        failures.append(f"{limit_violations} buyers above the per-user limit")
    if len(confirmed) != reserved:
        failures.append(f"confirmed {len(confirmed)} of {reserved} reservations")
    if len(delivered) != len(confirmed):
        failures.append(f"delivered {len(delivered)} of {len(confirmed)} confirmed orders")
    if duplicate_keys:
        failures.append(f"{duplicate_keys} card keys delivered more than once")
    if lost:
        failures.append(f"{lost} lost orders ({len(unknown)} unknown keys, {len(short)} short)")
    if ledger_delivered != len(delivered):
        failures.append(f"ledger says delivered={ledger_delivered}, buyers see {len(delivered)}")
    if imported_count != stock_total:
        failures.append(f"imported {imported_count} keys of {stock_total}")

    classes = _by_class(attempts, planned, bots, buyers, deliveries)
    honest, bot = classes["honest"], classes["bot"]
    delivered_keys = honest.keys + bot.keys
    if delivered_keys and bot.keys > BOT_KEY_WARN * delivered_keys:
        warnings.append(f"bots got {bot.keys} of {delivered_keys} keys (over {BOT_KEY_WARN:.0%})")
    if honest.denied or honest.rate_limited:
        warnings.append(
            f"risk refused honest buyers: {honest.denied} denied, "
            f"{honest.rate_limited} rate limited"
        )

    latencies = [a.latency_ms for a in attempts]
    # The pipeline's latency: the moment the ledger confirmed the order (server clock, in the
    # stream event) to the worker's commit of its keys. Falls back to client-side times.
    delivery_ms = [
        (
            (d.delivered_at or d.delivered_seen_at or 0)
            - (d.confirmed_in_ledger_at or d.confirm_sent_at or 0)
        )
        * 1000
        for d in delivered
    ]
    last = max((a.done_at for a in attempts), default=opens_at)
    first = min((a.done_at - a.latency_ms / 1000 for a in attempts), default=opens_at)
    burst_s = max(0.001, last - first)
    return Audit(
        stock=stock_total,
        buyers=buyers,
        attempts=len(planned),
        reserved=reserved,
        confirmed=len(confirmed),
        delivered=len(delivered),
        oversold=oversold,
        duplicate_keys=duplicate_keys,
        lost_orders=lost,
        idempotency_violations=idem_violations,
        limit_violations=limit_violations,
        errors=errors,
        purchase_p50_ms=round(percentile(latencies, 50), 1),
        purchase_p99_ms=round(percentile(latencies, 99), 1),
        delivery_p50_ms=round(percentile(delivery_ms, 50), 1),
        delivery_p99_ms=round(percentile(delivery_ms, 99), 1),
        burst_s=round(burst_s, 2),
        purchase_rps=round(len(attempts) / burst_s),
        classes=classes,
        farm=farm,
        warnings=warnings,
        details={
            "answers": dict(codes.most_common()),
            "second_tries": dict(second),
            "replays": replays,
            "network_retries": sum(1 for a in attempts if a.kind == NET_RETRY),
            "ledger": sale.get("stock"),
            "distinct_keys_delivered": len(key_use),
            "unknown_keys": len(unknown),
            "load": f"{load_procs} process(es), {concurrency} in flight",
            "start_lag_ms": round((first - opens_at) * 1000, 1),
            "confirm_errors": [d.confirm_error for d in deliveries.values() if d.confirm_error][:5],
        },
        failures=failures,
    )


def render(a: Audit) -> str:
    d = a.details
    lines = [
        "",
        "Flashgate demo: report",
        "======================",
        f"stock            {a.stock} keys; {a.buyers} honest buyers, per-user limit 1",
        f"load             {a.attempts} purchase attempts ({d['network_retries']} network "
        f"retries on top), {d['load']}",
        f"answers          {d['answers']}",
        f"retries          {d['replays']} retries/double clicks of a successful purchase got "
        "its same order_id back",
        f"second tries     {d['second_tries']}  (new key, same buyer: must be refused)",
        f"burst            {a.burst_s} s from first request to last answer, {a.purchase_rps} "
        f"req/s (first request {d['start_lag_ms']} ms after the opening)",
        f"purchase latency p50 {a.purchase_p50_ms} ms, p99 {a.purchase_p99_ms} ms",
        f"reserved         {a.reserved}",
        f"confirmed        {a.confirmed}",
        f"delivered        {a.delivered} ({d['distinct_keys_delivered']} distinct keys)",
        f"delivery latency p50 {a.delivery_p50_ms} ms, p99 {a.delivery_p99_ms} ms "
        "(orders.confirmed_at -> orders.delivered_at in PostgreSQL)",
        f"ledger           {d['ledger']}",
        *_render_classes(a),
        f"oversold {a.oversold} | duplicate keys {a.duplicate_keys} | lost orders "
        f"{a.lost_orders} | idempotency violations {a.idempotency_violations} | limit "
        f"violations {a.limit_violations} | errors {a.errors}",
        f"elapsed          {a.elapsed_s} s",
    ]
    if d["confirm_errors"]:
        lines.append(f"confirm errors   {d['confirm_errors']}")
    lines += [f"WARNING: {w}" for w in a.warnings]
    lines.append(
        "RESULT: PASS, every invariant holds"
        if a.ok
        else "RESULT: FAIL\n  - " + "\n  - ".join(a.failures)
    )
    return "\n".join(lines)


def _render_classes(a: Audit) -> list[str]:
    h, b = a.classes.get("honest") or ClassStats(), a.classes.get("bot") or ClassStats()
    keys = h.keys + b.keys
    share = f"{h.keys / keys:.1%}" if keys else "-"
    rows = [
        ("users", "users"),
        ("attempts", "attempts"),
        ("reserved", "reserved"),
        ("denied (403)", "denied"),
        ("challenged (428)", "challenged"),
        ("rate limited (429)", "rate_limited"),
        ("keys received", "keys"),
    ]
    lines = [
        "",
        "Risk: honest buyers vs the bot farm",
        f"bot farm         {a.farm or 'none'}",
        f"{'':19}{'honest':>10}{'bots':>10}",
        *(f"{label:19}{getattr(h, k):>10}{getattr(b, k):>10}" for label, k in rows),
        f"keys             {h.keys} to honest buyers ({share}), {b.keys} to bots",
        f"honest buyers    {h.users_with_key} of {h.users} got a key"
        f" ({h.solved} after solving a challenge)",
    ]
    if b.attempts:
        refused = b.denied + b.challenged + b.rate_limited
        lines.append(
            f"bot attempts     {refused} of {b.attempts} ({refused / b.attempts:.1%}) "
            f"denied, challenged or rate limited"
        )
    for name, c in (("bot", b), ("honest", h)):
        if c.reasons:
            top = ", ".join(f"{r} {n}" for r, n in c.reasons.most_common(6))
            lines.append(f"{name + ' reasons':17}{top}  (rules in 403/428 answers)")
    lines.append("")
    return lines
