"""The benchmark's parts that can rot quietly: the output parsers, the ratio arithmetic, the
bench-only routes (off by default; the naive design answers like the real purchase), the
report's durability section, the durable PostgreSQL, and the gateway under granian."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import re
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench import durable, naive
from bench.durable import FsyncProbe, durable_postgres, fsync_probe, server_settings
from bench.granian import granian_argv
from bench.parse import Run, median_ratio, parse_pg_test_fsync, parse_redis_benchmark, parse_wrk
from bench.report import ratio_rows, render
from cli.stack import GATEWAY_STOP_GRACE_S, spawn, stop_children, wait_healthy
from core.embedded import ServiceURLs, free_port
from core.settings import Settings
from tests.conftest import ADMIN, ADMIN_TOKEN

WRK = """Running 10s test @ http://127.0.0.1:8000/v1/bench/ping
  2 threads and 64 connections
  Latency Distribution
     50%    3.68ms
     75%    5.00ms
     90%    8.00ms
     99%    1.20s
  171510 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  17151.00
"""


def test_parsers_and_ratios() -> None:
    run = parse_wrk(WRK)
    assert (run.rps, run.p50_ms, run.p99_ms) == (17151.0, 3.68, 1200.0)
    assert (run.requests, run.non2xx, run.socket_errors) == (171510, 7, 3)
    csv = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
        '"p99_latency_ms","max_latency_ms"\n"INCR","155039.00","0.2","0.1","0.20","0.4",'
        '"0.49","1.0"\n'
    )
    r = parse_redis_benchmark(csv)
    assert (r.rps, r.p50_ms, r.p99_ms) == (155039.0, 0.2, 0.49)
    # pair by pair: (10/5, 30/10, 8/8) -> median 2, not median(a)/median(b) = 10/8
    assert median_ratio([10, 30, 8], [5, 10, 8]) == 2.0


@pytest.fixture(scope="module")
async def bench_client(settings: Settings, runtime: object) -> AsyncIterator[httpx.AsyncClient]:
    from gateway.app import create_app
    from risk.engine import AllowAll

    app = create_app(dataclasses.replace(settings, bench_endpoints=True), risk=AllowAll())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fg.test") as c:
            yield c


async def test_bench_routes_are_off_by_default(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/bench/ping")).status_code == 404


async def test_naive_purchase_decrements_one_row(
    bench_client: httpx.AsyncClient, database_url: str
) -> None:
    assert (await bench_client.get("/v1/bench/ping")).json() == {"ok": True}
    r = await bench_client.post("/v1/admin/channels", json={"name": "b"}, headers=ADMIN)
    key = r.json()["api_key"]
    sale_id = "nb-" + uuid.uuid4().hex[:8]
    await naive.create_sale(database_url, sale_id, stock=2, per_user_limit=1, ttl_ms=60_000)
    path = f"/v1/bench/naive/{sale_id}/purchase"

    async def buy(user: str, idem: str) -> httpx.Response:
        return await bench_client.post(
            path,
            json={"user_id": user, "client_ip": "203.0.113.9", "device_id": "d"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
        )

    first = await buy("u1", "k1")
    assert first.status_code == 201 and first.json()["order_id"].startswith(sale_id + ".")
    replay = await buy("u1", "k1")
    assert replay.json()["order_id"] == first.json()["order_id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert (await buy("u1", "k2")).json()["code"] == "purchase_limit_exceeded"
    assert (await buy("u2", "k3")).status_code == 201
    assert (await buy("u3", "k4")).json()["code"] == "sold_out"


PG_TEST_FSYNC = """5 seconds per test
O_DIRECT supported on this platform for open_datasync and open_sync.

