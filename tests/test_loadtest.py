"""The load test can't rot: a few-second Locust run through `python -m loadtest.run` (Locust in
a subprocess, so its gevent patching never touches this process) against a stack on the
session's servers, plus the gate's logic and the shapes as plain functions."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.embedded import ServiceURLs
from loadtest.audit import SLA, RequestStats, judge
from loadtest.profiles import Spike, Steady, schedule
from loadtest.run import _settle
from loadtest.where import SAMPLE_S, TICKS, CpuSampler, Sample, gateway_latency
from tests.conftest import scratch_database
from tests.test_cli import _alive


@pytest.fixture
async def loadtest_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    async with scratch_database(service_urls.database_url, "flashgate_loadtest_") as url:
        yield url


@pytest.mark.timeout(150)
def test_smoke_load_test_passes_its_gate(
    service_urls: ServiceURLs, loadtest_database: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "FLASHGATE_REDIS_URL": service_urls.redis_url,
        "FLASHGATE_DATABASE_URL": loadtest_database,
        "FLASHGATE_KEY_PREFIX": "fglt" + secrets.token_hex(4),
    }
    # Latency is not what the smoke checks (the suite shares the machine): 1 s p99 bound.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.run",
            "--shape",
            "none",
            "--users",
            "12",
            "--duration-s",
            "4",
            "--keys",
            "30",
            "--opens-in-s",
            "0",
            "--bots",
            "2",
            "--solvers",
            "1",
            "--workers",
            "1",
            "--results-dir",
            str(tmp_path),
            "--sla-set",
            "purchase_p99_ms=1000",
            "--progress-s",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "VERDICT: PASS" in r.stdout
    results = Path(json.loads(r.stdout.strip().splitlines()[-1])["results"])
    verdict = json.loads((results / "verdict.json").read_text())
    assert verdict["ok"] and verdict["delivered"] == verdict["confirmed"] > 0
    assert verdict["verdict"] == "PASS"
    assert verdict["requests"]["purchase"]["count"] > 0
    # Named checks; a run this small has too few samples for a client-side p99 verdict.
    checks = {c["name"]: c for c in verdict["checks"]}
    assert checks["duplicate keys = 0"]["result"] == "pass"
    assert checks["purchase p99 (client)"]["result"] in ("not_judged", "pass")
    # Progress while Locust ran, and the verdict inside Locust's own page.
    assert "users" in r.stdout and "req/s" in r.stdout and "p99 so far" in r.stdout
    assert (results / "locust_stats.csv").exists()
    assert "Flashgate SLA verdict" in (results / "report.html").read_text()
    # Where the time went: the gateway's own histogram and CPU per process, in the report.
    where_ = verdict["where"]
    assert where_["gateway_latency"]["count"] >= verdict["requests"]["purchase"]["count"]
    # (Redis and PostgreSQL are the suite's, started before the run: counted in "rest")
    assert {"gateway", "worker", "locust", "rest"} <= set(where_["cpu_whole_run"]["cores"])
    assert where_["cpu_whole_run"]["cores"]["locust"] > 0
    assert "by the gateway itself" in r.stdout and "busiest second" in r.stdout
    assert "us of CPU per request" in r.stdout
    pids = next(line for line in r.stdout.splitlines() if line.startswith("loadtest: pids "))
    for pid in (int(p.split("=")[1]) for p in pids.split()[2:]):
        assert not _alive(pid), f"pid {pid} left running"


def test_gateway_latency_from_histogram_deltas() -> None:
    before = {0.002: 10.0, 0.05: 20.0, 0.1: 20.0, float("inf"): 20.0}
    after = {0.002: 510.0, 0.05: 1005.0, 0.1: 1019.0, float("inf"): 1020.0}
    lat = gateway_latency(before, after, sla_ms=50)
    assert lat is not None
    assert (lat.count, lat.sla_edge_ms, lat.p99_bucket_ms) == (1000, 50.0, 100.0)
    assert lat.within_sla == pytest.approx(0.985)
    # The SLA between two edges: read at the edge below it (never flattering).
    assert gateway_latency(before, after, sla_ms=75).sla_edge_ms == 50.0  # type: ignore[union-attr]
    assert gateway_latency(after, after, sla_ms=50) is None  # nothing answered in the run
    assert gateway_latency(before, None, sla_ms=50) is None  # /metrics unreadable


def test_cpu_windows_split_the_machine_by_process() -> None:
    tick = float(TICKS)
    sampler = CpuSampler({}, discover=False)
    sampler.samples = [
        Sample(0.0, busy=0, total=0, procs={"gateway": 0.0}),
        Sample(
            1.0,
            busy=int(1.5 * tick),
            total=2 * int(tick),
            procs={"gateway": 0.5 * tick, "locust": 0.25 * tick},
        ),  # locust born since
        Sample(
            2.0,
            busy=int(1.6 * tick),
            total=4 * int(tick),
            procs={"gateway": 0.6 * tick, "locust": 0.3 * tick, "worker-1": 0.1 * tick},
        ),
    ]
    busiest = sampler.busiest(seconds=SAMPLE_S)
    assert busiest is not None and busiest.start == 0.0
    assert busiest.cores == pytest.approx({"gateway": 0.5, "locust": 0.25, "rest": 0.75})
    assert busiest.idle == pytest.approx(0.25)
    whole = sampler.whole()
    assert whole is not None and whole.idle == pytest.approx(0.6)
    assert whole.cores == pytest.approx(
        {"gateway": 0.3, "locust": 0.15, "worker": 0.05, "rest": 0.3}
    )


def _stats(p99: float, failures: int = 0) -> list[RequestStats]:
    return [
        RequestStats("purchase", 1000, failures, 5, p99, 100),
        RequestStats("Aggregated", 1000, failures, 5, p99, 100),
    ]


def _good() -> dict[str, Any]:
    orders = {
        "s.1": {"status": "delivered", "user_id": "a", "quantity": 1, "card_keys": ["K1"]},
        "s.2": {"status": "delivered", "user_id": "b", "quantity": 1, "card_keys": ["K2"]},
    }
    stock = {"total": 3, "available": 1, "reserved": 0, "confirmed": 0, "delivered": 2}
    return {"orders": orders, "stock": stock}


def _judge(
    stats: list[RequestStats],
    orders: dict[str, Any],
    stock: dict[str, Any],
) -> dict[str, bool]:
    v = judge(
        SLA(),
        stats,
        [],
        orders,
        stock,
        stock_total=3,
        imported={"K1", "K2", "K3"},
        per_user_limit=1,
        delivery_ms=[10.0, 20.0],
        gateway=(1000, 10.0),
    )
    return {name: bool(ok) for name, ok, _ in v.checks}


def test_gate_passes_a_clean_run_and_fails_each_breach() -> None:
    g = _good()
    assert all(_judge(_stats(20), g["orders"], g["stock"]).values())
    assert not _judge(_stats(51), g["orders"], g["stock"])["purchase p99 (client)"]
    assert not _judge(_stats(20, failures=2), g["orders"], g["stock"])["errors"]
    dup = {**g["orders"], "s.2": {**g["orders"]["s.2"], "card_keys": ["K1"]}}
    assert not _judge(_stats(20), dup, g["stock"])["duplicate keys = 0"]
    foreign = {**g["orders"], "s.2": {**g["orders"]["s.2"], "card_keys": ["X"]}}
    assert not _judge(_stats(20), foreign, g["stock"])["keys imported"]
    greedy = {**g["orders"], "s.2": {**g["orders"]["s.2"], "user_id": "a"}}
    assert not _judge(_stats(20), greedy, g["stock"])["per-user limit"]
    stuck = {**g["orders"], "s.2": {**g["orders"]["s.2"], "status": "confirmed"}}
    assert not _judge(_stats(20), stuck, g["stock"])["all delivered"]
    leak = {**g["stock"], "available": 2}
    assert not _judge(_stats(20), g["orders"], leak)["stock adds up"]


def test_gate_judges_a_p99_only_from_enough_samples() -> None:
    """A class of 40 samples has no p99 (it is their maximum): reported as not judged, never
    a pass or a fail; the gateway's own histogram judges every purchase of the run."""
    g = _good()
    stats = [
        RequestStats("purchase", 5000, 0, 5, 30, 100),
        RequestStats("purchase [solved]", 40, 0, 50, 900, 1),
        RequestStats("Aggregated", 5040, 0, 5, 30, 100),
    ]

    def run(stats: list[RequestStats], gateway: tuple[int, float] | None) -> dict[str, Any]:
        v = judge(
            SLA(),
            stats,
            [],
            g["orders"],
            g["stock"],
            stock_total=3,
            imported={"K1", "K2"},
            per_user_limit=1,
            delivery_ms=[10.0],
            gateway=gateway,
        )
        return {"ok": v.ok, **{c["name"]: c["result"] for c in v.to_json()["checks"]}}

    out = run(stats, (5040, 25.0))
    assert out["p99 purchase [solved]"] == "not_judged"
    assert out["purchase p99 (client)"] == "pass" and out["purchase p99 (gateway)"] == "pass"
    assert out["ok"]
    assert run(stats, (5040, 100.0))["purchase p99 (gateway)"] == "fail"
    assert not run(stats, (5040, 100.0))["ok"]
    few = run([RequestStats("purchase", 60, 0, 5, 30, 10)], (60, 25.0))
    assert few["purchase p99 (client)"] == few["purchase p99 (gateway)"] == "not_judged"
    assert run(stats, None)["purchase p99 (gateway)"] == "not_judged"


