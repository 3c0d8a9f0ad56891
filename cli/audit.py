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
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from cli.load import NET_RETRY, SECOND, Attempt


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
    errors: int  # answers that were neither 201 nor a 409 (after retries), or no answer
    purchase_p50_ms: float
    purchase_p99_ms: float
    delivery_p50_ms: float
    delivery_p99_ms: float
    burst_s: float
    purchase_rps: float
    elapsed_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        keys = ("stock", "attempts", "buyers", "reserved", "confirmed", "delivered", "oversold",
                "duplicate_keys", "lost_orders", "idempotency_violations", "limit_violations",
                "errors", "purchase_p50_ms", "purchase_p99_ms", "delivery_p50_ms",
                "delivery_p99_ms", "purchase_rps", "burst_s", "elapsed_s")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
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


def audit(*, stock_total: int, imported: set[str], buyers: int, per_user_limit: int,
          attempts: list[Attempt], deliveries: dict[str, Delivery], sale: dict[str, Any],
          opens_at: float, imported_count: int, load_procs: int, concurrency: int) -> Audit:
    failures: list[str] = []
    planned = [a for a in attempts if a.kind != NET_RETRY]

    # Idempotency: per key, at most one order, and a success is never followed by a refusal.
    by_key: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_key[(a.user_id, a.idem_key)].append(a)
    idem_violations = replays = 0
    for answers in by_key.values():
        orders = {a.order_id for a in answers if a.status == 201}
        refused = [a for a in answers if 400 <= a.status < 500]
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
    errors = sum(1 for (_, _), answers in by_key.items()
                 if all(a.status == 0 or a.status >= 500 for a in answers))

    reserved = len({a.order_id for a in attempts if a.status == 201})
    expected = min(stock_total, buyers * per_user_limit)
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

    latencies = [a.latency_ms for a in attempts]
    # The pipeline's latency: the moment the ledger confirmed the order (server clock, in the
    # stream event) to the worker's commit of its keys. Falls back to client-side times.
    delivery_ms = [((d.delivered_at or d.delivered_seen_at or 0)
                    - (d.confirmed_in_ledger_at or d.confirm_sent_at or 0)) * 1000
                   for d in delivered]
    last = max((a.done_at for a in attempts), default=opens_at)
    first = min((a.done_at - a.latency_ms / 1000 for a in attempts), default=opens_at)
    burst_s = max(0.001, last - first)
    return Audit(
        stock=stock_total, buyers=buyers, attempts=len(planned), reserved=reserved,
        confirmed=len(confirmed), delivered=len(delivered), oversold=oversold,
        duplicate_keys=duplicate_keys, lost_orders=lost,
        idempotency_violations=idem_violations, limit_violations=limit_violations,
        errors=errors,
        purchase_p50_ms=round(percentile(latencies, 50), 1),
        purchase_p99_ms=round(percentile(latencies, 99), 1),
        delivery_p50_ms=round(percentile(delivery_ms, 50), 1),
        delivery_p99_ms=round(percentile(delivery_ms, 99), 1),
        burst_s=round(burst_s, 2), purchase_rps=round(len(attempts) / burst_s),
        details={"answers": dict(codes.most_common()), "second_tries": dict(second),
                 "replays": replays,
                 "network_retries": len(attempts) - len(planned), "ledger": sale.get("stock"),
                 "distinct_keys_delivered": len(key_use), "unknown_keys": len(unknown),
                 "load": f"{load_procs} process(es), {concurrency} in flight",
                 "start_lag_ms": round((first - opens_at) * 1000, 1),
                 "confirm_errors": [d.confirm_error for d in deliveries.values()
                                    if d.confirm_error][:5]},
        failures=failures,
    )


def render(a: Audit) -> str:
    d = a.details
    lines = [
        "",
        "Flashgate demo: report",
        "======================",
        f"stock            {a.stock} keys; {a.buyers} buyers, per-user limit 1",
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
        f"oversold {a.oversold} | duplicate keys {a.duplicate_keys} | lost orders "
        f"{a.lost_orders} | idempotency violations {a.idempotency_violations} | limit "
        f"violations {a.limit_violations} | errors {a.errors}",
        f"elapsed          {a.elapsed_s} s",
    ]
    if d["confirm_errors"]:
        lines.append(f"confirm errors   {d['confirm_errors']}")
    lines.append("RESULT: PASS, every invariant holds" if a.ok else
                 "RESULT: FAIL\n  - " + "\n  - ".join(a.failures))
    return "\n".join(lines)
