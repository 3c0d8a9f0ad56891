"""The load test's verdict: the SLA (loadtest/sla.toml) and the sale's invariants.

Pure functions over what the run collected (Locust's stats CSV, the users' order records, the
orders and the sale as the API returns them after the run), so they are tested without Locust.
"""

from __future__ import annotations

import csv
import math
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLA_FILE = Path(__file__).with_name("sla.toml")
LIVE = ("reserved", "confirmed", "delivered")


@dataclass(frozen=True)
class SLA:
    purchase_p99_ms: float = 50.0
    error_rate_max: float = 0.001
    delivery_p99_ms: float = 2000.0
    delivery_grace_s: float = 30.0
    # A p99 read from fewer samples is only their maximum (one slow request decides it): such
    # a class is reported as "not judged", never passed or failed on it.
    min_samples: float = 100.0

    @classmethod
    def load(cls, path: Path = SLA_FILE, overrides: dict[str, float] | None = None) -> SLA:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        raw.update(overrides or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown SLA settings {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in raw.items()})


@dataclass
class RequestStats:
    name: str
    count: int
    failures: int
    p50_ms: float
    p99_ms: float
    rps: float


def read_stats(csv_path: Path) -> list[RequestStats]:
    """Locust's `<prefix>_stats.csv`: one row per request name, plus `Aggregated`."""
    out = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            out.append(
                RequestStats(
                    name=row["Name"],
                    count=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    p50_ms=float(row["50%"] or 0),
                    p99_ms=float(row["99%"] or 0),
                    rps=float(row["Requests/s"] or 0),
                )
            )
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


RESULT = {True: "PASS", False: "FAIL", None: "NOT JUDGED"}


