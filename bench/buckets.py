"""Stock buckets: reserve.lua throughput of one hot sale on one master vs over 3 masters.

    .venv/bin/python -m bench.buckets [--requests 60000] [--reps 3] [--clients 50]

Starts a private 3-master cluster (core.embedded.EmbeddedRedisCluster) and drives reserve.lua
by EVALSHA with redis-benchmark, always three redis-benchmark processes of `--clients`
connections each (the same load generator in every case, only the layout differs):
- `old-1-bucket`: the reserve.lua of before stock buckets (git `d300041`), one sale on one
  master: all three processes on that master;
- `1-bucket`: today's reserve.lua, same layout (what buckets cost a sale that doesn't use them);
- `3-buckets`: one sale of 3 buckets, one bucket per master, one process per bucket.
Random users and Idempotency-Keys (`__rand_int__`), stock never runs out; the cases take turns
going first. Prints one line per run and a JSON summary (medians, and the median of the
per-repetition ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_sync

from bench.parse import median, median_ratio, parse_redis_benchmark
from core.embedded import EmbeddedRedisCluster
from core.ids import new_order_id, shard_id
from core.keys import Keys
from core.scripts import source

OLD_COMMIT = "d300041"  # main before stock buckets


def old_reserve_source() -> str:
    root = Path(__file__).resolve().parents[1]

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), "show", f"{OLD_COMMIT}:{path}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    return show("lua/reserve.lua").replace(
        "--!include reserve_order", show("lua/includes/reserve_order.lua")
    )


def slot_ports(client: redis_sync.Redis) -> dict[int, int]:
    owner: dict[int, int] = {}
    slots: Any = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    for lo, hi, master, *_ in slots:
        owner.update(dict.fromkeys(range(int(lo), int(hi) + 1), int(master[1])))
    return owner


def reserve_command(keys: Keys, sha: str, sale_id: str, bucket: int, buckets: int) -> list[str]:
    shard = shard_id(sale_id, bucket)
    sample = new_order_id(sale_id, bucket=bucket)
    order_key = keys.order(sample).replace(sample.rpartition(".")[2], "__rand_int__")
    return [
        "EVALSHA",
        sha,
        "6",
        keys.sale(shard),
        keys.buyers(shard),
        keys.idempotency(shard),
        keys.deadlines(shard),
        keys.events(shard),
        order_key,
        str(int(time.time() * 1000)),
        sample.replace(sample.rpartition(".")[2], "__rand_int__"),
        "ch:__rand_int__",
        "fp",
        "ch",
        "u__rand_int__",
        "1",
        "",
        str(buckets),
    ]


def run_parallel(
    tool: str, targets: list[tuple[int, list[str]]], clients: int, requests: int
) -> float:
    """One redis-benchmark per target (port, command), all at once; returns the summed ops/s."""
    procs = [
        subprocess.Popen(
            [
                tool,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-c",
                str(clients),
                "-n",
                str(requests),
                "-r",
                "100000000",
                "--csv",
                *cmd,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for port, cmd in targets
    ]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark exited {proc.returncode}")
        total += parse_redis_benchmark(out).rps
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=60_000, help="per redis-benchmark process")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=50, help="connections per process")
    args = p.parse_args(argv)
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("bench.buckets: no redis-benchmark on PATH", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-bench-buckets-"))
    cluster = EmbeddedRedisCluster(run_dir)
    cluster.start()
    try:
        seed = redis_sync.Redis(port=cluster.ports[0], decode_responses=True)
        owner = slot_ports(seed)
        nodes = {port: redis_sync.Redis(port=port, decode_responses=True) for port in cluster.ports}
        keys = Keys("fgbench")
        new_sha = old_sha = ""
        for node in nodes.values():
            new_sha = node.script_load(source("reserve"))
            old_sha = node.script_load(old_reserve_source())

        def slot_of(key: str) -> int:
            return int(seed.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]

        def make_sale(buckets: int) -> tuple[str, list[int]]:
            """A sale whose buckets are on distinct masters; returns (id, port per bucket)."""
            while True:
                sale_id = "bench-" + uuid.uuid4().hex[:10]
                ports = [owner[slot_of(keys.sale(shard_id(sale_id, b)))] for b in range(buckets)]
                if len(set(ports)) == buckets:
                    break
            now = int(time.time() * 1000)
            for b, port in enumerate(ports):
                fields: dict[Any, Any] = {
                    "start": now - 1000,
                    "end": now + 86_400_000,
                    "limit": 1000,
                    "ttl": 300_000,
                    "total": 10**9,
                    "available": 10**9,
                    "reserved": 0,
                    "confirmed": 0,
                    "delivered": 0,
                    "cancelled": 0,
                    "expired": 0,
                    "state": "open",
                }
                if buckets > 1:
                    fields |= {"buckets": buckets, "bucket": b, "transit": 0}
                nodes[port].hset(keys.sale(shard_id(sale_id, b)), mapping=fields)
            return sale_id, ports

        results: dict[str, list[float]] = {"old-1-bucket": [], "1-bucket": [], "3-buckets": []}
        cases = list(results)
        for rep in range(args.reps):
            for case in cases[rep % 3 :] + cases[: rep % 3]:  # each case first once in 3 reps
                for node in nodes.values():
                    node.flushall()
                n = 3 if case == "3-buckets" else 1
                sale_id, ports = make_sale(n)
                sha = old_sha if case.startswith("old") else new_sha
                if n == 1:
                    cmd = reserve_command(keys, sha, sale_id, 0, 1)
                    if case.startswith("old"):
                        cmd = cmd[:-1]  # the old script has no ARGV[9]
                    targets = [(ports[0], cmd)] * 3
                else:
                    targets = [
                        (ports[b], reserve_command(keys, sha, sale_id, b, n)) for b in range(n)
                    ]
                rps = run_parallel(tool, targets, args.clients, args.requests)
                reserved = sum(
                    int(nodes[port].hget(keys.sale(shard_id(sale_id, b)), "reserved") or 0)
                    for b, port in enumerate(ports)
                )
                results[case].append(rps)
                print(
                    f"bench.buckets: rep {rep + 1} {case:<13} {rps:>9.0f} reservations/s "
                    f"({reserved} reserved)",
                    flush=True,
                )
        summary = {
            "median_rps": {case: round(median(v)) for case, v in results.items()},
            "ratio_3_buckets_vs_1": round(
                median_ratio(results["3-buckets"], results["1-bucket"]), 2
            ),
            "ratio_1_bucket_vs_old": round(
                median_ratio(results["1-bucket"], results["old-1-bucket"]), 3
            ),
            "requests_per_process": args.requests,
            "clients_per_process": args.clients,
            "reps": args.reps,
        }
        print("bench.buckets " + json.dumps(summary), flush=True)
        for node in nodes.values():
            node.close()
        seed.close()
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
