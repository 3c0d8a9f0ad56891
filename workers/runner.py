"""The worker process: stream consumers, the expiry sweeper and webhook delivery, with drain.

`Worker.run()` runs until `request_stop()` (SIGTERM/SIGINT in `main`): each sale's consumer
finishes its current batch (commit, mark delivered, ack) and exits; nothing is cut mid-batch.
`Worker.run_burst()` handles everything that is there and returns: the tests' mode.

Each sale gets `worker_consumers_per_sale` consumers in the process (names `<name>`,
`<name>/2`, ...), each with its own pending list: while one waits on its PostgreSQL
transaction another reads, commits or acks its own batch, so both the database and this
process stay busy. Several consumers of one sale are exactly the case of several worker
processes, which persist_batch is written for (rows locked in one order, keys SKIP LOCKED).
A sale of several stock buckets has one stream per bucket, and each gets its consumers, as
another sale would, except that they all write the one sale in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable

import asyncpg
import httpx

from core import logging as fglog
from core.runtime import Runtime
from core.settings import Settings
from workers import metrics as worker_metrics
from workers.consumer import NEW, AfterCommit, SaleConsumer
from workers.faults import after_commit_fault
from workers.sweeper import Sweeper
from workers.webhooks import Dispatcher

log = logging.getLogger(__name__)

SALES_REFRESH_S = 1.0  # how soon a newly activated sale gets a consumer
WEBHOOK_POLL_S = 0.5
DRAIN_TIMEOUT_S = 30.0  # past this, stop anyway: unacked entries are reclaimed by others
POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
)
"""Failures meaning PostgreSQL is unreachable (not that this batch is bad)."""


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(
        self,
        rt: Runtime,
        *,
        name: str | None = None,
        sale_ids: Iterable[str] | None = None,
        after_commit: AfterCommit | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """`sale_ids` limits the worker to those sales (tests, sharding); default: all active."""
        self.rt = rt
        self.name = name or default_consumer_name()
        self.only = frozenset(sale_ids) if sale_ids is not None else None
        self.after_commit = after_commit
        self.consumers: dict[tuple[str, int], SaleConsumer] = {}  # (shard, index)
        self.per_sale = rt.settings.worker_consumers_per_sale
        self.sweeper = Sweeper(rt.ledger)
        self.liveness = worker_metrics.Liveness(rt.settings.worker_stall_s)  # GET /healthz
        self._http = http
        self._stop = asyncio.Event()

    # -- sales ------------------------------------------------------------------------------
    async def sale_ids(self) -> list[str]:
        active = await self.rt.redis.smembers(self.rt.keys.active_sales())
        return sorted(str(s) for s in active if self.only is None or s in self.only)

    async def streams(self) -> list[tuple[str, str]]:
        """(sale, ledger shard) of every stream to consume: one per stock bucket of each sale."""
        return [
            (sale_id, shard)
            for sale_id in await self.sale_ids()
            for shard in await self.rt.ledger.shards(sale_id)
        ]

    def consumer_name(self, index: int) -> str:
        """The first consumer keeps the worker's name, so a restart rereads its pending list."""
        return self.name if index == 0 else f"{self.name}/{index + 1}"

    async def consumer(
        self,
        sale_id: str,
        index: int = 0,
        shard: str | None = None,
    ) -> SaleConsumer:
        """Consumer `index` of the stream of `shard` (default: the sale's own, bucket 0)."""
        shard = shard or sale_id
        c = self.consumers.get((shard, index))
        if c is None:
            c = SaleConsumer(self.rt, sale_id, self.consumer_name(index), self.after_commit, shard)
            await c.ensure_group()
            self.consumers[(shard, index)] = c
        return c

    def dispatcher(self, http: httpx.AsyncClient) -> Dispatcher:
        return Dispatcher(self.rt.pool, self.rt.keyring, self.rt.settings, http)

    # -- burst mode -------------------------------------------------------------------------
    async def run_burst(self, timeout_s: float = 60.0) -> int:
        """Handle every entry of every sale until nothing is new or pending; returns entries read.

        The sale's consumers drain it together; then the first one takes over what is still
        pending elsewhere. Errors propagate (a test wants them; the other consumers of the sale
        are cancelled, their batches stay pending); entries of other consumers are reclaimed once
        idle for worker_claim_idle_ms, so a burst after a simulated crash finishes their work.
        """
        deadline = time.monotonic() + timeout_s
        total = 0
        if self.rt.failover is not None:  # a Redis failover not merged yet: merge first
            await self.rt.failover.check_and_merge()
        for sale_id, shard in await self.streams():
            crew = [await self.consumer(sale_id, i, shard) for i in range(self.per_sale)]
            total += await self._drain_together(crew, deadline)
            c = crew[0]
            while True:
                total += await c.reclaim()
                if await c.pending_count() == 0:
                    break
                await asyncio.sleep(self.rt.settings.worker_claim_idle_ms / 4000)
                total += await self._drain(c, deadline)
        return total

    async def _drain_together(self, crew: list[SaleConsumer], deadline: float) -> int:
        if len(crew) == 1:
            return await self._drain(crew[0], deadline)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._drain(c, deadline)) for c in crew]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure, as one consumer would
        return sum(t.result() for t in tasks)

    @staticmethod
    async def _drain(c: SaleConsumer, deadline: float) -> int:
        """Step one consumer until it has no pending entry of its own and nothing new."""
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sale {c.shard}: still pending after deadline")
            n = await c.step(block_ms=None)
            total += n
            if not n and c.cursor == NEW:
                return total

    # -- long-running mode ------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("worker %s: stop requested, draining", self.name)
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        log.info("worker %s: started", self.name)
        if self.rt.failover is not None:  # watch for a Redis failover, merge when one is due
            await self.rt.failover.start()
        async with contextlib.AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=False))
            tasks = {
                asyncio.create_task(self._sweep_loop(), name="sweeper"),
                asyncio.create_task(self._webhook_loop(http), name="webhooks"),
                asyncio.create_task(worker_metrics.heartbeat_loop(self), name="heartbeat"),
            }
            consuming: dict[tuple[str, int], asyncio.Task[None]] = {}
            try:
                while not self.stopping:
                    self.liveness.tick("main")
                    for sale_id, shard in await self._safe_streams():
                        for i in range(self.per_sale):
                            slot = (shard, i)
                            if slot not in consuming or consuming[slot].done():
                                consuming[slot] = asyncio.create_task(
                                    self._consume_loop(sale_id, i, shard),
                                    name=f"consume:{shard}:{i + 1}",
                                )
                    await self._sleep(SALES_REFRESH_S, "main")
            finally:
                self.request_stop()
                everything = tasks | set(consuming.values())
                _, late = await asyncio.wait(everything, timeout=DRAIN_TIMEOUT_S)
                for task in late:
                    task.cancel()
                await asyncio.gather(*everything, return_exceptions=True)
        log.info("worker %s: stopped", self.name)

    async def _sleep(self, seconds: float, loop: str | None = None) -> None:
        """Wait `seconds` (less if stopped); for `loop`, a deliberate wait, not a stall."""
        with (
            contextlib.suppress(TimeoutError),
            self.liveness.waiting(loop) if loop else contextlib.nullcontext(),
        ):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _safe_streams(self) -> list[tuple[str, str]]:
        try:
            return await self.streams()
        except Exception:  # Redis away: keep the consumers we have, try again next tick
            log.exception("worker %s: listing active sales failed", self.name)
            return []

    async def _consume_loop(
        self,
        sale_id: str,
        index: int = 0,
        shard: str | None = None,
    ) -> None:
        settings = self.rt.settings
        reclaim_every = settings.worker_claim_idle_ms / 2000
        last_reclaim, failures = 0.0, 0
        c: SaleConsumer | None = None
        loop = f"consume:{shard or sale_id}:{index + 1}"
        while not self.stopping:
            self.liveness.tick(loop)
            try:
                c = c or await self.consumer(sale_id, index, shard)
                if time.monotonic() - last_reclaim >= reclaim_every:
                    last_reclaim = time.monotonic()
                    await c.reclaim()
                await c.step(block_ms=settings.worker_block_ms)
                failures = 0
            except Exception as exc:
                # Nothing is lost: the failed batch is unacked and still ours; read it again.
                worker_metrics.batch_failed(exc)
                failures += 1
                log.exception("sale %s: batch failed (%d in a row)", shard or sale_id, failures)
                if c is not None:
                    c.restart_from_pending()
                with self.liveness.waiting(loop):  # backing off from a backend: not wedged
                    await self._sleep(min(0.1 * 2**failures, 5.0))
                    if isinstance(exc, POSTGRES_DOWN):
                        # Each re-read of the batch counts as a delivery, and
                        # worker_max_deliveries of them dead-letter it: while PostgreSQL is
                        # away, wait for it instead of burning the orders' deliveries (they
                        # would reach buyers only by hand).
                        await self._until_postgres_answers()
        self.liveness.forget(loop)

    async def _until_postgres_answers(self) -> None:
        """Probe PostgreSQL with backoff until it answers (or the worker stops)."""
        delay = 0.2
        while not self.stopping:
            try:
                async with asyncio.timeout(self.rt.settings.db_timeout_s):
                    await self.rt.pool.fetchval("SELECT 1")
                return
            except (*POSTGRES_DOWN, asyncpg.PostgresError) as exc:
                log.warning(
                    "worker %s: PostgreSQL unavailable (%s), retrying in %.1f s",
                    self.name,
                    type(exc).__name__,
                    delay,
                )
            await self._sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _sweep_loop(self) -> None:
        while not self.stopping:
            self.liveness.tick("sweeper")
            try:
                await self.sweeper.sweep(await self.sale_ids())
            except Exception:
                log.exception("worker %s: sweep failed", self.name)
            await self._sleep(self.rt.settings.sweep_interval_s, "sweeper")

    async def _webhook_loop(self, http: httpx.AsyncClient) -> None:
        dispatcher = self.dispatcher(http)
        while not self.stopping:
            self.liveness.tick("webhooks")
            try:
                busy = await dispatcher.dispatch_once()
            except Exception:
                log.exception("worker %s: webhook delivery failed", self.name)
                busy = 0
            if not busy:
                await self._sleep(WEBHOOK_POLL_S, "webhooks")


