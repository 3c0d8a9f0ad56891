"""Every Prometheus metric Flashgate exports, declared here and nowhere else.

Names carry their unit (`_seconds`, `_units`, `_entries`, `_total` for counters); label values
are bounded: route templates, methods, status classes, result enums, rule names, and the ids
of active sales (a handful at a time, capped at MAX_SALES). Never a user, device, ip, order or
key. Tests check that every metric the dashboard and the alert rules use is declared here.

One server process per pod: metrics live in this process's default registry. Several processes
on one host need PROMETHEUS_MULTIPROC_DIR (docs/OPERATIONS.md); `exposition()` honours it.

Gauges read from Redis (stock, streams, ledger invariant) are refreshed on scrape by
`LedgerSnapshot.refresh()`, with a short deadline, for at most MAX_SALES active sales, and at
most once per FLASHGATE_METRICS_REFRESH_S however many scrapes arrive. A sale whose window has
not opened yet is exported by count only (`flashgate_sales_upcoming`), never by id: its id and
stock are not announced through metrics before the sale starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import Counter as _Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from core.ids import shard_id

MAX_SALES = 20  # active sales exported per scrape (label cardinality bound)
SCRAPE_TIMEOUT_S = 0.5  # deadline of the Redis reads done on scrape
OTHER = "other"

# Bucket edges at the SLA thresholds (loadtest/sla.toml: purchase p99 50 ms, delivery p99 2 s).
HTTP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# -- HTTP (gateway/middleware.py) -------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "flashgate_http_requests_total",
    "HTTP requests answered, by route template.",
    ["route", "method", "status_class"],
)
HTTP_DURATION = Histogram(
    "flashgate_http_request_duration_seconds",
    "Time to the end of the HTTP response.",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "flashgate_http_requests_in_flight",
    "HTTP requests being handled now.",
    multiprocess_mode="livesum",
)

# -- business (gateway) -----------------------------------------------------------------------
PURCHASE_RESULTS = (
    "reserved",
    "confirmed",
    "replayed",
    "sold_out",
    "limit",
    "risk_denied",
    "challenged",
    "rate_limited",
    "invalid",
    "not_active",
    "not_found",
    "unauthorized",
    "unavailable",
    "error",
    OTHER,
)
PURCHASES = Counter("flashgate_purchases_total", "Purchase attempts by result.", ["result"])
_RESULT_OF_CODE = {
    "sold_out": "sold_out",
    "insufficient_stock": "sold_out",
    "purchase_limit_exceeded": "limit",
    "risk_denied": "risk_denied",
    "challenge_required": "challenged",
    "rate_limited": "rate_limited",
    "invalid_request": "invalid",
    "malformed_request": "invalid",
    "idempotency_mismatch": "invalid",
    "payload_too_large": "invalid",
    "unsupported_media_type": "invalid",
    "sale_not_active": "not_active",
    "not_found": "not_found",
    "unauthorized": "unauthorized",
    "service_unavailable": "unavailable",
    "sale_not_ready": "unavailable",
    "internal_error": "error",
}
PURCHASE_ROUTE = "/v1/sales/{sale_id}/purchase"

# -- ledger, read from Redis on scrape (LedgerSnapshot) ---------------------------------------
STOCK_STATES = (
    "total",
    "available",
    "reserved",
    "confirmed",
    "delivered",
    "cancelled",
    "expired",
    "refunded",
    "voided",
)
# Declared here for the name check; filled by LedgerCollector from the last snapshot.
SALE_STOCK = "flashgate_sale_stock_units"
SALE_INVARIANT = "flashgate_sale_ledger_drift_units"
STREAM_LENGTH = "flashgate_stream_length_entries"
STREAM_PENDING = "flashgate_stream_pending_entries"
STREAM_LAG = "flashgate_stream_lag_entries"
DEAD_LETTERS = "flashgate_dead_letters_entries"
SALES_ACTIVE = "flashgate_sales_active"
SALES_UPCOMING = "flashgate_sales_upcoming"
# Units whose reservation ended, by outcome, from the ledger's own counts: `expired` and
# `cancelled` exactly; `confirmed` = confirmed + delivered + refunded, every unit ever
# confirmed, purchases paid at once included (so the expired share is a lower bound).
SALE_SETTLED = "flashgate_sale_settled_units"
SETTLED_OUTCOMES = ("confirmed", "expired", "cancelled")
LEDGER_SCRAPE_OK = "flashgate_ledger_scrape_success"

# -- risk engine (risk/scoring.py keeps its counts in a RiskCounts) ---------------------------
RISK_DECISIONS = Counter(
    "flashgate_risk_decisions_total", "Risk verdicts (allow, challenge, deny).", ["verdict"]
)
RISK_RULES = Counter(
    "flashgate_risk_rule_hits_total",
    "Rules that fired: mode=fired (scored), shadow (counted only), unavailable (no feature).",
    ["rule", "mode"],
)
RISK_LISTS = Counter(
    "flashgate_risk_list_hits_total",
    "Requests decided by an allow or block list.",
    ["action", "kind"],
)
RISK_CHALLENGES = Counter(
    "flashgate_risk_challenge_results_total", "Challenge solutions by result.", ["result"]
)
RISK_EVENTS = Counter(
    "flashgate_risk_events_total",
    "Other risk engine events (rate_limited, features_unavailable, passed).",
    ["event"],
)

# -- workers (workers/metrics.py) -------------------------------------------------------------
WORKER_BATCHES = Counter("flashgate_worker_batches_total", "Stream batches handled.", ["result"])
WORKER_BATCH_SIZE = Histogram(
    "flashgate_worker_batch_size_entries", "Entries per handled batch.", buckets=BATCH_SIZE_BUCKETS
)
WORKER_BATCH_DURATION = Histogram(
    "flashgate_worker_batch_duration_seconds",
    "Time to persist, mark and ack one batch.",
    buckets=BATCH_BUCKETS,
)
ORDERS_DELIVERED = Counter("flashgate_orders_delivered_total", "Orders whose keys were committed.")
DELIVERY_LATENCY = Histogram(
    "flashgate_delivery_latency_seconds",
    "Confirm (ledger clock) to keys committed.",
    buckets=DELIVERY_BUCKETS,
)
DEAD_LETTERED = Counter(
    "flashgate_dead_lettered_total", "Entries moved to a dead-letter stream.", ["reason"]
)
RESERVATIONS_EXPIRED = Counter(
    "flashgate_reservations_expired_total", "Reservations expired by this process's sweeper."
)
WEBHOOKS = Counter(
    "flashgate_webhook_deliveries_total", "Webhook delivery attempts by result.", ["result"]
)
BACKEND_ERRORS = Counter(
    "flashgate_backend_errors_total",
    "Failures of a backing service, by backend and kind.",
    ["backend", "kind"],
)
WORKER_HEARTBEAT = Gauge(
    "flashgate_worker_last_loop_timestamp_seconds",
    "When the worker's main loop last ran.",
    multiprocess_mode="max",
)

# -- stock ------------------------------------------------------------------------------------
KEYS_IMPORTED = Counter(
    "flashgate_keys_imported_total",
    "Card keys submitted to imports, by result (imported, duplicate, rejected).",
    ["result"],
)
LOW_STOCK_EVENTS = Counter(
    "flashgate_low_stock_events_total",
    "Sales that went under FLASHGATE_LOW_STOCK_FRACTION "
    "of their stock (once per sale and total, across all workers).",
)

# -- invariants (audit job) -------------------------------------------------------------------
INVARIANT_VIOLATIONS = Gauge(
    "flashgate_invariant_violations",
    "Breaches found by the last audit (oversold, duplicate_keys); must stay 0.",
    ["invariant"],
    multiprocess_mode="max",
)
AUDIT_LAST_RUN = Gauge(
    "flashgate_audit_last_run_timestamp_seconds",
    "When the invariant audit last completed.",
    multiprocess_mode="max",
)
# Reconciliation (core/reconcile.py), run by every worker for the current sales (at most
# core.reconcile.CURRENT_SALES_LIMIT of them: the sale label stays bounded).
RECONCILE_KINDS = (
    "missing_ledger",
    "ledger_balance",
    "stock_total",
    "oversold",
    "keys",
    "delivered_ahead",
    "orders",
    "risk_list_entries",
    "risk_override",
)
RECONCILE_DRIFT = Gauge(
    "flashgate_reconcile_drift_units",
    "Redis ledger vs PostgreSQL vs card keys, by kind of "
    "drift (units, or ledgers for missing_ledger); must be 0.",
    ["sale", "kind"],
    multiprocess_mode="max",
)
RECONCILE_LAST_RUN = Gauge(
    "flashgate_reconcile_last_run_timestamp_seconds",
    "When the reconciliation last completed.",
    multiprocess_mode="max",
)

# Redis failover (core/failover.py): a new primary pauses the sales until a merge has run.
FAILOVER_PAUSED = Gauge(
    "flashgate_failover_pause_active",
    "1 while this process refuses purchases because Redis' "
    "primary changed and its ledger has not been merged with PostgreSQL yet.",
    multiprocess_mode="max",
)
FAILOVER_PAUSES = Counter(
    "flashgate_failover_pauses_total", "Pauses begun: a new Redis primary identity noticed."
)
FAILOVER_MERGES = Counter(
    "flashgate_failover_merges_total",
    "Merges of PostgreSQL's orders into a new Redis primary, by result.",
    ["result"],
)
FAILOVER_MERGE_DURATION = Histogram(
    "flashgate_failover_merge_duration_seconds",
    "Time a merge took, from its lock to the recorded epoch.",
    buckets=BATCH_BUCKETS + (30.0, 60.0),
)
FAILOVER_ORDERS_MERGED = Counter(
    "flashgate_failover_orders_merged_total",
    "Orders a merge brought back into Redis from "
    "PostgreSQL (missing there, or at an earlier status).",
)


def _bounded(value: str, allowed: Iterable[str] | None = None) -> str:
    """A label value from a closed set, or a short identifier-like name; else OTHER."""
    if allowed is not None:
        return value if value in allowed else OTHER
    return value if _NAME.fullmatch(value) else OTHER


_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


def purchase_result(code: str) -> str:
    """The `result` label of a refused purchase, from its problem code."""
    return _RESULT_OF_CODE.get(code, OTHER)


def count_purchase(result: str) -> None:
    PURCHASES.labels(_bounded(result, PURCHASE_RESULTS)).inc()


# -- risk counts mirrored into counters ---------------------------------------------------------
class RiskCounts(_Counter[str]):
    """The risk engine's `counts` (GET /v1/admin/risk/stats), each increment mirrored into the
    Prometheus counters above. Keys: `verdict:<v>`, `rule:<name>:<mode>`, `list:<action>:<kind>`,
    `challenge:<result>`, and a few plain events."""

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self.get(key, 0)
        super().__setitem__(key, value)
        if delta > 0:
            _mirror(key, delta)


_MIRRORS: dict[str, Any] = {}


def _mirror(key: str, n: int) -> None:
    """Count `n` on the Prometheus child of a `counts` key (the child found once per key)."""
    child = _MIRRORS.get(key)
    if child is None:
        child = _child_of(key)
        if len(_MIRRORS) < 1000:  # keys are the engine's own, bounded; the cap is a backstop
            _MIRRORS[key] = child
    child.inc(n)


def _child_of(key: str) -> Any:
    kind, _, rest = key.partition(":")
    if kind == "verdict":
        return RISK_DECISIONS.labels(_bounded(rest, ("allow", "challenge", "deny")))
    elif kind == "rule":
        name, _, mode = rest.rpartition(":")
        return RISK_RULES.labels(_bounded(name), _bounded(mode, ("fired", "shadow", "unavailable")))
    elif kind == "list":
        action, _, what = rest.partition(":")
        return RISK_LISTS.labels(
            _bounded(action, ("allow", "block")), _bounded(what, ("user", "device", "ip", "cidr"))
        )
    elif kind == "challenge":
        return RISK_CHALLENGES.labels(_bounded(rest))
    return RISK_EVENTS.labels(_bounded(key.replace(":", "_")[:40]))


# -- ledger snapshot, read on scrape --------------------------------------------------------------
class LedgerSnapshot:
    """Stock, streams and the ledger invariant of the active sales, read from Redis on scrape.

    `refresh()` is awaited by the /metrics handler (or the worker's metrics loop) with a short
    deadline; LedgerCollector exports the last good reading (and success=0 when a read failed).
    With `max_age_s`, a reading (or a failed try) younger than that is kept: concurrent scrapes
    wait for the one read in flight, so a scrape storm costs one Redis read per `max_age_s`.
    """

    def __init__(self) -> None:
        self.sales: dict[str, dict[str, int]] = {}
        self.active = 0
        self.upcoming = 0
        self.ok = 0
        self.at = 0.0
        self.reads = 0  # Redis reads done (tests count them)
        self._tried = -float("inf")
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _turn(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()  # one lock per loop: tests run several loops
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def refresh(
        self,
        redis: Any,
        keys: Any,
        group: str,
        timeout_s: float = SCRAPE_TIMEOUT_S,
        max_age_s: float = 0.0,
    ) -> None:
        async with self._turn():
            if max_age_s > 0 and time.monotonic() - self._tried < max_age_s:
                return
            self._tried = time.monotonic()
            self.reads += 1
            try:
                async with asyncio.timeout(timeout_s):
                    self.sales, self.active, self.upcoming = await _read_sales(redis, keys, group)
                self.ok, self.at = 1, time.time()
            except Exception:  # noqa: BLE001 - a scrape must answer; success=0 says it failed
                self.ok = 0


MAX_SALES_SCANNED = 500  # active sales whose window is read to pick the MAX_SALES exported


async def _pick_sales(redis: Any, keys: Any, active: list[str]) -> tuple[list[str], int | None]:
    """The MAX_SALES sales that matter now: open ones first, then the latest to start; and,
    when there were more to choose from, how many of those scanned have not opened yet (None:
    every active sale is picked, the rows tell)."""
    if len(active) <= MAX_SALES:
        return active, None
    scanned = active[:MAX_SALES_SCANNED]
    async with redis.pipeline(transaction=False) as pipe:
        for sale in scanned:
            pipe.hmget(keys.sale(sale), ["start", "end"])
        windows = await pipe.execute()
    now_ms = time.time() * 1000

    def rank(item: tuple[str, Any]) -> tuple[bool, float]:
        start, end = (float(v or 0) for v in item[1])
        return (start <= now_ms < end, start)

    ranked = sorted(zip(scanned, windows, strict=True), key=rank, reverse=True)
    upcoming = sum(1 for _, (start, _end) in ranked if float(start or 0) > now_ms)
    return sorted(sale for sale, _ in ranked[:MAX_SALES]), upcoming


async def _read_shard(
    redis: Any,
    keys: Any,
    group: str,
    shard: str,
) -> tuple[dict[str, int], int]:
    """One ledger shard (a sale, or one stock bucket of it): its row and its bucket count."""
    async with redis.pipeline(transaction=False) as pipe:  # one shard's keys share a slot
        pipe.hmget(keys.sale(shard), [*STOCK_STATES, "buckets", "start"])
        pipe.xlen(keys.events(shard))
        pipe.xlen(keys.dead_letters(shard))
        pipe.xinfo_groups(keys.events(shard))
        stock, length, dead, groups = await pipe.execute(raise_on_error=False)
    buckets = 1
    row: dict[str, int] = {}
    if isinstance(stock, list):
        row = {s: int(v or 0) for s, v in zip(STOCK_STATES, stock[:-2], strict=True)}
        buckets = int(stock[-2] or 1)
        if stock[-1] is not None:
            row["start"] = int(float(stock[-1]))
        if stock[0] is not None:
            held = sum(
                row[s] for s in ("available", "reserved", "confirmed", "delivered", "voided")
            )
            row["drift"] = abs(row["total"] - held) + max(0, -row["available"])
    row["stream_length"] = int(length) if isinstance(length, int) else 0
    row["dead_letters"] = int(dead) if isinstance(dead, int) else 0
    for g in groups if isinstance(groups, list) else []:
        if g.get("name") == group:
            row["pending"] = int(g.get("pending") or 0)
            lag = g.get("lag")
            row["lag"] = int(lag) if lag is not None else row["pending"]
    return row, buckets


async def _read_sales(
    redis: Any,
    keys: Any,
    group: str,
) -> tuple[dict[str, dict[str, int]], int, int]:
    """The exported sales' rows, how many sales are active, and how many of them (as far as
    MAX_SALES_SCANNED reach) have not opened yet."""
    active = sorted(str(s) for s in await redis.smembers(keys.active_sales()))
    sales, upcoming = await _pick_sales(redis, keys, active)
    rows = {sale: await read_sale(redis, keys, group, sale) for sale in sales}
    if upcoming is None:
        now_ms = time.time() * 1000
        upcoming = sum(1 for row in rows.values() if row.get("start", 0) > now_ms)
    return rows, len(active), upcoming


async def read_sale(redis: Any, keys: Any, group: str, sale: str) -> dict[str, int]:
    """One sale's row of the stock and stream gauges: its stock buckets summed (their drift
    too)."""
    row, buckets = await _read_shard(redis, keys, group, sale)
    for b in range(1, buckets):
        more, _ = await _read_shard(redis, keys, group, shard_id(sale, b))
        more.pop("start", None)  # the sale's window is on its own hash only
        for name, value in more.items():
            row[name] = row.get(name, 0) + value
    return row


def settled_units(row: dict[str, int]) -> dict[str, int]:
    """A ledger row's units by how their reservation ended (SALE_SETTLED)."""
    return {
        "confirmed": sum(row.get(s, 0) for s in ("confirmed", "delivered", "refunded")),
        "expired": row.get("expired", 0),
        "cancelled": row.get("cancelled", 0),
    }


