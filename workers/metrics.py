"""The worker's side of core/metrics.py: its own metrics port (/metrics, and /healthz for the
liveness probe), batch and delivery figures, and a heartbeat key with a TTL that
`flashgate worker-check` reads.

Liveness is about a wedged process only: /healthz answers from the worker's event loop (a
blocked loop answers nothing) and says 503 when one of its loops has not run an iteration for
FLASHGATE_WORKER_STALL_S, sleeps between iterations and backoffs from a dependency that is
down (Redis or PostgreSQL away) not counted: only an iteration stuck that long is a stall. A
Redis outage never restarts the workers.

The hooks here are called from consumer.py, sweeper.py, webhooks.py and runner.py, one line
each, so that those files keep their flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core import metrics
from core.keys import WORKER_GROUP
from core.metrics_http import MetricsServer
from core.reconcile import check, current_sales
from risk import durable
from workers import lowstock

if TYPE_CHECKING:
    from workers.deadletter import DeadLetter
    from workers.events import OrderEvent
    from workers.persist import BatchOutcome
    from workers.runner import Worker

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # how often a live worker refreshes its key (and the stream gauges)
HEARTBEAT_TTL_S = 30  # a worker silent this long is dead to `flashgate worker-check`


class Liveness:
    """When each loop of a worker last ran an iteration; `stalled()` names the ones silent
    for over `stall_s` that are not `waiting()` on a dependency that is down."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._seen: dict[str, float] = {}
        self._waiting: dict[str, int] = {}

    def tick(self, loop: str) -> None:
        self._seen[loop] = time.monotonic()

    def forget(self, loop: str) -> None:
        self._seen.pop(loop, None)

    @contextlib.contextmanager
    def waiting(self, loop: str) -> Iterator[None]:
        """Around a backoff or a wait for a backend to come back: not a stall."""
        self._waiting[loop] = self._waiting.get(loop, 0) + 1
        try:
            yield
        finally:
            self._waiting[loop] -= 1
            if not self._waiting[loop]:
                del self._waiting[loop]
            self.tick(loop)

    def stalled(self) -> list[str]:
        now = time.monotonic()
        return sorted(
            loop
            for loop, at in self._seen.items()
            if now - at > self.stall_s and loop not in self._waiting
        )

    @property
    def loops(self) -> int:
        return len(self._seen)


