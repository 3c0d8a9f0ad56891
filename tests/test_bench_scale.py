"""`make bench-scale` can't rot: bench/scale.py in its smallest configuration (1 and 2 gateway
processes x 1 and 2 Redis masters, 1 s runs), on a scratch database of the session's
PostgreSQL, with its own Redis servers; plus its figures from made-up measurements."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.layouts import MasterStats
from bench.parse import Run
from bench.scale import Cell, redis_figures, summary
from core.embedded import ServiceURLs
from tests.conftest import scratch_database


@pytest.fixture
async def scale_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    async with scratch_database(service_urls.database_url, "flashgate_scale_") as url:
        yield url


@pytest.mark.timeout(90)
def test_bench_scale_runs_in_a_tiny_configuration(scale_database: str, tmp_path: Path) -> None:
    if not shutil.which("wrk"):
        if os.environ.get("FLASHGATE_REQUIRE_TOOLS"):
            pytest.fail("wrk is missing (apt-get install wrk)")
        pytest.skip("wrk is missing (apt-get install wrk; `make bench-scale` installs it)")
    out = tmp_path / "scale.md"
    env = {**os.environ, "FLASHGATE_DATABASE_URL": scale_database}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            "--gateways",
            "1,2",
            "--masters",
            "1,2",
            "--duration-s",
            "1",
            "--reps",
            "1",
            "--connections",
            "8",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("bench.scale ")
    result = json.loads(last.removeprefix("bench.scale "))
    cells = {(c["gateways"], c["masters"]): c for c in result["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for (_, m), c in cells.items():
        assert c["rps"] > 0 and c["errors"] == 0
        assert c["non2xx"] == 0  # every purchase answered 201: honest buyers, stock for all
        assert len(c["cores_per_master"]) == m and all(x > 0 for x in c["cores_per_master"])
        assert c["usec_per_purchase"] > 0 and c["evalsha_usec_per_call"] > 0
        assert c["vs_ping"] is not None and c["gateway_cores"] > 0
    assert set(result["ping"]) == {"1", "2"}
    report = out.read_text()
    assert "| G | M | purchases/s |" in report and "Redis cores per master" in report
    assert "evalsha" in cells[(1, 1)]["by_command"]
    assert "bench.scale --gateways 1,2 --masters 1,2" in report  # the exact command


def _run(rps: float, requests: int) -> Run:
    return Run(rps, 1.0, 2.0, requests)


def _stats(cpu_s: float, evalsha_usec: float, calls: float, other_usec: float) -> MasterStats:
    return MasterStats(
        cpu_s, {"evalsha": evalsha_usec, "incr": other_usec}, {"evalsha": calls, "incr": calls}
    )


def test_figures_per_master_and_efficiencies() -> None:
    one = Cell(
        1, 1, runs=[_run(1000, 2000)], walls=[2.0], redis=[[_stats(1.0, 100_000, 2000, 40_000)]]
    )
    two = Cell(
        1,
        2,
        runs=[_run(1500, 3000)],
        walls=[2.0],
        redis=[[_stats(0.8, 90_000, 1500, 0), _stats(0.6, 60_000, 1500, 0)]],
    )
    assert redis_figures(one) == {
        "cores_per_master": [0.5],
        "usec_per_purchase": 500.0,
        "evalsha_usec_per_call": 50.0,
        "by_command": {
            "evalsha": {"usec": 50.0, "calls": 1.0},
            "incr": {"usec": 20.0, "calls": 1.0},
        },
    }
    two_figures = redis_figures(two)
    assert two_figures["cores_per_master"] == [0.4, 0.3]
    # Redis CPU per purchase: both masters' process CPU (1.4 s) over 3,000 requests.
    assert two_figures["usec_per_purchase"] == pytest.approx(466.7)
    assert two_figures["evalsha_usec_per_call"] == 50
    s = summary({(1, 1): one, (1, 2): two}, {1: [_run(4000, 8000)]})
    rows = {(c["gateways"], c["masters"]): c for c in s["cells"]}
    assert rows[(1, 2)]["efficiency_masters"] == 0.75  # 1500 / (2 x 1000)
    assert rows[(1, 1)]["vs_ping"] == 0.25