class LedgerCollector(Collector):
    def __init__(self, snapshot: LedgerSnapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # collected only on scrape: nothing read at registration

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.snapshot
        stock = GaugeMetricFamily(
            SALE_STOCK, "Units per ledger state (Redis).", labels=["sale", "state"]
        )
        drift = GaugeMetricFamily(
            SALE_INVARIANT,
            "total - (available + reserved + confirmed "
            "+ delivered + voided), or oversold units; must be 0.",
            labels=["sale"],
        )
        length = GaugeMetricFamily(
            STREAM_LENGTH, "Entries in the sale's order-event stream.", labels=["sale"]
        )
        pending = GaugeMetricFamily(
            STREAM_PENDING, "Entries read by a worker, not yet acked.", labels=["sale"]
        )
        lag = GaugeMetricFamily(
            STREAM_LAG, "Entries not yet read by the workers' group.", labels=["sale"]
        )
        dead = GaugeMetricFamily(
            DEAD_LETTERS, "Entries in the sale's dead-letter stream.", labels=["sale"]
        )
        settled = CounterMetricFamily(
            SALE_SETTLED,
            "Units whose reservation ended, by outcome "
            "(confirmed counts purchases paid at once too).",
            labels=["sale", "outcome"],
        )
        now_ms = time.time() * 1000
        for sale, row in snap.sales.items():
            if row.get("start", 0) > now_ms:  # not open yet: no series names it
                continue
            if row.get("total") is not None and "available" in row:
                for state in STOCK_STATES:
                    stock.add_metric([sale, state], row.get(state, 0))
                drift.add_metric([sale], row.get("drift", 0))
                for outcome, value in settled_units(row).items():
                    settled.add_metric([sale, outcome], value)
            length.add_metric([sale], row["stream_length"])
            dead.add_metric([sale], row["dead_letters"])
            if "pending" in row:
                pending.add_metric([sale], row["pending"])
                lag.add_metric([sale], row["lag"])
        yield from (stock, drift, length, pending, lag, dead, settled)
        yield GaugeMetricFamily(
            SALES_ACTIVE, "Active sales (the first MAX_SALES are exported).", value=snap.active
        )
        yield GaugeMetricFamily(
            SALES_UPCOMING,
            "Active sales whose window has not opened: counted, not named.",
            value=snap.upcoming,
        )
        yield GaugeMetricFamily(
            LEDGER_SCRAPE_OK, "1 if the last ledger read succeeded.", value=snap.ok
        )


LEDGER = LedgerSnapshot()
with contextlib.suppress(ValueError):  # a re-import (tests reloading) must not register twice
    REGISTRY.register(LedgerCollector(LEDGER))

# Every metric name this module exports (the dashboard/alerts test checks against it).
LEDGER_METRICS = (
    SALE_STOCK,
    SALE_INVARIANT,
    STREAM_LENGTH,
    STREAM_PENDING,
    STREAM_LAG,
    DEAD_LETTERS,
    SALES_ACTIVE,
    SALES_UPCOMING,
    f"{SALE_SETTLED}_total",
    LEDGER_SCRAPE_OK,
)


def exposition() -> tuple[bytes, str]:
    """The text format of this process's metrics, or of all processes sharing
    PROMETHEUS_MULTIPROC_DIR (the ledger gauges come from Redis, so one copy is right)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(LedgerCollector(LEDGER))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metric_names() -> set[str]:
    """Every series name exported (counters with `_total`, histograms with their suffixes)."""
    names = set(LEDGER_METRICS)
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - read-only look
        for name in REGISTRY._collector_to_names[collector]:  # noqa: SLF001
            names.add(name)
    bare = {n for n in names if f"{n}_total" in names or f"{n}_bucket" in names}
    return {n for n in names - bare if n.startswith("flashgate_")}