def test_progress_lines_follow_a_growing_file(tmp_path: Path) -> None:
    from loadtest.progress import Follower, describe

    path = tmp_path / "progress.jsonl"
    follower = Follower(path)
    assert follower.new() == []  # not written yet
    path.write_text(
        '{"t_s": 3, "users": 50, "rps": 120.5, "requests": 360, "purchases": 300, '
        '"purchase_p99_ms": 12, "failures": 0}\n{"t_s": 6, "us'
    )
    (snap,) = follower.new()
    assert "50 users" in describe(snap) and "p99 so far 12 ms" in describe(snap)
    with open(path, "a") as f:
        f.write('ers": 80}\n')
    assert follower.new() == [{"t_s": 6, "users": 80}]


def test_shapes() -> None:
    spike = Spike(peak=1000, opens_at_s=5, ramp_s=2, hold_s=10, duration_s=30, idle_users=5)
    assert spike.tick(0) == (5, 5.0)  # idle before the opening
    assert spike.tick(3.5) == (1000, 500.0)  # everyone there within the ramp
    assert spike.tick(14)[0] == 1000
    assert spike.tick(20)[0] == 200  # the tail
    assert spike.tick(30) is None
    assert Steady(users=50, ramp_s=5, duration_s=10).tick(1) == (50, 10.0)
    assert isinstance(schedule("steady", users=5, opens_at_s=0, duration_s=1), Steady)
    with pytest.raises(ValueError):
        schedule("zigzag", users=5, opens_at_s=0, duration_s=1)


