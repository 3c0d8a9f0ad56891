"""The cost of "an acknowledged purchase is on a replica" (#12, item 1), in one run.

    python -m bench.replica [--reps 3] [--seconds 3] [--concurrency 100]

One embedded primary with one replica, and one primary alone (same binary, same machine).
Reservations (lua/reserve.lua through core.ledger.Ledger.reserve, as the gateway's hot path
runs them, auto-pipelined) by `concurrency` concurrent callers in one process, for `seconds`:
  alone         the primary without a replica (auto: no WAIT)
  replica-wait  the primary with its replica, auto WAIT (one WAIT 1 per flushed buffer)
  replica-nowait  the same pair, FLASHGATE_REDIS_WAIT_REPLICAS=0 (the replication itself,
                without waiting for it)
Interleaved per repetition; reservations/s and p50/p99 latency per case, medians over reps.
No gateway, no HTTP: this isolates the Redis round trip the WAIT adds (the HTTP cases of
`make bench` measure the whole purchase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from core.autopipeline import AutoPipeline
from core.embedded import EmbeddedRedis
from core.keys import Keys
from core.ledger import Ledger, PurchaseRequest, now_ms


async def _online(url: str) -> None:
    primary = Redis.from_url(url, decode_responses=True)
    try:
        for _ in range(300):
            replica = (await primary.info("replication")).get("slave0") or {}
            if isinstance(replica, dict) and replica.get("state") == "online":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("replica never came online")
    finally:
        await primary.aclose()


async def _case(
    url: str,
    wait: int | None,
    seconds: float,
    concurrency: int,
) -> dict[str, Any]:
    redis = Redis.from_url(url, decode_responses=True)
    pipe = AutoPipeline.from_url(url, timeout_s=2.0, connections=2, wait_replicas=wait)
    ledger = Ledger(redis, Keys("fgbr" + uuid.uuid4().hex[:6]), pipe)
    sale = "bench-" + uuid.uuid4().hex[:8]
    now = now_ms()
    try:
        await ledger.scripts.load(redis)
        await pipe.warm_up()
        await ledger.init_sale(sale, now - 1000, now + 3_600_000, 1_000_000, 300_000)
        await ledger.add_stock(sale, 1, 10_000_000)
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def caller(n: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                req = PurchaseRequest(sale, "ch", f"{n}-{i}", "fp", f"u{n}", 1, "")
                started = time.perf_counter()
                await ledger.reserve(req)
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        took = time.monotonic() - started
        latencies.sort()
        return {
            "per_s": len(latencies) / took,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "wait": bool(pipe.connections and pipe.connections[0].wait_replicas),
        }
    finally:
        await pipe.aclose()
        async for key in redis.scan_iter(match=f"{ledger.keys.prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()


async def run(reps: int, seconds: float, concurrency: int) -> dict[str, dict[str, float]]:
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-bench-replica-"))
    alone = EmbeddedRedis(run_dir, name="alone")
    primary = EmbeddedRedis(run_dir, name="primary")
    alone.start()
    primary.start()
    replica = EmbeddedRedis(run_dir, name="replica", replica_of=primary.port)
    replica.start()
    results: dict[str, list[dict[str, Any]]] = {
        "alone": [],
        "replica-wait": [],
        "replica-nowait": [],
    }
    try:
        await _online(primary.url)
        for _ in range(reps):
            results["alone"].append(await _case(alone.url, None, seconds, concurrency))
            results["replica-wait"].append(await _case(primary.url, None, seconds, concurrency))
            results["replica-nowait"].append(await _case(primary.url, 0, seconds, concurrency))
    finally:
        replica.stop()
        primary.stop()
        alone.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert all(r["wait"] for r in results["replica-wait"])
    assert not any(r["wait"] for r in (*results["alone"], *results["replica-nowait"]))
    return {
        case: {
            k: round(statistics.median(r[k] for r in rows), 2)
            for k in ("per_s", "p50_ms", "p99_ms")
        }
        for case, rows in results.items()
    }


def section(reps: int, seconds: float = 3.0, concurrency: int = 100) -> str:
    """The markdown section `make bench` appends to its report (bench/run.py)."""
    figures = asyncio.run(run(reps, seconds, concurrency))
    lines = [
        "",
        "## Replica WAIT (bench/replica.py)",
        "",
        f"Reservations through the auto-pipeline, {concurrency} concurrent callers, "
        f"{seconds:g} s per case, median of {reps}; same machine, same run.",
        "",
        "| case | reservations/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for case, f in figures.items():
        lines.append(f"| {case} | {f['per_s']:.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=100)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.reps, args.seconds, args.concurrency)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
