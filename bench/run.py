"""`make bench`: Flashgate beside its baselines, in one run on one machine.

    python -m bench.run [--reps 3] [--duration-s 10] [--connections 64] [--threads 2]
                        [--worker-orders 20000] [--granian-options "--http 1 ..."]
                        [--out docs/PERFORMANCE.md]

HTTP (wrk, bench/purchase.lua: a new buyer, device, key and /24 per request), interleaved per
repetition against one stack (embedded servers unless FLASHGATE_*_URL are set, no workers):
  ping            GET /v1/bench/ping: the same app and server doing no work (the ceiling)
  ping-granian    the same on gateway G: B's app and settings under granian, not uvicorn
  purchase-off    POST purchase, FLASHGATE_RISK_ENABLED=0 (gateway A)
  purchase-on     POST purchase, risk engine on (gateway B, same settings otherwise)
  purchase-on-granian  the same on gateway G (granian, bench/granian.py)
  naive-pg        POST /v1/bench/naive/.../purchase: PostgreSQL-only design, same app (A), on
                  the stack's PostgreSQL (fsync and synchronous_commit off)
  naive-pg-durable  the same on gateway D: A's settings but FLASHGATE_DATABASE_URL on a second
                  private PostgreSQL with production durability (bench/durable.py)
  purchase-on-2p  POST purchase, risk on, gateway C: the same server with `--workers 2`
                  (two processes sharing the listening socket), vs purchase-on (one process)
  fixed-rate      bench/openloop.py: purchases at a fixed arrival rate, --fixed-rate-fraction
                  (0.7) of this repetition's purchase-on throughput, against gateway B;
                  latency from each request's due time (no coordinated omission). Where the
                  Python generator does not hold that rate, lower rates (x0.85) are tried.
CPU during each HTTP case (load generator's, gateway's process tree, machine idle) is kept to
say whether the load generator left the gateway room. Before the HTTP cases, the machine's
flush latency (pg_test_fsync, an fdatasync loop) on the PostgreSQL servers' filesystem.
Redis (redis-benchmark): reserve.lua by EVALSHA vs INCR. Workers: orders/s from a full stream.
Every figure is the median over --reps; ratios are medians of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench import durable, granian, naive, replica
from bench.cpu import tree_cpu_s
from bench.parse import (
    Run,
    idle_fraction,
    parse_openloop,
    parse_redis_benchmark,
    parse_wrk,
)
from bench.report import STOCK, render
from bench.sale import open_sale
from cli.stack import (
    GATEWAY_STOP_GRACE_S,
    Child,
    Stack,
    gateway_argv,
    running_stack,
    spawn,
    stop_children,
    wait_healthy,
)
from core.embedded import EmbeddedPostgres, free_port
from core.ids import new_order_id
from core.keys import Keys
from core.runtime import Runtime
from core.scripts import source
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).with_name("purchase.lua")
FIXED_RATE_TRIES = 3  # the target, then x0.85 twice, when the generator does not hold it
NOTES_MARKER = "<!-- notes: kept by make bench -->"
HOST = "127.0.0.1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration-s", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--fixed-rate-fraction",
        type=float,
        default=0.7,
        help="fixed-rate run at this share of the repetition's purchase-on max",
    )
    p.add_argument(
        "--granian-options",
        default=shlex.join(granian.OPTIONS),
        help="gateway G's granian options besides the fixed ones (ASGI, factory, "
        "host, port, 1 worker, uvloop, no access log); default: %(default)s",
    )
    p.add_argument("--redis-requests", type=int, default=200_000)
    p.add_argument("--worker-orders", type=int, default=20_000)
    p.add_argument("--skip", action="append", default=[], choices=("http", "redis", "workers"))
    p.add_argument(
        "--out",
        default=str(ROOT / "docs" / "PERFORMANCE.md"),
        help="where the results go ('-' = print only)",
    )
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be at least 3 (every figure is a median of >= 3)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "http" not in args.skip and not shutil.which("wrk"):
        print(
            "bench: wrk not found (apt-get install wrk, or `make bench` installs it)",
            file=sys.stderr,
        )
        return 2
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, list[Run]] = {}
    commands: dict[str, str] = {}
    detail: dict[str, Any] = {"cpu": {}, "fixed": [], "durable": {}}
    extra = {"FLASHGATE_BENCH_ENDPOINTS": "1", "FLASHGATE_RISK_ENABLED": "0"}
    with running_stack(workers=0, extra_env=extra) as stack:
        assert stack.gateway_url is not None
        print(f"bench: stack up (gateway A {stack.gateway_url}, risk off)", flush=True)
        settings = Settings.from_env(stack.env)
        sale_id, api_key = asyncio.run(_setup(stack.gateway_url, stack.admin_token, settings))
        if "http" not in args.skip:
            with _gateways(args, stack, sale_id, detail) as gateways:
                _http(args, gateways, sale_id, api_key, results, commands, detail)
        if "redis" not in args.skip:
            _redis(args, settings, sale_id, results, commands)
        if "workers" not in args.skip:
            if "http" not in args.skip:
                asyncio.run(_quiesce(settings, sale_id))
            _workers(args, settings, results, commands)
    report = render(args, command, results, commands, detail) + replica.section(args.reps)
    print(report)
    if args.out != "-":
        out = Path(args.out)
        # Hand-written notes below the marker survive a new run; the table above is replaced.
        old = out.read_text() if out.exists() else ""
        notes = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
        out.write_text(report + ("\n" + notes if notes else ""))
        print(f"bench: written to {args.out}")
    return 0


def _shown(argv: list[str], port: int) -> str:
    return shlex.join(["python", *argv[1:]]).replace(str(port), "$PORT")


@contextlib.contextmanager
def _gateways(
    args: argparse.Namespace, stack: Stack, sale_id: str, detail: dict[str, Any]
) -> Iterator[dict[str, tuple[str, int]]]:
    """{name: (url, pid)} of every gateway the HTTP cases use. A is the stack's (uvicorn, risk
    off); B: risk on; C: risk on, 2 processes; G: B under granian; D: A on the durable
    PostgreSQL. Stopped by PID on exit, then the durable PostgreSQL."""
    assert stack.gateway_url is not None
    risk_on = {**stack.env, "FLASHGATE_RISK_ENABLED": "1"}
    ports = {name: free_port() for name in "BCGD"}
    specs: dict[str, tuple[list[str], dict[str, str]]] = {
        "B": (gateway_argv(HOST, ports["B"]), risk_on),
        "C": (gateway_argv(HOST, ports["C"]) + ["--workers", "2"], risk_on),
        "G": (
            granian.granian_argv(HOST, ports["G"], tuple(shlex.split(args.granian_options))),
            risk_on,
        ),
    }
    with contextlib.ExitStack() as cleanup:
        pg = _durable_db(stack, sale_id, detail, cleanup)
        if pg is not None:
            specs["D"] = (
                gateway_argv(HOST, ports["D"]),
                {**stack.env, "FLASHGATE_DATABASE_URL": pg.url},
            )
            # Runs after gateway D stopped (its backends flush their statistics on exit) and
            # before the durable PostgreSQL stops.
            cleanup.callback(_count_wal_syncs, pg.url, detail["durable"])
        children: dict[str, Child] = {}
        cleanup.callback(lambda: stop_children(list(children.values()), GATEWAY_STOP_GRACE_S))
        for name, (argv, env) in specs.items():
            children[name] = spawn(f"gateway-{name}", argv, env, stack.run_dir / "logs")
        gateways = {"A": (stack.gateway_url, stack.children[0].pid)}
        for name, child in children.items():
            url = f"http://{HOST}:{ports[name]}"
            wait_healthy(child, url)
            gateways[name] = (url, child.pid)
        print(
            "bench: gateways "
            + ", ".join(f"{k} {v[0]}" for k, v in gateways.items())
            + " (B, C, G risk on; G granian; D durable PostgreSQL)",
            flush=True,
        )
        detail["servers"] = {
            "gateways A and D (uvicorn, risk off; D's FLASHGATE_DATABASE_URL the durable "
            "PostgreSQL), B (risk on)": _shown(specs["B"][0], ports["B"]),
            "gateway C (uvicorn, risk on, 2 processes)": _shown(specs["C"][0], ports["C"]),
            "gateway G (granian, risk on)": _shown(specs["G"][0], ports["G"]),
        }
        if pg is not None:
            detail["servers"]["durable PostgreSQL (the stack's has `off` for each)"] = shlex.join(
                pg.durability_flags()
            )
        yield gateways


def _durable_db(
    stack: Stack, sale_id: str, detail: dict[str, Any], cleanup: contextlib.ExitStack
) -> EmbeddedPostgres | None:
    """The durable PostgreSQL, with the naive sale in it, and the flush-latency probes (run
    now, while no load runs); None, and naive-pg-durable skipped, if it cannot start."""
    try:
        pg = cleanup.enter_context(durable.durable_postgres(stack.run_dir))
    except RuntimeError as e:
        print(f"bench: no durable PostgreSQL, naive-pg-durable skipped: {e}", file=sys.stderr)
        return None
    asyncio.run(naive.create_sale(pg.url, sale_id, STOCK, 100, 3_600_000))
    d = detail["durable"]
    d["url"] = pg.url
    d["settings"] = asyncio.run(durable.server_settings(pg.url))
    print(
        f"bench: durable PostgreSQL on port {pg.port} ({d['settings']}); measuring flush "
        "latency (pg_test_fsync ~16 s, fdatasync loop 2 s)",
        flush=True,
    )
    d["probe"] = durable.fsync_probe(pg.dir)
    d["pg_test_fsync"] = durable.pg_test_fsync(pg.dir)
    print(f"bench: fdatasync {d['probe']}; pg_test_fsync {d['pg_test_fsync']}", flush=True)
    return pg


def _count_wal_syncs(database_url: str, d: dict[str, Any]) -> None:
    """WAL flushes per naive durable purchase, over every timed repetition: pg_stat_wal is
    read once before the first and once after gateway D is gone, since backends publish
    their counts up to seconds late while they live."""
    if d.get("purchases") and "wal_syncs_at_start" in d:
        syncs = asyncio.run(durable.wal_syncs(database_url)) - d["wal_syncs_at_start"]
        d["wal_syncs"] = syncs
        d["wal_syncs_per_purchase"] = syncs / d["purchases"]


async def _setup(url: str, token: str, settings: Settings) -> tuple[str, str]:
    """A channel; one sale open now with huge stock in the Redis ledger (added directly with
    Ledger.add_stock under a made-up import id: the purchase path never reads card keys);
    the same sale's row in the naive design's own tables."""
    sale_id = "bench-" + uuid.uuid4().hex[:8]
    api_key = await open_sale(
        url, token, settings, sale_id, STOCK, channel="bench", sku="BENCH", name="Benchmark"
    )
    await naive.create_sale(settings.database_url.reveal(), sale_id, STOCK, 100, 3_600_000)
    return sale_id, api_key


def _wrk(
    args: argparse.Namespace, url: str, path: str, api_key: str, duration_s: int, script: bool
) -> tuple[Run, str]:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s", "--latency"]
    if script:
        argv += ["-s", str(LUA)]
    argv.append(url + ("" if script else path))
    env = {**os.environ, "FG_PATH": path, "FG_API_KEY": api_key, "FG_RUN": uuid.uuid4().hex[:8]}
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=duration_s + 30, check=True
    ).stdout
    shown = " ".join(argv).replace(url, "$URL")
    if script:
        shown = f"FG_PATH={path} FG_API_KEY=$KEY {shown}"
    return parse_wrk(out), shown


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants, exited ones included
    (bench/cpu.py); 0 for what is gone."""
    return tree_cpu_s(pid) or 0.0