def app(worker: Worker) -> Starlette:
    """The worker's metrics port: GET /metrics, GET /healthz (liveness)."""

    async def prometheus_metrics(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        stalled = [] if worker.stopping else worker.liveness.stalled()
        if stalled:
            return JSONResponse({"status": "stalled", "stalled": stalled}, status_code=503)
        return JSONResponse(
            {"status": "draining" if worker.stopping else "ok", "loops": worker.liveness.loops}
        )

    return Starlette(
        routes=[
            Route("/metrics", prometheus_metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def serve(worker: Worker, port: int, host: str = "0.0.0.0") -> MetricsServer | None:
    """Serve the worker's metrics port on the running loop (0: off); `stop()` it at the end."""
    if not port:
        return None
    return await MetricsServer.start(app(worker), host, port)


def batch_done(
    events: list[OrderEvent],
    outcome: BatchOutcome,
    letters: list[DeadLetter],
    at_ms: int,
    started: float,
) -> None:
    """After a batch is committed, marked and acked (or dead-lettered)."""
    metrics.WORKER_BATCH_DURATION.observe(time.perf_counter() - started)
    metrics.WORKER_BATCH_SIZE.observe(len(events) + len(letters))
    metrics.WORKER_BATCHES.labels("ok").inc()
    delivered = set(outcome.delivered)
    n = 0
    for ev in events:
        if ev.type == "confirmed" and ev.order_id in delivered:
            n += 1
            metrics.DELIVERY_LATENCY.observe(max(0, at_ms - ev.at_ms) / 1000)
    if n:
        metrics.ORDERS_DELIVERED.inc(n)
    for dl in letters:
        metrics.DEAD_LETTERED.labels(dead_letter_reason(dl.reason)).inc()


def dead_letter_reason(reason: str) -> str:
    if reason.startswith("malformed"):
        return "malformed"
    if reason.startswith("delivered too many"):
        return "too_many_deliveries"
    return "rejected"


def batch_failed(exc: BaseException) -> None:
    metrics.WORKER_BATCHES.labels("failed").inc()
    backend = type(exc).__module__.split(".")[0]
    metrics.BACKEND_ERRORS.labels(
        backend if backend in ("redis", "asyncpg") else "other", type(exc).__name__[:40]
    ).inc()


def expired(n: int) -> None:
    if n:
        metrics.RESERVATIONS_EXPIRED.inc(n)


def webhook(ok: bool, attempts: int, max_attempts: int) -> None:
    result = "delivered" if ok else ("gave_up" if attempts >= max_attempts else "failed")
    metrics.WEBHOOKS.labels(result).inc()


# -- invariant audit (PostgreSQL, the durable record), for the active sales -------------------
# Units held by live orders beyond the keys the sale has: oversold.
AUDIT_OVERSOLD = """
SELECT COALESCE(sum(GREATEST(0, COALESCE(o.units, 0) - COALESCE(k.n, 0))), 0)
FROM unnest($1::text[]) AS s(sale_id)
LEFT JOIN (SELECT sale_id, sum(quantity) AS units FROM orders
           WHERE sale_id = ANY($1) AND status IN ('reserved', 'confirmed', 'delivered')
           GROUP BY sale_id) o USING (sale_id)
LEFT JOIN (SELECT sale_id, count(*) AS n FROM card_keys WHERE sale_id = ANY($1)
           GROUP BY sale_id) k USING (sale_id)
"""
# Keys handed out beyond what an order bought, or to an order of another sale.
AUDIT_DUPLICATE_KEYS = """
SELECT (SELECT count(*) FROM (
          SELECT o.order_id FROM orders o JOIN card_keys c ON c.order_id = o.order_id
          WHERE o.sale_id = ANY($1) GROUP BY o.order_id, o.quantity
          HAVING count(*) > o.quantity) extra)
     + (SELECT count(*) FROM card_keys c JOIN orders o ON o.order_id = c.order_id
        WHERE o.sale_id = ANY($1) AND c.sale_id <> o.sale_id)
"""
AUDIT_EVERY_S = 60.0


async def audit(pool: Any, sale_ids: list[str]) -> dict[str, int]:
    """Check the invariants of these sales and export them (flashgate_invariant_violations)."""
    async with pool.acquire() as conn:
        found = {
            "oversold": int(await conn.fetchval(AUDIT_OVERSOLD, sale_ids)),
            "duplicate_keys": int(await conn.fetchval(AUDIT_DUPLICATE_KEYS, sale_ids)),
        }
    for name, n in found.items():
        metrics.INVARIANT_VIOLATIONS.labels(name).set(n)
        if n:
            log.error("invariant %s broken: %d (sales %s)", name, n, ", ".join(sale_ids))
    metrics.AUDIT_LAST_RUN.set(time.time())
    return found


async def reconcile_current(redis: Any, keys: Any, pool: Any) -> dict[str, dict[str, int]]:
    """Reconcile the current sales (core/reconcile.py, without the per-order pass) and export
    the drift (flashgate_reconcile_drift_units); returns it per sale."""
    found: dict[str, dict[str, int]] = {}
    sales = await current_sales(pool)
    # The risk lists (global: compared once) and each sale's override, compared only
    # (risk/durable.py).
    list_drift = await durable.sync_lists(pool, redis, keys, write=False) if sales else 0
    for sale_id in sales:
        report = await check(redis, keys, pool, sale_id, orders=False)
        risk = {
            "risk_list_entries": list_drift,
            "risk_override": await durable.sync_override(pool, redis, keys, sale_id, write=False),
        }
        found[sale_id] = {**report.drift, **risk}
        if report.drift.get("missing_ledger"):
            log.error(
                "sale %s: PostgreSQL knows it, Redis has no ledger: paused until "
                "`flashgate reconcile %s`",
                sale_id,
                sale_id,
            )
        elif not report.ok or any(risk.values()):
            log.error(
                "sale %s: reconciliation drift %s",
                sale_id,
                {k: v for k, v in found[sale_id].items() if v},
            )
    metrics.RECONCILE_DRIFT.clear()  # sales no longer current leave the gauge
    for sale_id, drift in found.items():
        for kind in metrics.RECONCILE_KINDS:
            metrics.RECONCILE_DRIFT.labels(sale_id, kind).set(drift.get(kind, 0))
    metrics.RECONCILE_LAST_RUN.set(time.time())
    return found


async def heartbeat_loop(worker: Worker) -> None:
    """Until the worker stops: refresh its heartbeat key and the stream gauges, audit the
    active sales every AUDIT_EVERY_S and reconcile the current ones every
    reconcile_interval_s; on a clean stop, delete the key (a killed worker's key expires after
    HEARTBEAT_TTL_S)."""
    rt = worker.rt
    key = rt.keys.worker_heartbeat(worker.name)
    audited = reconciled = 0.0
    beat = min(HEARTBEAT_S, rt.settings.reconcile_interval_s)
    try:
        while not worker.stopping:
            worker.liveness.tick("heartbeat")
            try:
                await rt.redis.set(key, int(time.time()), ex=HEARTBEAT_TTL_S)
                metrics.WORKER_HEARTBEAT.set(time.time())
                await metrics.LEDGER.refresh(rt.redis, rt.keys, WORKER_GROUP)
                rows = dict(metrics.LEDGER.sales)
                for sale in sorted((worker.only or frozenset()) - rows.keys()):
                    # a worker limited to some sales watches those, exported or not
                    rows[sale] = await metrics.read_sale(rt.redis, rt.keys, WORKER_GROUP, sale)
                await lowstock.check(rt.redis, rt.keys, rows, rt.settings.low_stock_fraction)
                if time.monotonic() - audited >= AUDIT_EVERY_S:
                    audited = time.monotonic()
                    await audit(rt.pool, sorted(metrics.LEDGER.sales))
            except Exception as exc:  # noqa: BLE001 - Redis away: the next beat retries
                log.warning("worker %s: heartbeat failed: %s", worker.name, type(exc).__name__)
            if time.monotonic() - reconciled >= rt.settings.reconcile_interval_s:
                reconciled = time.monotonic()
                try:
                    await reconcile_current(rt.redis, rt.keys, rt.pool)
                except Exception as exc:  # noqa: BLE001 - a backend away: the next run retries
                    log.warning(
                        "worker %s: reconciliation failed: %s", worker.name, type(exc).__name__
                    )
            await worker._sleep(beat, "heartbeat")  # noqa: SLF001 - wakes at once on stop
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(rt.redis.delete(key))


async def alive_workers(redis: object, keys: object, prefix: str = "") -> list[str]:
    """Names of workers whose heartbeat key is present (optionally starting with `prefix`)."""
    pattern = keys.worker_heartbeat("*")  # type: ignore[attr-defined]
    head = pattern[:-1]
    names = []
    async for key in redis.scan_iter(match=pattern, count=1000):  # type: ignore[attr-defined]
        name = key[len(head) :]
        if name.startswith(prefix):
            names.append(name)
    return sorted(names)
