"""A Redis failover pauses the sale until Redis and PostgreSQL agree (#12, item 2).

Real servers: a Valkey primary and its replica; the in-process gateway and a long-running
worker reach Redis through a TCP proxy (tests/faults/support.py) whose upstream is switched to
the promoted replica, as a Sentinel-aware proxy or a Service would. A stampede of paid
purchases; the replication link is stalled (replica SIGSTOPped) and cut (CLIENT KILL TYPE
replica) while purchases go on and the worker persists them; the primary is SIGKILLed, the
replica promoted (REPLICAOF NO ONE) and the proxy switched; the stampede goes on. Then: every
201 has its order in PostgreSQL and its key, no unit is sold twice, no user holds more than
the limit, and the pause and the merge happened (their durations printed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.embedded import EmbeddedRedis
from core.failover import FailoverGuard
from core.reconcile import check, reconcile
from core.runtime import Runtime
from core.settings import Settings
from tests.conftest import channel_headers, create_channel, create_sale, purchase_body, until
from tests.faults.conftest import app_client, fault_settings
from tests.faults.support import TcpProxy, audit, wait_quiescent
from tests.replication import fail_over, replica_online, stall_and_cut_link
from workers.runner import Worker, worker_settings

KEYS = 60


@dataclass
class Stage:
    primary: EmbeddedRedis
    replica: EmbeddedRedis
    proxy: TcpProxy
    settings: Settings
    app: Any
    client: httpx.AsyncClient
    rt: Runtime  # the test's own reads, through the proxy
    worker: Worker

    @property
    def gateway_guard(self) -> FailoverGuard:
        guard = self.app.state.gateway.runtime.failover
        assert guard is not None
        return guard  # type: ignore[no-any-return]

    @property
    def worker_guard(self) -> FailoverGuard:
        assert self.worker.rt.failover is not None
        return self.worker.rt.failover

    async def stall_and_cut_link(self) -> None:
        await stall_and_cut_link(self.primary, self.replica)

    async def fail_over(self) -> float:
        """Kill the primary, promote the replica, point the proxy at it; returns when."""
        await fail_over(self.primary, self.replica)
        self.proxy.target = ("127.0.0.1", self.replica.port)
        self.proxy.cut()  # whatever still hangs on the old primary
        await self.rt.redis.connection_pool.disconnect()  # the test's own reads: reconnect
        return time.monotonic()


@contextlib.asynccontextmanager
async def staged(faults_database: str, wait: str) -> AsyncIterator[Stage]:
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-failover-merge-"))
    primary = EmbeddedRedis(run_dir, name="primary")
    primary.start()
    replica = EmbeddedRedis(run_dir, name="replica", replica_of=primary.port)
    replica.start()
    proxy = TcpProxy("127.0.0.1", primary.port)
    await proxy.start()
    settings = fault_settings(
        f"redis://127.0.0.1:{proxy.port}/0",
        faults_database,
        "fgfm" + secrets.token_hex(4),
        FLASHGATE_REDIS_WAIT_REPLICAS=wait,
        FLASHGATE_REDIS_WAIT_TIMEOUT_MS="200",
        FLASHGATE_REDIS_TIMEOUT_S="1",
        FLASHGATE_SWEEP_INTERVAL_S="0.2",
    )
    rt = worker_rt = None
    task: asyncio.Task[None] | None = None
    try:
        await replica_online(primary.url)
        app, client = await app_client(settings)
        rt = await Runtime.open(settings)
        worker_rt = await Runtime.open(worker_settings(settings), run_migrations=False)
        worker = Worker(worker_rt, name="w-failover")
        async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
            task = asyncio.create_task(worker.run())
            try:
                yield Stage(primary, replica, proxy, settings, app, client, rt, worker)
            finally:
                worker.request_stop()
                await asyncio.wait_for(task, 40)
                await client.aclose()
    finally:
        for r in (rt, worker_rt):
            if r is not None:
                await r.close()
        await proxy.close()
        if replica.proc is not None and replica.proc.poll() is None:
            os.kill(replica.proc.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Attempt:
    user: str
    key: str
    answer: httpx.Response | None = None
    paused_seen: int = 0  # 503 sale_not_ready answers before the final one


async def attempt(
    stage: Stage, channel: dict[str, str], sale: str, user: str, key: str, timeout_s: float = 25
) -> Attempt:
    """A paid purchase, retried with its Idempotency-Key while the answer is a 5xx (as a
    storefront does: 503 with Retry-After, a lost connection)."""
    out = Attempt(user, key)
    body = purchase_body(user, payment_ref=f"pay-{key}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = await stage.client.post(
                f"/v1/sales/{sale}/purchase", json=body, headers=channel_headers(channel, key)
            )
            if r.status_code < 500:
                out.answer = r
                return out
            if r.json().get("code") == "sale_not_ready":
                out.paused_seen += 1
        await asyncio.sleep(0.05)
    return out


async def stampede(
    stage: Stage,
    channel: dict[str, str],
    sale: str,
    pairs: list[tuple[str, str]],
    concurrency: int = 16,
) -> list[Attempt]:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str, key: str) -> Attempt:
        async with gate:
            return await attempt(stage, channel, sale, user, key)

    return await asyncio.gather(*(one(u, k) for u, k in pairs))


async def persisted(stage: Stage, sale: str) -> int:
    return int(await stage.rt.pool.fetchval("SELECT count(*) FROM orders WHERE sale_id = $1", sale))


async def _lossy_failover(stage: Stage, wait: str) -> dict[str, Any]:
    c = stage.client
    channel = await create_channel(c)
    sale, codes = await create_sale(c, keys=KEYS, per_user_limit=1)
    before = await stampede(stage, channel, sale, [(f"a{i}", f"a{i}") for i in range(20)])
    assert all(a.answer is not None and a.answer.status_code == 201 for a in before)

    await stage.stall_and_cut_link()
    # The gap: purchases the replica never receives; the worker copies them to PostgreSQL.
    # With WAIT they are answered 503 (no replica acks) and retried with their keys until
    # the failover is over; the worker persists them all the same (they ran on the primary).
    gap_task = asyncio.create_task(
        stampede(stage, channel, sale, [(f"b{i}", f"b{i}") for i in range(20)])
    )
    if wait == "0":
        gap = await gap_task
        assert all(a.answer is not None and a.answer.status_code == 201 for a in gap)
    if wait == "0":
        await until(lambda: _persisted_at_least(stage, sale, 40), timeout_s=20)
    else:  # the link stays down >= 1 s while the 503'd buyers retry
        await asyncio.sleep(1.5)

    # The failover, while more buyers arrive: the gap's buyers again (new keys: their limit
    # must hold), and new ones.
    later = [(f"b{i}", f"b{i}-again") for i in range(20)] + [(f"c{i}", f"c{i}") for i in range(40)]
    if wait == "0":
        # Unprotected, a 201 from the old primary that neither the replica nor the worker got
        # before the kill is lost for good (what WAIT is for): the rush starts at promotion.
        failed_over_at = await stage.fail_over()
        rush = asyncio.create_task(stampede(stage, channel, sale, later, concurrency=8))
    else:
        # With WAIT the rush starts on the old primary: its buyers get 503 (no replica acks),
        # retry with their keys, and are answered once the merge is done.
        rush = asyncio.create_task(stampede(stage, channel, sale, later, concurrency=8))
        await asyncio.sleep(0.3)
        failed_over_at = await stage.fail_over()
    # the gap's own retries (a client that got 503 retries with its key)
    retried = await stampede(stage, channel, sale, [(f"b{i}", f"b{i}") for i in range(20)])
    after = await rush
    gap = await gap_task
    await until(lambda: _resumed(stage), timeout_s=20)
    resumed_after = time.monotonic() - failed_over_at

    attempts = [*before, *gap, *retried, *after]
    won = [a for a in attempts if a.answer is not None and a.answer.status_code == 201]
    unanswered = [a.key for a in attempts if a.answer is None]
    assert not unanswered, unanswered
    confirmed = {a.answer.json()["order_id"]: 1 for a in won if a.answer is not None}
    # every paid order PostgreSQL holds is delivered, whether its buyer heard 201 or 503
    rows = await stage.rt.pool.fetch(
        "SELECT order_id, channel_id, user_id, status FROM orders WHERE sale_id = $1", sale
    )
    for r in rows:
        assert r["status"] in ("confirmed", "delivered"), dict(r)
        confirmed[r["order_id"]] = 1
    await wait_quiescent(stage.rt, sale, confirmed, timeout_s=40)
    result = await audit(stage.rt, sale, confirmed, codes)  # each 201 delivered, keys distinct
    rows = await stage.rt.pool.fetch(
        "SELECT user_id, count(*) AS n FROM orders WHERE sale_id = $1"
        " AND status IN ('reserved', 'confirmed', 'delivered') GROUP BY user_id",
        sale,
    )
    over = {r["user_id"]: r["n"] for r in rows if r["n"] > 1}
    assert not over, over  # per-user limits held
    assert result.keys_delivered <= KEYS
    answers = Counter(
        a.answer.json().get("code", "201") if a.answer.status_code != 201 else "201"
        for a in attempts
        if a.answer is not None
    )
    gw, wk = stage.gateway_guard, stage.worker_guard
    merged = [g.last_merge for g in (gw, wk) if g.last_merge is not None]
    assert merged, "no merge ran"
    await until(lambda: _resumed(stage), timeout_s=10)
    figures = {
        "wait": wait,
        "keys": KEYS,
        "answers": dict(answers),
        "orders_201": len(won),
        "orders_in_postgres": len(confirmed),
        "keys_delivered": result.keys_delivered,
        "orders_merged": sum(m.orders for m in merged),
        "gateway_pause_s": round(gw.last_pause_s, 3),
        "worker_pause_s": round(wk.last_pause_s, 3),
        "resumed_after_failover_s": round(resumed_after, 3),
        "paused_answers_seen": sum(a.paused_seen for a in attempts),
    }
    print("FAILOVER-MERGE", json.dumps(figures))
    return figures


async def _persisted_at_least(stage: Stage, sale: str, n: int) -> bool:
    return await persisted(stage, sale) >= n


async def _resumed(stage: Stage) -> bool:
    """Both processes sell on the merged primary (a guard that meets the new primary late,
    on a reconnect, pauses until its next check reads the recorded merge: milliseconds)."""
    return all(
        g.merged is not None and g.merged == g.seen and not g.paused
        for g in (stage.gateway_guard, stage.worker_guard)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wait", ["0", "auto"])
async def test_a_lossy_failover_pauses_merges_and_sells_nothing_twice(
    faults_database: str, wait: str
) -> None:
    async with staged(faults_database, wait) as stage:
        figures = await _lossy_failover(stage, wait)
    if wait == "0":  # the replica lacked the gap's orders: the merge brought them back
        assert figures["orders_merged"] >= 1
    assert figures["gateway_pause_s"] > 0


@pytest.mark.timeout(90)
async def test_a_clean_failover_pauses_briefly_and_loses_nothing(faults_database: str) -> None:
    """The replica has everything: the merge finds nothing to bring back, the pause is one
    merge pass."""
    async with staged(faults_database, "auto") as stage:
        c = stage.client
        channel = await create_channel(c)
        sale, codes = await create_sale(c, keys=30, per_user_limit=1)
        first = await stampede(stage, channel, sale, [(f"a{i}", f"a{i}") for i in range(20)])
        assert all(a.answer is not None and a.answer.status_code == 201 for a in first)
        await until(lambda: _persisted_at_least(stage, sale, 20), timeout_s=20)
        await replica_online(stage.primary.url)
        failed_over_at = await stage.fail_over()
        again = await stampede(stage, channel, sale, [(f"a{i}", f"a{i}") for i in range(20)])
        for old, new in zip(first, again, strict=True):  # replayed: the same orders
            assert new.answer is not None and old.answer is not None
            assert new.answer.status_code == 201, new.answer.text
            assert new.answer.json()["order_id"] == old.answer.json()["order_id"]
        late = await stampede(stage, channel, sale, [(f"n{i}", f"n{i}") for i in range(20)])
        won = [a for a in late if a.answer is not None and a.answer.status_code == 201]
        assert len(won) == 10
        await until(lambda: _resumed(stage), timeout_s=10)
        resumed_after = time.monotonic() - failed_over_at
        confirmed = {a.answer.json()["order_id"]: 1 for a in [*first, *won] if a.answer is not None}
        await wait_quiescent(stage.rt, sale, confirmed, timeout_s=30)
        result = await audit(stage.rt, sale, confirmed, codes)
        merges = [
            g.last_merge
            for g in (stage.gateway_guard, stage.worker_guard)
            if g.last_merge is not None
        ]
        assert merges and sum(m.orders for m in merges) == 0
        print(
            "FAILOVER-CLEAN",
            json.dumps(
                {
                    "orders": len(confirmed),
                    "keys_delivered": result.keys_delivered,
                    "gateway_pause_s": round(stage.gateway_guard.last_pause_s, 3),
                    "resumed_after_failover_s": round(resumed_after, 3),
                }
            ),
        )


@pytest.mark.timeout(90)
async def test_reconcile_write_mode_merges_what_postgres_leads(faults_database: str) -> None:
    """`flashgate reconcile SALE` (write mode) does the same merge by hand: on the promoted
    node, with no gateway or worker running, postgres_ahead > 0 -> merged -> ok."""
    from tests.workers_fixtures import buy, make_channel, make_sale

    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-failover-rec-"))
    primary = EmbeddedRedis(run_dir, name="primary")
    primary.start()
    replica = EmbeddedRedis(run_dir, name="replica", replica_of=primary.port)
    replica.start()
    prefix = "fgfr" + secrets.token_hex(4)
    rt = promoted = None
    try:
        await replica_online(primary.url)
        rt = await Runtime.open(
            fault_settings(primary.url, faults_database, prefix, FLASHGATE_REDIS_WAIT_REPLICAS="0")
        )
        channel, _ = await make_channel(rt)
        sale, _ = await make_sale(rt, keys=10, per_user_limit=1)
        for i in range(3):
            await buy(rt, sale, channel, pay="pay", user=f"u{i}")
        await Worker(rt, sale_ids=[sale]).run_burst()
        await replica_online(primary.url)
        await stall_and_cut_link(primary, replica)
        for i in range(3, 6):
            await buy(rt, sale, channel, pay="pay", user=f"u{i}")
        await Worker(rt, sale_ids=[sale]).run_burst()
        await rt.close()
        rt = None
        await fail_over(primary, replica)
        promoted = await Runtime.open(
            fault_settings(replica.url, faults_database, prefix, FLASHGATE_REDIS_WAIT_REPLICAS="0"),
            run_migrations=False,
        )
        found = await check(promoted.redis, promoted.keys, promoted.pool, sale)
        assert found.drift["postgres_ahead_orders"] == 3, found.as_dict()
        report = await reconcile(promoted.ledger, promoted.pool, sale, write=True)
        assert report.merged == 3 and report.ok, report.as_dict()
        again = await reconcile(promoted.ledger, promoted.pool, sale, write=True)
        assert again.merged == 0 and again.ok  # idempotent
        stock = await promoted.ledger.stock(sale)
        assert stock is not None and stock["delivered"] == 6 and stock["available"] == 4
        assert await promoted.redis.hget(promoted.keys.buyers(sale), f"{channel}:u4") == "1"
    finally:
        for r in (rt, promoted):
            if r is not None:
                await r.close()
        if replica.proc is not None and replica.proc.poll() is None:
            os.kill(replica.proc.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