def _machine_cpu() -> str:
    return Path("/proc/stat").read_text().splitlines()[0]


@contextlib.contextmanager
def _cpu_watch(gateway_pid: int, into: list[tuple[float, float, float]]) -> Any:
    """Append (load generator cores, gateway cores, machine idle share) over the block. The
    load generator is the child process run (and reaped) inside the block."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    gw, machine, t0 = _tree_cpu_s(gateway_pid), _machine_cpu(), time.monotonic()
    yield
    wall = time.monotonic() - t0
    kids2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen = (kids2.ru_utime + kids2.ru_stime) - (kids.ru_utime + kids.ru_stime)
    into.append(
        (gen / wall, (_tree_cpu_s(gateway_pid) - gw) / wall, idle_fraction(machine, _machine_cpu()))
    )


def _openloop(
    args: argparse.Namespace, url: str, path: str, api_key: str, rate: float
) -> tuple[Run, dict[str, Any], str]:
    argv = [
        sys.executable,
        "-m",
        "bench.openloop",
        "--url",
        url,
        "--path",
        path,
        "--api-key",
        api_key,
        "--rate",
        f"{rate:.0f}",
        "--duration-s",
        str(args.duration_s),
        "--connections",
        str(args.connections),
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, timeout=args.duration_s + 60, check=True
    ).stdout
    run, d = parse_openloop(out)
    shown = " ".join(["python"] + argv[1:]).replace(url, "$URL").replace(api_key, "$KEY")
    shown = shown.replace(path.split("/")[3], "$SALE").replace(
        f"--rate {rate:.0f}",
        f"--rate <{args.fixed_rate_fraction:g} × purchase-on of the "
        "repetition, lowered ×0.85 while the generator does not hold it>",
    )
    return run, d, shown


def _http(
    args: argparse.Namespace,
    gateways: dict[str, tuple[str, int]],
    sale_id: str,
    api_key: str,
    results: dict[str, list[Run]],
    commands: dict[str, str],
    detail: dict[str, Any],
) -> None:
    purchase = f"/v1/sales/{sale_id}/purchase"
    naive_path = f"/v1/bench/naive/{sale_id}/purchase"
    every = {
        "ping": ("A", "/v1/bench/ping", False),
        "ping-granian": ("G", "/v1/bench/ping", False),
        "purchase-off": ("A", purchase, True),
        "purchase-on": ("B", purchase, True),
        "purchase-on-granian": ("G", purchase, True),
        "naive-pg": ("A", naive_path, True),
        "naive-pg-durable": ("D", naive_path, True),
        "purchase-on-2p": ("C", purchase, True),
    }
    cases = {name: case for name, case in every.items() if case[0] in gateways}
    durable_url = detail["durable"].get("url")
    for gw, path, script in cases.values():  # warm-up: caches, pools, JIT of wrk
        _wrk(args, gateways[gw][0], path, api_key, 2, script)
    url_b, pid_b = gateways["B"]
    for rep in range(args.reps):
        for name, (gw, path, script) in cases.items():
            url, pid = gateways[gw]
            if name == "naive-pg-durable" and rep == 0:
                detail["durable"]["wal_syncs_at_start"] = asyncio.run(
                    durable.wal_syncs(durable_url)
                )
            with _cpu_watch(pid, detail["cpu"].setdefault(name, [])):
                run, shown = _wrk(args, url, path, api_key, args.duration_s, script)
            if name == "naive-pg-durable":
                detail["durable"]["purchases"] = (
                    detail["durable"].get("purchases", 0) + run.requests
                )
            results.setdefault(name, []).append(run)
            commands[name] = shown.replace(sale_id, "$SALE")
            _show(rep, name, run)
        peak = results["purchase-on"][-1].rps
        rate = args.fixed_rate_fraction * peak
        for _ in range(FIXED_RATE_TRIES):
            cpu: list[tuple[float, float, float]] = []
            with _cpu_watch(pid_b, cpu):
                run, d, shown = _openloop(args, url_b, purchase, api_key, rate)
            print(
                f"bench: rep {rep + 1} fixed-rate target {rate:,.0f} req/s "
                f"({rate / peak:.2f} of {peak:,.0f}): generator lag p99 "
                f"{d['lag_p99_ms']:.2f} ms, held: {d['held']}",
                flush=True,
            )
            if d["held"]:
                break
            rate *= 0.85
        results.setdefault("fixed-rate", []).append(run)
        detail["cpu"].setdefault("fixed-rate", []).extend(cpu)
        detail["fixed"].append({**d, "peak": peak, "fraction": d["target_rate"] / peak})
        commands["fixed-rate"] = shown
        _show(rep, "fixed-rate", run)


def _show(rep: int, name: str, run: Run) -> None:
    print(
        f"bench: rep {rep + 1} {name:<19} {run.rps:>9.0f} req/s  p50 "
        f"{run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  non-2xx {run.non2xx}  "
        f"errors {run.socket_errors}",
        flush=True,
    )


def _redis(
    args: argparse.Namespace,
    settings: Settings,
    sale_id: str,
    results: dict[str, list[Run]],
    commands: dict[str, str],
) -> None:
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("bench: no redis-benchmark; Redis rows skipped", file=sys.stderr)
        return
    import redis as redis_sync

    client = redis_sync.Redis.from_url(settings.redis_url)
    sha = client.script_load(source("reserve"))
    host, port = (
        client.connection_pool.connection_kwargs["host"],
        client.connection_pool.connection_kwargs["port"],
    )
    k = Keys(settings.key_prefix)
    before = int(client.hget(k.sale(sale_id), "available") or 0)
    now = str(int(time.time() * 1000))
    sample = new_order_id(sale_id)  # a real order key, its ULID made random per call
    order_key = k.order(sample).replace(sample.rpartition(".")[2], "__rand_int__")
    reserve = [
        "EVALSHA",
        sha,
        "6",
        k.sale(sale_id),
        k.buyers(sale_id),
        k.idempotency(sale_id),
        k.deadlines(sale_id),
        k.events(sale_id),
        order_key,
        now,
        f"{sale_id}.__rand_int__",
        "ch:__rand_int__",
        "fp",
        "ch",
        "u__rand_int__",
        "1",
        "",
    ]
    base = [
        tool,
        "-h",
        str(host),
        "-p",
        str(port),
        "-c",
        "50",
        "-n",
        str(args.redis_requests),
        "-r",
        "100000000",
        "--csv",
    ]
    cases = {"redis-reserve": reserve, "redis-incr": ["INCR", "bench:counter"]}
    for _ in range(args.reps):
        for name, cmd in cases.items():
            out = subprocess.run(
                base + cmd, capture_output=True, text=True, timeout=300, check=True
            ).stdout
            run = parse_redis_benchmark(out)
            results.setdefault(name, []).append(run)
            shown = " ".join(
                base[:1]
                + ["-p", "$PORT"]
                + base[5:]
                + [
                    "EVALSHA",
                    "<sha of lua/reserve.lua>",
                    "6",
                    "<the 6 keys of a sale>",
                    "<ARGV with __rand_int__ user and key>",
                ]
                if name == "redis-reserve"
                else base[:1] + ["-p", "$PORT"] + base[5:] + cmd
            )
            commands[name] = shown.replace("redis-benchmark", "redis-benchmark", 1)
            print(
                f"bench: {name:<13} {run.rps:>9.0f} ops/s  p50 {run.p50_ms:.3f} ms  "
                f"p99 {run.p99_ms:.3f} ms",
                flush=True,
            )
    reserved = before - int(client.hget(k.sale(sale_id), "available") or 0)
    client.close()
    print(
        f"bench: reserve.lua reserved {reserved} units in "
        f"{args.reps * args.redis_requests} calls (the rest: random-key replays)",
        flush=True,
    )


async def _quiesce(settings: Settings, sale_id: str) -> None:
    """Between the HTTP cases and the workers', untimed: what the HTTP cases left would
    otherwise be cleaned up inside the workers' timing.
    - PostgreSQL: the naive design's ~10^5 dead row versions and a WAL's worth of dirty pages
      (VACUUM, CHECKPOINT).
    - Redis: the HTTP sale's ~3 x 10^6 keys (risk counters, HyperLogLogs, orders). Measured in
      one full run: 103,133 of them expired during the workers' 7.4 s, and Redis used 0.41
      cores there against 0.26 in a run without them; the workers ran 0.80x of their rate
      alone. The sale is done with (the workers' case makes sales of its own), so its keys are
      unlinked here (the bench's own sale only: never a flush)."""
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(
            match=Keys(settings.key_prefix).sale_pattern(sale_id), count=10_000
        ):
            batch.append(key)
            if len(batch) >= 5_000:
                await redis.unlink(*batch)
                batch.clear()
        if batch:
            await redis.unlink(*batch)
    finally:
        await redis.aclose()


def _workers(
    args: argparse.Namespace,
    settings: Settings,
    results: dict[str, list[Run]],
    commands: dict[str, str],
) -> None:
    from bench.workers import one_run

    async def go() -> None:
        rt = await Runtime.open(settings, run_migrations=False)
        try:
            for _ in range(args.reps):
                rate, delivered = await one_run(rt, args.worker_orders)
                results.setdefault("workers", []).append(Run(rate, 0, 0, delivered))
                print(f"bench: workers {rate:>9.0f} orders/s ({delivered} delivered)", flush=True)
        finally:
            await rt.close()

    asyncio.run(go())
    commands["workers"] = (
        f"bench/workers.py: {args.worker_orders} confirmed orders in one "
        "stream, Worker.run_burst() in one process, "
        f"{settings.worker_consumers_per_sale} consumers of the sale, "
        f"batches of {settings.worker_batch_size}"
    )


if __name__ == "__main__":
    sys.exit(main())
