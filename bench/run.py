"""`make bench`: Flashgate beside its baselines, in one run on one machine.

    python -m bench.run [--reps 3] [--duration-s 10] [--connections 64] [--threads 2]
                        [--worker-orders 20000] [--out docs/PERFORMANCE.md]

HTTP (wrk, bench/purchase.lua: a new buyer, device, key and /24 per request), interleaved per
repetition against one stack (embedded servers unless FLASHGATE_*_URL are set, no workers):
  ping            GET /v1/bench/ping: the same app and server doing no work (the ceiling)
  purchase-off    POST purchase, FLASHGATE_RISK_ENABLED=0 (gateway A)
  purchase-on     POST purchase, risk engine on (gateway B, same settings otherwise)
  naive-pg        POST /v1/bench/naive/.../purchase: PostgreSQL-only design, same app (A)
  purchase-on-2p  POST purchase, risk on, gateway C: the same server with `--workers 2`
                  (two processes sharing the listening socket), vs purchase-on (one process)
  fixed-rate      bench/openloop.py: purchases at a fixed arrival rate, --fixed-rate-fraction
                  (0.7) of this repetition's purchase-on throughput, against gateway B;
                  latency from each request's due time (no coordinated omission). Where the
                  Python generator does not hold that rate, lower rates (x0.85) are tried.
CPU during each HTTP case (load generator's, gateway's process tree, machine idle) is kept to
say whether the load generator left the gateway room.
Redis (redis-benchmark): reserve.lua by EVALSHA vs INCR. Workers: orders/s from a full stream.
Every figure is the median over --reps; ratios are medians of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench import naive
from bench.parse import (
    Run,
    cpu_seconds,
    idle_fraction,
    median,
    median_ratio,
    parse_openloop,
    parse_redis_benchmark,
    parse_wrk,
)
from cli.stack import (
    GATEWAY_STOP_GRACE_S,
    gateway_argv,
    running_stack,
    spawn,
    stop_children,
    wait_healthy,
)
from core.embedded import free_port
from core.ids import new_order_id
from core.keys import Keys
from core.runtime import Runtime
from core.scripts import source
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).with_name("purchase.lua")
HTTP_CASES = ("ping", "purchase-off", "purchase-on", "naive-pg", "purchase-on-2p",
              "fixed-rate")
FIXED_RATE_TRIES = 3  # the target, then x0.85 twice, when the generator does not hold it
STOCK = 10_000_000
NOTES_MARKER = "<!-- notes: kept by make bench -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration-s", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fixed-rate-fraction", type=float, default=0.7,
                   help="fixed-rate run at this share of the repetition's purchase-on max")
    p.add_argument("--redis-requests", type=int, default=200_000)
    p.add_argument("--worker-orders", type=int, default=20_000)
    p.add_argument("--skip", action="append", default=[], choices=("http", "redis", "workers"))
    p.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"),
                   help="where the results go ('-' = print only)")
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be at least 3 (every figure is a median of >= 3)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "http" not in args.skip and not shutil.which("wrk"):
        print("bench: wrk not found (apt-get install wrk, or `make bench` installs it)",
              file=sys.stderr)
        return 2
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, list[Run]] = {}
    commands: dict[str, str] = {}
    detail: dict[str, Any] = {"cpu": {}, "fixed": []}
    extra = {"FLASHGATE_BENCH_ENDPOINTS": "1", "FLASHGATE_RISK_ENABLED": "0"}
    with running_stack(workers=0, extra_env=extra) as stack:
        assert stack.gateway_url is not None
        print(f"bench: stack up (gateway A {stack.gateway_url}, risk off)", flush=True)
        settings = Settings.from_env(stack.env)
        sale_id, api_key = asyncio.run(_setup(stack.gateway_url, stack.admin_token, settings))
        if "http" not in args.skip:
            port = free_port()
            risk_gw = spawn("gateway-risk", gateway_argv("127.0.0.1", port),
                            {**stack.env, "FLASHGATE_RISK_ENABLED": "1"},
                            stack.run_dir / "logs")
            port_c = free_port()
            two_gw = spawn("gateway-2p", gateway_argv("127.0.0.1", port_c) + ["--workers", "2"],
                           {**stack.env, "FLASHGATE_RISK_ENABLED": "1"},
                           stack.run_dir / "logs")
            try:
                url_b = f"http://127.0.0.1:{port}"
                url_c = f"http://127.0.0.1:{port_c}"
                wait_healthy(risk_gw, url_b)
                wait_healthy(two_gw, url_c)
                print(f"bench: gateway B {url_b} (risk on), C {url_c} (risk on, 2 processes)",
                      flush=True)
                gateways = {"A": (stack.gateway_url, stack.children[0].pid),
                            "B": (url_b, risk_gw.pid), "C": (url_c, two_gw.pid)}
                _http(args, gateways, sale_id, api_key, results, commands, detail)
            finally:
                stop_children([risk_gw, two_gw], GATEWAY_STOP_GRACE_S)
        if "redis" not in args.skip:
            _redis(args, settings, sale_id, results, commands)
        if "workers" not in args.skip:
            _workers(args, settings, results, commands)
    report = render(args, command, results, commands, detail)
    print(report)
    if args.out != "-":
        out = Path(args.out)
        # Hand-written notes below the marker survive a new run; the table above is replaced.
        old = out.read_text() if out.exists() else ""
        notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
        out.write_text(report + ("\n" + notes if notes else ""))
        print(f"bench: written to {args.out}")
    return 0


async def _setup(url: str, token: str, settings: Settings) -> tuple[str, str]:
    """A channel; one sale open now with huge stock in the Redis ledger (added directly with
    Ledger.add_stock under a made-up import id: the purchase path never reads card keys);
    the same sale's row in the naive design's own tables."""
    sale_id = "bench-" + uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as admin:
        r = await admin.post("/v1/admin/channels", json={"name": "bench"})
        r.raise_for_status()
        api_key = r.json()["api_key"]
        r = await admin.post("/v1/admin/sales", json={
            "sale_id": sale_id, "sku": "BENCH", "name": "Benchmark",
            "starts_at": (now - timedelta(seconds=5)).isoformat(),
            "ends_at": (now + timedelta(hours=2)).isoformat(),
            "per_user_limit": 100, "reservation_ttl_s": 3600})
        r.raise_for_status()
    rt = await Runtime.open(settings, run_migrations=False)
    try:
        await rt.ledger.add_stock(sale_id, 1, STOCK)
    finally:
        await rt.close()
    await naive.create_sale(settings.database_url.reveal(), sale_id, STOCK, 100, 3_600_000)
    return sale_id, api_key


def _wrk(args: argparse.Namespace, url: str, path: str, api_key: str, duration_s: int,
         script: bool) -> tuple[Run, str]:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s",
            "--latency"]
    if script:
        argv += ["-s", str(LUA)]
    argv.append(url + ("" if script else path))
    env = {**os.environ, "FG_PATH": path, "FG_API_KEY": api_key,
           "FG_RUN": uuid.uuid4().hex[:8]}
    out = subprocess.run(argv, env=env, capture_output=True, text=True,
                         timeout=duration_s + 30, check=True).stdout
    shown = " ".join(argv).replace(url, "$URL")
    if script:
        shown = f"FG_PATH={path.replace(path.split('/')[3], '$SALE')} FG_API_KEY=$KEY {shown}" \
            if path.startswith("/v1/sales") else f"FG_PATH={path} FG_API_KEY=$KEY {shown}"
    return parse_wrk(out), shown


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants (0 for what is gone)."""
    total = 0.0
    with contextlib.suppress(OSError, ValueError):
        total += cpu_seconds(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += _tree_cpu_s(int(child))
    return total


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
    into.append((gen / wall, (_tree_cpu_s(gateway_pid) - gw) / wall,
                 idle_fraction(machine, _machine_cpu())))


def _openloop(args: argparse.Namespace, url: str, path: str, api_key: str,
              rate: float) -> tuple[Run, dict[str, Any], str]:
    argv = [sys.executable, "-m", "bench.openloop", "--url", url, "--path", path,
            "--api-key", api_key, "--rate", f"{rate:.0f}", "--duration-s",
            str(args.duration_s), "--connections", str(args.connections)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                         timeout=args.duration_s + 60, check=True).stdout
    run, d = parse_openloop(out)
    shown = " ".join(["python"] + argv[1:]).replace(url, "$URL").replace(api_key, "$KEY")
    shown = shown.replace(path.split("/")[3], "$SALE").replace(
        f"--rate {rate:.0f}", f"--rate <{args.fixed_rate_fraction:g} × purchase-on of the "
        "repetition, lowered ×0.85 while the generator does not hold it>")
    return run, d, shown


def _http(args: argparse.Namespace, gateways: dict[str, tuple[str, int]], sale_id: str,
          api_key: str, results: dict[str, list[Run]], commands: dict[str, str],
          detail: dict[str, Any]) -> None:
    purchase = f"/v1/sales/{sale_id}/purchase"
    cases = {
        "ping": ("A", "/v1/bench/ping", False),
        "purchase-off": ("A", purchase, True),
        "purchase-on": ("B", purchase, True),
        "naive-pg": ("A", f"/v1/bench/naive/{sale_id}/purchase", True),
        "purchase-on-2p": ("C", purchase, True),
    }
    for gw, path, script in cases.values():  # warm-up: caches, pools, JIT of wrk
        _wrk(args, gateways[gw][0], path, api_key, 2, script)
    url_b, pid_b = gateways["B"]
    for rep in range(args.reps):
        for name, (gw, path, script) in cases.items():
            url, pid = gateways[gw]
            with _cpu_watch(pid, detail["cpu"].setdefault(name, [])):
                run, shown = _wrk(args, url, path, api_key, args.duration_s, script)
            results.setdefault(name, []).append(run)
            commands[name] = shown
            _show(rep, name, run)
        peak = results["purchase-on"][-1].rps
        rate = args.fixed_rate_fraction * peak
        for _ in range(FIXED_RATE_TRIES):
            cpu: list[tuple[float, float, float]] = []
            with _cpu_watch(pid_b, cpu):
                run, d, shown = _openloop(args, url_b, purchase, api_key, rate)
            print(f"bench: rep {rep + 1} fixed-rate target {rate:,.0f} req/s "
                  f"({rate / peak:.2f} of {peak:,.0f}): generator lag p99 "
                  f"{d['lag_p99_ms']:.2f} ms, held: {d['held']}", flush=True)
            if d["held"]:
                break
            rate *= 0.85
        results.setdefault("fixed-rate", []).append(run)
        detail["cpu"].setdefault("fixed-rate", []).extend(cpu)
        detail["fixed"].append({**d, "peak": peak, "fraction": d["target_rate"] / peak})
        commands["fixed-rate"] = shown
        _show(rep, "fixed-rate", run)


def _show(rep: int, name: str, run: Run) -> None:
    print(f"bench: rep {rep + 1} {name:<14} {run.rps:>9.0f} req/s  p50 "
          f"{run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  non-2xx {run.non2xx}  "
          f"errors {run.socket_errors}", flush=True)


def _redis(args: argparse.Namespace, settings: Settings, sale_id: str,
           results: dict[str, list[Run]], commands: dict[str, str]) -> None:
    tool = shutil.which("redis-benchmark")
    if tool is None:
        print("bench: no redis-benchmark; Redis rows skipped", file=sys.stderr)
        return
    import redis as redis_sync

    client = redis_sync.Redis.from_url(settings.redis_url)
    sha = client.script_load(source("reserve"))
    host, port = client.connection_pool.connection_kwargs["host"], \
        client.connection_pool.connection_kwargs["port"]
    k = Keys(settings.key_prefix)
    before = int(client.hget(k.sale(sale_id), "available") or 0)
    now = str(int(time.time() * 1000))
    sample = new_order_id(sale_id)  # a real order key, its ULID made random per call
    order_key = k.order(sample).replace(sample.rpartition(".")[2], "__rand_int__")
    reserve = ["EVALSHA", sha, "6", k.sale(sale_id), k.buyers(sale_id), k.idempotency(sale_id),
               k.deadlines(sale_id), k.events(sale_id), order_key,
               now, f"{sale_id}.__rand_int__", "ch:__rand_int__", "fp", "ch",
               "u__rand_int__", "1", ""]
    base = [tool, "-h", str(host), "-p", str(port), "-c", "50", "-n",
            str(args.redis_requests), "-r", "100000000", "--csv"]
    cases = {"redis-reserve": reserve, "redis-incr": ["INCR", "bench:counter"]}
    for _ in range(args.reps):
        for name, cmd in cases.items():
            out = subprocess.run(base + cmd, capture_output=True, text=True, timeout=300,
                                 check=True).stdout
            run = parse_redis_benchmark(out)
            results.setdefault(name, []).append(run)
            shown = " ".join(base[:1] + ["-p", "$PORT"] + base[5:] + [
                "EVALSHA", "<sha of lua/reserve.lua>", "6", "<the 6 keys of a sale>",
                "<ARGV with __rand_int__ user and key>"] if name == "redis-reserve"
                else base[:1] + ["-p", "$PORT"] + base[5:] + cmd)
            commands[name] = shown.replace("redis-benchmark", "redis-benchmark", 1)
            print(f"bench: {name:<13} {run.rps:>9.0f} ops/s  p50 {run.p50_ms:.3f} ms  "
                  f"p99 {run.p99_ms:.3f} ms", flush=True)
    reserved = before - int(client.hget(k.sale(sale_id), "available") or 0)
    client.close()
    print(f"bench: reserve.lua reserved {reserved} units in "
          f"{args.reps * args.redis_requests} calls (the rest: random-key replays)", flush=True)


def _workers(args: argparse.Namespace, settings: Settings, results: dict[str, list[Run]],
             commands: dict[str, str]) -> None:
    from bench.workers import one_run

    async def go() -> None:
        rt = await Runtime.open(settings, run_migrations=False)
        try:
            for _ in range(args.reps):
                rate, delivered = await one_run(rt, args.worker_orders)
                results.setdefault("workers", []).append(Run(rate, 0, 0, delivered))
                print(f"bench: workers {rate:>9.0f} orders/s ({delivered} delivered)",
                      flush=True)
        finally:
            await rt.close()

    asyncio.run(go())
    commands["workers"] = (f"bench/workers.py: {args.worker_orders} confirmed orders in one "
                           "stream, Worker.run_burst() in one process, "
                           f"{settings.worker_consumers_per_sale} consumers of the sale, "
                           f"batches of {settings.worker_batch_size}")


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
        mem = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        mem = "?"
    return (f"{os.cpu_count()} CPUs (nproc), {cpu}, {mem} RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def _fmt(runs: list[Run], unit: str) -> tuple[str, str, str]:
    rps = median([r.rps for r in runs])
    p50 = median([r.p50_ms for r in runs])
    p99 = median([r.p99_ms for r in runs])
    each = " · ".join(f"{r.rps:,.0f}" for r in runs)
    return f"{rps:,.0f} {unit} ({each})", f"{p50:.2f}", f"{p99:.2f}"


def render(args: argparse.Namespace, command: str, results: dict[str, list[Run]],
           commands: dict[str, str], detail: dict[str, Any] | None = None) -> str:
    detail = detail or {"cpu": {}, "fixed": []}
    labels = {
        "ping": "ceiling: trivial JSON endpoint (same app, server, settings)",
        "purchase-off": "purchase, risk off",
        "purchase-on": "purchase, risk on",
        "naive-pg": "naive design: PostgreSQL-only purchase (same app)",
        "purchase-on-2p": "purchase, risk on, 2 gateway processes (`--workers 2`)",
        "fixed-rate": "purchase, risk on, fixed arrival rate (open loop; see below)",
        "redis-reserve": "Redis: reserve.lua (EVALSHA)",
        "redis-incr": "Redis: INCR",
        "workers": "workers: orders persisted + keys allocated",
    }
    lines = [
        "# Performance", "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`{command.strip()}`).", "",
        f"**Machine:** {_machine()}. The load generator (wrk, redis-benchmark), the gateway, "
        "Redis and PostgreSQL all share these cores, so every HTTP figure is a lower bound "
        "set partly by wrk's own CPU; ratios measured in the same run are what to compare.", "",
        f"Every figure is the median of {args.reps} repetitions (each value listed in "
        "brackets); HTTP cases run interleaved within each repetition. Ratios are the median "
        "of per-repetition ratios.", "",
        "| what | throughput (median; each rep) | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|",
    ]
    for name, label in labels.items():
        runs = results.get(name)
        if not runs:
            continue
        unit = "req/s" if name in HTTP_CASES else ("ops/s" if name.startswith("redis")
                                                   else "orders/s")
        rps, p50, p99 = _fmt(runs, unit)
        if name == "fixed-rate":
            rps = rps.replace(" (", " answered (", 1)
        if name == "workers":
            p50 = p99 = "–"
        non2xx = str(sum(r.non2xx + r.socket_errors for r in runs)) if name in HTTP_CASES \
            else "–"
        lines.append(f"| {label} | {rps} | {p50} | {p99} | {non2xx} |")
    ratios = _ratios(results)
    if ratios:
        lines += ["", "| ratio (pair by pair, same repetition) | median |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in ratios]
    lines += _fixed_rate_lines(detail["fixed"])
    lines += _cpu_lines(detail["cpu"], labels)
    lines += ["", "## Commands", ""]
    lines += [f"- {labels.get(k, k)}: `{v}`" for k, v in commands.items()]
    lines += ["", "`$URL`, `$SALE`, `$KEY`, `$PORT`: the run's gateway, sale, channel key and "
              "Redis port. Purchase stock is added straight to the Redis ledger "
              f"(`Ledger.add_stock`, {STOCK:,} units, no card keys: the purchase path never "
              "reads keys); the naive design gets the same count in its own `bench_naive` "
              "schema, created by the benchmark. Purchases are reservations (no payment ref), "
              "so nothing is confirmed or delivered during the HTTP runs and no workers run."]
    return "\n".join(lines) + "\n"


def _fixed_rate_lines(fixed: list[dict[str, Any]]) -> list[str]:
    """Per repetition: the rate asked for, the share of that repetition's max it is, whether
    the generator held it, and where the latency went."""
    if not fixed:
        return []
    lines = ["", "Fixed-rate runs (bench/openloop.py, one per repetition; latency counted from "
             "each request's due time; `lag` is the generator's own lateness in handing a "
             "request over, `service` the time from writing it to its answer):", "",
             "| rep | rate asked | of max (purchase, risk on) | answered/s | p50 ms | p99 ms "
             "| service p99 ms | lag p99 ms | generator held the rate | non-2xx + errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, d in enumerate(fixed, 1):
        lines.append(
            f"| {i} | {d['target_rate']:,.0f} req/s | {d['fraction']:.2f} of "
            f"{d['peak']:,.0f} | {d['achieved_rate']:,.0f} | {d['p50_ms']:.2f} | "
            f"{d['p99_ms']:.2f} | {d['service_p99_ms']:.2f} | {d['lag_p99_ms']:.2f} | "
            f"{'yes' if d['held'] else 'no'} | {d['non2xx'] + d['errors']} |")
    return lines


def _cpu_lines(cpu: dict[str, list[tuple[float, float, float]]],
               labels: dict[str, str]) -> list[str]:
    """Median CPU over each HTTP case's repetitions: does the load generator leave room?"""
    if not cpu:
        return []
    lines = ["", "CPU during the HTTP cases (median over repetitions; cores = CPU-seconds per "
             f"second of wall time, of the {os.cpu_count()} the machine has):", "",
             "| case | load generator (wrk / openloop) cores | gateway cores (all its "
             "processes) | everything else (Redis, PostgreSQL, the other gateways, bench) "
             "cores | machine idle |", "|---|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for name, samples in cpu.items():
        if not samples:
            continue
        gen = median([x[0] for x in samples])
        gw = median([x[1] for x in samples])
        idle = median([x[2] for x in samples])
        rest = max(0.0, cores * (1 - idle) - gen - gw)
        lines.append(f"| {labels.get(name, name)} | {gen:.2f} | {gw:.2f} | {rest:.2f} | "
                     f"{idle:.0%} |")
    return lines


def _ratios(results: dict[str, list[Run]]) -> list[tuple[str, str]]:
    def rps(name: str) -> list[float]:
        return [r.rps for r in results.get(name, [])]

    def p99(name: str) -> list[float]:
        return [r.p99_ms for r in results.get(name, [])]

    out: list[tuple[str, str]] = []
    pairs: list[tuple[str, str, str, Any]] = [
        ("purchase (risk on) / trivial endpoint", "purchase-on", "ping", rps),
        ("purchase (risk off) / trivial endpoint", "purchase-off", "ping", rps),
        ("purchase risk on / risk off", "purchase-on", "purchase-off", rps),
        ("purchase (risk on) / naive PostgreSQL design", "purchase-on", "naive-pg", rps),
        ("purchase (risk off) / naive PostgreSQL design", "purchase-off", "naive-pg", rps),
        ("p99: purchase (risk on) / naive PostgreSQL design", "purchase-on", "naive-pg", p99),
        ("Redis: reserve.lua / INCR", "redis-reserve", "redis-incr", rps),
        ("purchase (risk on): 2 gateway processes / 1", "purchase-on-2p", "purchase-on", rps),
        ("p99: purchase (risk on), 2 gateway processes / 1", "purchase-on-2p", "purchase-on",
         p99),
        ("fixed-rate answered / max purchase (risk on)", "fixed-rate", "purchase-on", rps),
    ]
    for label, a, b, get in pairs:
        if results.get(a) and results.get(b):
            out.append((label, f"{median_ratio(get(a), get(b)):.2f}×"))
    return out


if __name__ == "__main__":
    sys.exit(main())