def test_audit_waits_for_open_reservations_to_settle() -> None:
    """The orders and the ledger are read once nothing moves: a reservation expiring between
    the two reads would look like an oversold unit."""
    ledgers = iter(
        [
            {"confirmed": 2, "reserved": 3},
            {"confirmed": 0, "reserved": 3},
            {"confirmed": 0, "reserved": 1},
            {"confirmed": 0, "reserved": 0},
        ]
    )
    reads: list[dict[str, int]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        reads.append(next(ledgers))
        return httpx.Response(200, json={"stock": reads[-1]})

    with httpx.Client(base_url="http://gw", transport=httpx.MockTransport(answer)) as admin:
        far = time.monotonic() + 60
        _settle(admin, "s", far, far)
        assert reads[-1] == {"confirmed": 0, "reserved": 0} and len(reads) == 4

        # Bounded: past both deadlines it stops asking, whatever the ledger says.
        ledgers = iter([{"confirmed": 1, "reserved": 1}] * 3)
        reads.clear()
        _settle(admin, "s", time.monotonic(), time.monotonic())
        assert len(reads) == 1


def test_load_goes_only_to_loopback(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.run",
            "--url",
            "http://example.com:8000",
            "--admin-token",
            "t",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "loopback" in r.stderr, r.stderr