# -- entry point ------------------------------------------------------------------------------
def worker_settings(settings: Settings) -> Settings:
    """A worker's settings: its script calls never WAIT for replicas. What it writes to Redis
    follows PostgreSQL (a delivered mark, a refund's outcome) or is redone if lost (an expiry:
    the sweeper runs again; a failover's merge brings PostgreSQL's orders back), so a replica's
    ack adds nothing, while waiting for one failed every batch during a replica outage and
    dead-lettered its entries (each retry is a delivery)."""
    return dataclasses.replace(settings, redis_wait_replicas=0)


async def serve(settings: Settings) -> None:
    rt = await Runtime.open(worker_settings(settings))
    worker = Worker(rt, after_commit=after_commit_fault(settings))  # None unless a test asks
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    exporter = None
    try:
        # /metrics and /healthz (liveness) on the worker's own loop: a wedged loop answers none
        exporter = await worker_metrics.serve(
            worker, settings.worker_metrics_port, settings.metrics_host or "0.0.0.0"
        )
        await worker.run()
    finally:
        if exporter is not None:
            await exporter.stop()
        await rt.close()


def main(settings: Settings | None = None) -> None:
    """`flashgate worker`: run one worker process until SIGTERM/SIGINT, then drain and exit."""
    import uvloop

    if not logging.getLogger().handlers:
        fglog.configure()  # JSON lines (FLASHGATE_LOG_FORMAT=text for a terminal)
    settings = settings or Settings.from_env()
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
