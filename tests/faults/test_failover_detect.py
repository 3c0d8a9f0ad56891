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

from core.embedded import EmbeddedRedis
from core.reconcile import check
from core.runtime import Runtime
from tests.faults.conftest import fault_settings
from tests.replication import fail_over, replica_online, stall_and_cut_link
from tests.workers_fixtures import buy, make_channel, make_sale
from workers.runner import Worker


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
        await replica_online(primary.url)
        rt = await Runtime.open(
            fault_settings(primary.url, faults_database, prefix, FLASHGATE_REDIS_WAIT_REPLICAS="0")
        )
        channel, _ = await make_channel(rt)
        sale, _ = await make_sale(rt, keys=20)
        for _ in range(5):
            await buy(rt, sale, channel, pay="pay")
        await Worker(rt, sale_ids=[sale]).run_burst()
        assert (await check(rt.redis, rt.keys, rt.pool, sale)).ok
        await replica_online(primary.url)  # the replica has all of it so far

        await stall_and_cut_link(primary, replica)  # what follows is lost to the replica
        lost = [await buy(rt, sale, channel, pay="pay") for _ in range(3)]
        await Worker(rt, sale_ids=[sale]).run_burst()  # ... but PostgreSQL has them
        await rt.close()
        rt = None
        await fail_over(primary, replica)
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
