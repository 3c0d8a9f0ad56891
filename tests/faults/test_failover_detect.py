"""A failover to a replica that missed acknowledged writes (#12): PostgreSQL then leads Redis,
and reconcile must say so, mid-stream or not, instead of a false all-clear.

Real servers: a Valkey primary and its replica; the replica is stopped (SIGSTOP) and its link
cut so the last purchases never reach it, the workers persist them to PostgreSQL, the primary
is killed and the replica promoted (REPLICAOF NO ONE), as an operator or Sentinel would. The
gateway here runs with FLASHGATE_REDIS_WAIT_REPLICAS=0: the unprotected configuration, to show
detection."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.embedded import EmbeddedRedis
from core.reconcile import check
from core.runtime import Runtime
from tests.conftest import until
from tests.faults.conftest import fault_settings
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.runner import Worker


async def _online(primary_url: str) -> None:
    primary = Redis.from_url(primary_url, decode_responses=True)

    async def up() -> bool:
        replica = (await primary.info("replication")).get("slave0") or {}
        return isinstance(replica, dict) and replica.get("state") == "online"

    try:
        await until(up, timeout_s=15)
    finally:
        await primary.aclose()


@pytest.mark.timeout(90)
async def test_reconcile_reports_postgres_ahead_after_a_lossy_failover(
    faults_database: str,
) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-failover-"))
    primary = EmbeddedRedis(run_dir, name="primary")
    primary.start()
    replica = EmbeddedRedis(run_dir, name="replica", replica_of=primary.port)
    replica.start()
    prefix = "fgfo" + os.urandom(4).hex()
    rt = promoted = None
    try:
        await _online(primary.url)
        rt = await Runtime.open(
            fault_settings(primary.url, faults_database, prefix, FLASHGATE_REDIS_WAIT_REPLICAS="0")
        )
        channel, _ = await make_channel(rt)
        sale, _ = await make_sale(rt, keys=20)
        for _ in range(5):
            await buy(rt, sale, channel, pay="pay")
        await Worker(rt, sale_ids=[sale]).run_burst()
        assert (await check(rt.redis, rt.keys, rt.pool, sale)).ok
        await until(lambda: _replica_has(replica.url, rt.keys.sale(sale)), timeout_s=10)

        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)  # the replica stalls, then its link is cut:
        await rt.redis.execute_command("CLIENT", "KILL", "TYPE", "replica")  # what follows is lost
        lost = [await buy(rt, sale, channel, pay="pay") for _ in range(3)]
        await Worker(rt, sale_ids=[sale]).run_burst()  # ... but PostgreSQL has them
        assert primary.proc is not None
        os.kill(primary.proc.pid, signal.SIGKILL)
        primary.proc.wait()
        os.kill(replica.proc.pid, signal.SIGCONT)
        await rt.close()
        rt = None

        admin = Redis.from_url(replica.url, decode_responses=True)
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
        promoted = await Runtime.open(
            fault_settings(replica.url, faults_database, prefix, FLASHGATE_REDIS_WAIT_REPLICAS="0"),
            run_migrations=False,
        )
        report = await check(promoted.redis, promoted.keys, promoted.pool, sale)
        assert not report.ok
        assert report.drift["postgres_ahead"] >= 3  # 3 paid units Redis no longer knows
        assert report.drift["postgres_ahead_orders"] == len(lost)
        # the unit-level check alone (the workers' periodic job) sees it too
        cheap = await check(promoted.redis, promoted.keys, promoted.pool, sale, orders=False)
        assert cheap.drift["postgres_ahead"] >= 3
    finally:
        for r in (rt, promoted):
            if r is not None:
                await r.close()
        if replica.proc is not None and replica.proc.poll() is None:
            os.kill(replica.proc.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _replica_has(url: str, key: str) -> bool:
    r = Redis.from_url(url, decode_responses=True)
    try:
        return bool(await r.exists(key))
    finally:
        await r.aclose()