@dataclass
class Verdict:
    # (name, ok, detail); ok None: not judged (too few samples), neither passes nor fails
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        judged = [ok for _, ok, _ in self.checks if ok is not None]
        return bool(judged) and all(judged)

    def render(self) -> str:
        lines = [f"  {RESULT[ok]:<10}  {name:<26} {detail}" for name, ok, detail in self.checks]
        lines.append("VERDICT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """verdict.json: the verdict, each check by name, then the run's figures."""
        return {
            "ok": self.ok,
            "verdict": "PASS" if self.ok else "FAIL",
            "checks": [
                {
                    "name": name,
                    "result": RESULT[ok].lower().replace(" ", "_"),
                    "ok": ok,
                    "detail": detail,
                }
                for name, ok, detail in self.checks
            ],
            **self.figures,
        }

    def to_html(self) -> str:
        """The verdict as an HTML section, put at the top of Locust's report.html."""
        from html import escape

        colour = {True: "#1a7f37", False: "#cf222e", None: "#9a6700"}
        rows = "".join(
            f"<tr><td style='color:{colour[ok]};font-weight:bold'>{RESULT[ok]}</td>"
            f"<td>{escape(name)}</td><td>{escape(detail)}</td></tr>"
            for name, ok, detail in self.checks
        )
        head = "PASS" if self.ok else "FAIL"
        return (
            f"<section id='flashgate-verdict' style='font-family:sans-serif;margin:1em'>"
            f"<h2>Flashgate SLA verdict: <span style='color:{colour[self.ok]}'>{head}"
            f"</span></h2><table cellpadding='4'><tr><th>result</th><th>check</th>"
            f"<th>detail</th></tr>{rows}</table></section>"
        )


def judge(
    sla: SLA,
    stats: list[RequestStats],
    records: list[dict[str, Any]],
    orders: dict[str, dict[str, Any]],
    stock: dict[str, int],
    *,
    stock_total: int,
    imported: set[str],
    per_user_limit: int,
    delivery_ms: list[float],
    gateway: tuple[int, float] | None = None,
) -> Verdict:
    """`orders`: order id -> the order as GET /v1/orders/{id} returned it after the run
    (status, user_id, quantity, card_keys); `stock`: the sale's ledger from the admin API;
    `delivery_ms`: confirm -> delivered of every delivered order; `gateway`: (purchases, p99
    bucket edge in ms) from the gateway's own histogram, None when it could not be read."""
    v = Verdict()
    v.figures["sla"] = sla.__dict__

    # -- SLA: latency and errors -----------------------------------------------------------
    v.figures["requests"] = {
        s.name: {
            "count": s.count,
            "failures": s.failures,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "rps": round(s.rps, 1),
        }
        for s in stats
    }
    _judge_purchase_latency(v, sla, stats, gateway)
    total = next((s for s in stats if s.name == "Aggregated"), None)
    rate = (total.failures / total.count) if total and total.count else 1.0
    v.check(
        "errors",
        rate <= sla.error_rate_max,
        f"{total.failures if total else 0} of {total.count if total else 0} requests "
        f"({rate:.3%}) <= {sla.error_rate_max:.3%}",
    )

    # -- delivery --------------------------------------------------------------------------
    if len(delivery_ms) < sla.min_samples:
        v.figures["delivery_samples_note"] = (
            f"{len(delivery_ms)} delivered orders < {sla.min_samples:.0f}: their p99 is their "
            "maximum"
        )
    confirmed = {oid for oid, o in orders.items() if o.get("status") in ("confirmed", "delivered")}
    delivered = {oid for oid in confirmed if orders[oid].get("status") == "delivered"}
    p99 = percentile(delivery_ms, 99)
    v.figures.update(
        confirmed=len(confirmed),
        delivered=len(delivered),
        delivery_p50_ms=round(percentile(delivery_ms, 50), 1),
        delivery_p99_ms=round(p99, 1),
    )
    v.check(
        "all delivered",
        delivered == confirmed,
        f"{len(delivered)} of {len(confirmed)} confirmed orders delivered "
        f"within {sla.delivery_grace_s:.0f} s after the run",
    )
    v.check(
        "delivery p99",
        p99 <= sla.delivery_p99_ms,
        f"{p99:.0f} ms <= {sla.delivery_p99_ms:.0f} ms ({len(delivery_ms)} orders)",
    )

    # -- invariants ------------------------------------------------------------------------
    held = sum(int(stock.get(k, 0)) for k in ("available", *LIVE))
    v.figures["ledger"] = stock
    v.check(
        "stock adds up",
        held == stock_total == int(stock.get("total", -1)) and int(stock.get("available", 0)) >= 0,
        f"available+reserved+confirmed+delivered = {held}, total {stock.get('total')}, "
        f"imported {stock_total}",
    )
    sold = sum(int(stock.get(k, 0)) for k in LIVE)
    known_live = sum(int(o.get("quantity", 1)) for o in orders.values() if o.get("status") in LIVE)
    v.check(
        "oversold = 0",
        sold <= stock_total and known_live <= sold,
        f"ledger holds {sold} units in live orders, buyers hold {known_live}, stock {stock_total}",
    )
    keys = Counter(k for oid in delivered for k in orders[oid].get("card_keys") or [])
    dupes = sum(n - 1 for n in keys.values() if n > 1)
    v.check("duplicate keys = 0", dupes == 0, f"{dupes} ({len(keys)} distinct keys delivered)")
    unknown = [k for k in keys if k not in imported]
    short = [
        oid
        for oid in delivered
        if len(orders[oid].get("card_keys") or []) != int(orders[oid].get("quantity", 1))
    ]
    v.check(
        "keys imported",
        not unknown and not short,
        f"{len(unknown)} delivered keys never imported, {len(short)} orders short of keys",
    )
    per_user: dict[str, int] = defaultdict(int)
    for o in orders.values():
        if o.get("status") in LIVE:
            per_user[str(o.get("user_id"))] += int(o.get("quantity", 1))
    over = [u for u, n in per_user.items() if n > per_user_limit]
    v.check("per-user limit", not over, f"{len(over)} users above {per_user_limit}")
    seen_delivered = [r for r in records if r.get("keys")]
    mismatch = [
        r
        for r in seen_delivered
        if sorted(r["keys"]) != sorted(orders.get(r.get("order_id", ""), {}).get("card_keys") or [])
    ]
    v.check(
        "buyers' keys stable",
        not mismatch,
        f"{len(mismatch)} of {len(seen_delivered)} buyers saw other keys than the audit",
    )

    kinds = Counter(r["kind"] for r in records if r["kind"] != "bot" or r.get("order_id"))
    bots: Counter[str] = Counter()
    for r in records:
        bots.update(r.get("answers") or {})
    v.figures.update(
        buyers=kinds.get("buyer", 0),
        solvers=kinds.get("solver", 0),
        solved=sum(1 for r in records if r.get("solved")),
        outcomes=dict(
            Counter(
                r.get("outcome") or r.get("code") or str(r.get("status", ""))
                for r in records
                if r["kind"] != "bot"
            )
        ),
        bot_answers=dict(bots),
        second_tries=dict(Counter(r["second"] for r in records if "second" in r)),
    )
    return v


def _judge_purchase_latency(
    v: Verdict, sla: SLA, stats: list[RequestStats], gateway: tuple[int, float] | None
) -> None:
    """Client-side p99 per purchase class, judged only where the class has enough samples
    (the bots' and solvers' classes can be a few dozen requests), and the gateway's own p99
    from its histogram, which counts every purchase of the run."""
    purchases = [s for s in stats if s.name.startswith("purchase") and s.count]
    enough = [s for s in purchases if s.count >= sla.min_samples]
    for s in purchases:
        if s not in enough:
            v.check(
                f"p99 {s.name}",
                None,
                f"{s.count} samples < {sla.min_samples:.0f}: too few "
                f"to judge a p99 (it would be their maximum, {s.p99_ms:.0f} ms)",
            )
    worst = max(enough, key=lambda s: s.p99_ms, default=None)
    if worst is not None:
        v.check(
            "purchase p99 (client)",
            worst.p99_ms <= sla.purchase_p99_ms,
            f"{worst.p99_ms:.0f} ms worst of {len(enough)} classes with >= "
            f"{sla.min_samples:.0f} samples ({worst.name}, {worst.count}) <= "
            f"{sla.purchase_p99_ms:.0f} ms",
        )
    elif purchases:
        v.check(
            "purchase p99 (client)",
            None,
            f"no purchase class has {sla.min_samples:.0f} "
            "samples: a longer or larger run is needed to judge the client-side p99",
        )
    else:
        v.check("purchase p99 (client)", False, "no purchase requests")
    if gateway is None:
        v.check("purchase p99 (gateway)", None, "the gateway's metrics could not be read")
        return
    count, p99_ms = gateway
    if count < sla.min_samples:
        v.check("purchase p99 (gateway)", None, f"{count} samples < {sla.min_samples:.0f}")
    else:
        v.check(
            "purchase p99 (gateway)",
            p99_ms <= sla.purchase_p99_ms,
            f"p99 within the {p99_ms:.0f} ms histogram bucket, {count} purchases, <= "
            f"{sla.purchase_p99_ms:.0f} ms (from the request reaching the app to its "
            "answer: the load generator's queueing is outside it)",
        )