Compare file sync methods using one 8kB write:
(in wal_sync_method preference order, except fdatasync is Linux's default)
        open_datasync                     11161.241 ops/sec      90 usecs/op
        fdatasync                         11004.109 ops/sec      91 usecs/op
        fsync                             10669.424 ops/sec      94 usecs/op
        fsync_writethrough                              n/a
        open_sync                          9911.692 ops/sec     101 usecs/op

Compare file sync methods using two 8kB writes:
(in wal_sync_method preference order, except fdatasync is Linux's default)
        open_datasync                      4781.149 ops/sec     209 usecs/op
        fdatasync                          9498.696 ops/sec     105 usecs/op
"""


def test_pg_test_fsync_first_section_only() -> None:
    got = parse_pg_test_fsync(PG_TEST_FSYNC)
    assert got == {
        "open_datasync": (11161.241, 90.0),
        "fdatasync": (11004.109, 91.0),
        "fsync": (10669.424, 94.0),
        "open_sync": (9911.692, 101.0),
    }
    assert parse_pg_test_fsync("pg_test_fsync: could not open output file") == {}


def _runs(*pairs: tuple[float, float]) -> list[Run]:
    return [Run(rps, 1.0, p99) for rps, p99 in pairs]


def test_server_and_durability_ratios_pair_by_pair() -> None:
    results = {
        "ping": _runs((100, 5), (200, 5), (100, 5)),
        "ping-granian": _runs((130, 4), (220, 5), (90, 5)),  # 1.3, 1.1, 0.9 -> 1.1
        "purchase-on": _runs((60, 20), (50, 20), (40, 30)),
        "purchase-on-granian": _runs((54, 24), (50, 30), (44, 30)),  # 0.9, 1.0, 1.1 -> 1.0
        "naive-pg": _runs((30, 40), (30, 40), (30, 40)),
        "naive-pg-durable": _runs((20, 80), (10, 40), (20, 60)),  # rps 3.0, 5.0, 2.0 -> 3.0
    }
    rows = dict(ratio_rows(results))
    assert rows["trivial endpoint: granian / uvicorn"] == "1.10×"
    assert rows["purchase (risk on): granian / uvicorn"] == "1.00×"
    assert rows["p99: purchase (risk on), granian / uvicorn"] == "1.20×"  # 1.2, 1.5, 1.0
    assert rows["purchase (risk on) / naive PostgreSQL design, durable"] == "3.00×"
    assert rows["p99: purchase (risk on) / naive PostgreSQL design, durable"] == "0.50×"
    assert rows["naive PostgreSQL design: durable / fsync off"] == "0.67×"  # .67, .33, .67
    assert rows["purchase (risk on) / naive PostgreSQL design (fsync off)"] == "1.67×"
    assert "Redis: reserve.lua / INCR" not in rows  # a case that did not run: no ratio
    del results["naive-pg-durable"]
    assert not any("durable" in label for label, _ in ratio_rows(results))


def test_report_shows_the_durable_server_and_flush_bound() -> None:
    args = argparse.Namespace(reps=3)
    detail = {
        "durable": {
            "settings": {"fsync": "on", "synchronous_commit": "on"},
            "wal_syncs": 29_000,
            "purchases": 30_000,
            "wal_syncs_per_purchase": 29_000 / 30_000,
            "pg_test_fsync": {"open_datasync": (11161.0, 90.0), "fdatasync": (11004.1, 91.0)},
            "probe": FsyncProbe(ops_s=9_000, p50_us=100.0, p99_us=250.0, samples=18_000),
        }
    }
    results = {"naive-pg": _runs((30, 40)), "naive-pg-durable": _runs((20, 80))}
    text = render(args, "python -m bench.run", results, {}, detail)
    assert "naive design: PostgreSQL-only purchase (same app), PostgreSQL fsync off" in text
    assert "| naive design, durable PostgreSQL (fsync, synchronous_commit on) | 20 req/s" in text
    assert "settings as it reports them: fsync=on, synchronous_commit=on." in text
    assert "0.97 (29,000 flushes, 30,000 purchases)" in text
    assert "| pg_test_fsync -s 1, one 8 kB write, fdatasync | 11,004 | 91 µs (mean) |" in text
    assert "open_datasync" not in text  # not what PostgreSQL uses on Linux
    assert "| 9,000 | p50 100 µs, p99 250 µs |" in text
    assert "at most ~10,000 purchases/s" in text
    assert "Durable PostgreSQL" not in render(args, "x", results, {}, {})


def test_fsync_probe_flushes_a_real_file(tmp_path: Path) -> None:
    probe = fsync_probe(tmp_path, seconds=0.2)
    assert probe.samples > 0 and probe.ops_s > 0
    assert 0 < probe.p50_us <= probe.p99_us
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


async def test_durable_postgres_flushes_every_commit() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="flashgate-durable-") as d,
        durable_postgres(Path(d)) as pg,
    ):
        got = await server_settings(pg.url)
        assert (got["fsync"], got["synchronous_commit"], got["full_page_writes"]) == (
            "on",
            "on",
            "on",
        )
        conn = await asyncpg.connect(pg.url)
        try:
            await conn.execute("CREATE TABLE t (n int)")
            # Backends publish statistics lazily; forcing the flush makes the count exact.
            await conn.execute("SELECT pg_stat_force_next_flush()")
            before = await wal_syncs_on(conn)
            for n in range(10):  # ten commits, each waits for its own flush
                await conn.execute("INSERT INTO t VALUES ($1)", n)
            await conn.execute("SELECT pg_stat_force_next_flush()")
            assert await wal_syncs_on(conn) - before >= 10
        finally:
            await conn.close()
        assert await durable.wal_syncs(pg.url) >= 10


async def wal_syncs_on(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT wal_sync FROM pg_stat_wal"))


def lifespan_probe_app() -> Any:
    """The gateway's app factory, wrapped to append each lifespan message the app sends to
    $FG_LIFESPAN_LOG: what granian ran of the lifespan, seen from outside its process."""
    from gateway.app import create_app

    inner = create_app()
    log = Path(os.environ["FG_LIFESPAN_LOG"])

    def note(kind: str) -> None:
        with log.open("a") as f:
            f.write(kind + "\n")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def watched(message: Any) -> None:
            if str(message.get("type", "")).startswith("lifespan."):
                note(message["type"])
            await send(message)

        await inner(scope, receive, watched if scope["type"] == "lifespan" else send)

    return app


def test_gateway_under_granian_runs_its_lifespan_and_stops_by_pid(
    settings: Settings, service_urls: ServiceURLs, database_url: str, tmp_path: Path
) -> None:
    lifespan = tmp_path / "lifespan.log"
    env = {
        **os.environ,
        "FLASHGATE_REDIS_URL": service_urls.redis_url,
        "FLASHGATE_DATABASE_URL": database_url,
        "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "FLASHGATE_KEY_PREFIX": settings.key_prefix,
        "FLASHGATE_BENCH_ENDPOINTS": "1",
        "FG_LIFESPAN_LOG": str(lifespan),
    }
    port = free_port()
    argv = granian_argv("127.0.0.1", port, factory="tests.test_bench:lifespan_probe_app")
    child = spawn("granian", argv, env, tmp_path)
    try:
        wait_healthy(child, f"http://127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/bench/ping").json() == {"ok": True}
        assert lifespan.read_text().split() == ["lifespan.startup.complete"]
        worker = int(re.findall(r"Spawning worker-1 with PID: (\d+)", child.tail(50))[0])
    finally:
        stop_children([child], GATEWAY_STOP_GRACE_S)
    assert child.proc.returncode == 0, child.tail()
    assert lifespan.read_text().split() == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert not Path(f"/proc/{worker}").exists()  # SIGTERM to the supervisor's PID stopped it
