"""`make bench-scale`: one hot sale over gateway processes 1..N x Redis masters 1..M.

    python -m bench.scale [--gateways 1,2] [--masters 1,3] [--duration-s 5] [--reps 3]
                          [--connections 64] [--threads T] [--risk on|off] [--out FILE]

For each Redis layout (bench/layouts.py: M = 1 one plain server, M >= 2 a cluster of M masters,
the sale made of M stock buckets whose ledgers sit on M distinct masters) and each gateway
process count G (uvicorn `--workers G` on one port; G = 1 a single process), against one
embedded PostgreSQL (or FLASHGATE_DATABASE_URL) and no workers:
  ping      GET /v1/bench/ping: the same gateway doing no work (measured once per G, at the
            first layout): what the processes can answer at all
  purchase  POST purchase with wrk and bench/purchase.lua (a new honest buyer per request),
            risk on unless --risk off; --connections per gateway process
Per cell and repetition: throughput, p50/p99 (wrk --latency), non-2xx; per master the Redis
server's CPU (INFO cpu: used_cpu_sys + used_cpu_user) and INFO commandstats (microseconds per
command: the Redis CPU of a purchase, and EVALSHA's usec_per_call); the gateway's CPU (its
process tree, bench/cpu.py), wrk's CPU and the machine's idle share. Derived: the ratio to
ping with the same G; scaling efficiency over gateways (rps / (G/G0 x rps at G0), same M)
and over masters (rps / (M/M0 x rps at M0), same G). Every figure is the median of --reps
(the repetitions of one cell run back to back); ratios are medians of per-repetition ratios.
Prints the Markdown report (written to --out unless '-') and a last line `bench.scale {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.cpu import tree_cpu_s
from bench.layouts import Layout, MasterStats, delta, read_stats, redis_layout
from bench.parse import Run, idle_fraction, median, parse_wrk
from bench.report import _machine
from bench.sale import open_sale
from cli.stack import (
    GATEWAY_STOP_GRACE_S,
    Child,
    gateway_argv,
    run_migrations,
    spawn,
    stack_env,
    stop_children,
    wait_healthy,
)
from core.embedded import EmbeddedPostgres, ServiceURLs, free_port
from core.ids import shard_id
from core.keys import Keys
from core.settings import Settings

HOST = "127.0.0.1"
LUA = Path(__file__).with_name("purchase.lua")
STOCK = 10**9  # never runs out: every purchase runs the whole path
PING = "/v1/bench/ping"


def _ints(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"a list of positive integers, not {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gateways", type=_ints, default=[1, 2], help="e.g. 1,2,4,8")
    p.add_argument("--masters", type=_ints, default=[1, 3], help="e.g. 1,2,3,4")
    p.add_argument("--duration-s", type=int, default=5, help="per wrk run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--connections", type=int, default=64, help="per gateway process")
    p.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="wrk threads (default: min(4, cores))",
    )
    p.add_argument("--risk", choices=("on", "off"), default="on")
    p.add_argument("--out", default="-", help="also write the report here ('-': print only)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.duration_s < 1:
        p.error("--reps and --duration-s must be at least 1")
    return args


@dataclass
class Cell:
    gateways: int
    masters: int
    runs: list[Run] = field(default_factory=list)
    redis: list[list[MasterStats]] = field(default_factory=list)  # per rep, per master
    gateway_cores: list[float] = field(default_factory=list)
    wrk_cores: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)  # seconds each purchase run took


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print(
            "bench.scale: wrk not found (apt-get install wrk, or `make bench-scale` installs it)",
            file=sys.stderr,
        )
        return 2
    command = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    run_dir = Path(tempfile.mkdtemp(prefix="flashgate-bench-scale-"))
    cells: dict[tuple[int, int], Cell] = {}
    pings: dict[int, list[Run]] = {}
    try:
        with _database(run_dir) as database_url:
            for m in args.masters:
                with redis_layout(run_dir, m) as layout:
                    _layout(args, run_dir, database_url, layout, cells, pings)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    report = render(args, command.strip(), cells, pings)
    print(report)
    if args.out != "-":
        Path(args.out).write_text(report)
        print(f"bench.scale: written to {args.out}")
    print("bench.scale " + json.dumps(summary(cells, pings)), flush=True)
    return 0


@contextlib.contextmanager
def _database(run_dir: Path) -> Iterator[str]:
    """FLASHGATE_DATABASE_URL (migrated here), or a private embedded PostgreSQL."""
    url = os.environ.get("FLASHGATE_DATABASE_URL", "")
    pg = None
    if not url:
        pg = EmbeddedPostgres(run_dir)
        url = pg.start()
    try:
        run_migrations(url)
        yield url
    finally:
        if pg is not None:
            pg.stop()


def _layout(
    args: argparse.Namespace,
    run_dir: Path,
    database_url: str,
    layout: Layout,
    cells: dict[tuple[int, int], Cell],
    pings: dict[int, list[Run]],
) -> None:
    env = stack_env(
        ServiceURLs(layout.url, database_url),
        {
            **os.environ,
            "FLASHGATE_BENCH_ENDPOINTS": "1",
            "FLASHGATE_RISK_ENABLED": "1" if args.risk == "on" else "0",
            "FLASHGATE_KEY_PREFIX": "fgs" + uuid.uuid4().hex[:6],
        },
    )
    sale: tuple[str, str] | None = None
    for g in args.gateways:
        with _gateway(run_dir, env, g) as (url, pid):
            if sale is None:
                sale = asyncio.run(_setup(url, env, layout))
                print(
                    f"bench.scale: {layout.masters} master(s) {layout.url}, sale {sale[0]}",
                    flush=True,
                )
            sale_id, api_key = sale
            purchase = f"/v1/sales/{sale_id}/purchase"
            _wrk(args, url, purchase, api_key, g, 1)  # warm-up: connections, caches
            cell = cells.setdefault((g, layout.masters), Cell(g, layout.masters))
            for rep in range(args.reps):
                if layout.masters == args.masters[0]:
                    run = _wrk(args, url, PING, api_key, g, args.duration_s)
                    pings.setdefault(g, []).append(run)
                    _show(rep, f"ping      G={g}", run)
                _measure(args, url, purchase, api_key, pid, layout, cell)
                _show(rep, f"purchase  G={g} M={layout.masters}", cell.runs[-1])


@contextlib.contextmanager
def _gateway(run_dir: Path, env: dict[str, str], processes: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv = gateway_argv(HOST, port) + (["--workers", str(processes)] if processes > 1 else [])
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    child: Child = spawn(f"gateway-{processes}p-{port}", argv, env, logs)
    try:
        url = f"http://{HOST}:{port}"
        wait_healthy(child, url)
        yield url, child.pid
    finally:
        stop_children([child], GATEWAY_STOP_GRACE_S)


async def _setup(url: str, env: dict[str, str], layout: Layout) -> tuple[str, str]:
    """A channel and one sale open now, of M stock buckets on M distinct masters, with
    STOCK units (Ledger.add_stock under a made-up import id: the purchase path never reads
    card keys). Returns (sale id, the channel's API key)."""
    keys = Keys(env["FLASHGATE_KEY_PREFIX"])
    while True:  # a sale id whose buckets' ledgers land on distinct masters
        sale_id = "scale-" + uuid.uuid4().hex[:8]
        owners = {layout.owner(keys.sale(shard_id(sale_id, b))) for b in range(layout.masters)}
        if len(owners) == layout.masters:
            break
    api_key = await open_sale(
        url,
        env["FLASHGATE_ADMIN_TOKEN"],
        Settings.from_env(env),
        sale_id,
        STOCK,
        channel="scale-" + sale_id,
        sku="SCALE",
        name="bench-scale",
        buckets=layout.masters,
    )
    return sale_id, api_key


def _wrk(
    args: argparse.Namespace, url: str, path: str, api_key: str, processes: int, duration_s: int
) -> Run:
    connections = max(args.threads, args.connections * processes)
    argv = ["wrk", f"-t{args.threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    if path != PING:
        argv += ["-s", str(LUA)]
    argv.append(url + (PING if path == PING else ""))
    env = {**os.environ, "FG_PATH": path, "FG_API_KEY": api_key, "FG_RUN": uuid.uuid4().hex[:8]}
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=duration_s + 30, check=True
    ).stdout
    return parse_wrk(out)


def _measure(
    args: argparse.Namespace,
    url: str,
    path: str,
    api_key: str,
    gateway_pid: int,
    layout: Layout,
    cell: Cell,
) -> None:
    """One purchase run, with what each master, the gateway and wrk spent during it."""
    before = [read_stats(p) for p in layout.ports]
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    gw, machine, t0 = tree_cpu_s(gateway_pid) or 0.0, _machine_cpu(), time.monotonic()
    run = _wrk(args, url, path, api_key, cell.gateways, args.duration_s)
    wall = time.monotonic() - t0
    gw2, machine2 = tree_cpu_s(gateway_pid) or 0.0, _machine_cpu()
    kids2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = [read_stats(p) for p in layout.ports]
    cell.runs.append(run)
    cell.redis.append([delta(a, b) for a, b in zip(before, after, strict=True)])
    cell.gateway_cores.append((gw2 - gw) / wall)
    cell.wrk_cores.append((kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime) / wall)
    cell.idle.append(idle_fraction(machine, machine2))
    cell.walls.append(wall)


def _machine_cpu() -> str:
    return Path("/proc/stat").read_text().splitlines()[0]


def _show(rep: int, what: str, run: Run) -> None:
    print(
        f"bench.scale: rep {rep + 1} {what:<22} {run.rps:>9.0f} req/s  p50 {run.p50_ms:6.2f} ms"
        f"  p99 {run.p99_ms:6.2f} ms  non-2xx {run.non2xx}  errors {run.socket_errors}",
        flush=True,
    )


# -- the figures ------------------------------------------------------------------------------
def redis_figures(cell: Cell) -> dict[str, Any]:
    """Per master: cores (median over reps); the Redis servers' CPU microseconds per request
    (INFO cpu, all masters: scripts, other commands, networking) and EVALSHA's microseconds
    per call (commandstats' usec, the whole script with the commands it calls; medians over
    reps). Not a sum of commandstats: a script's commands are counted there on their own
    too, inside EVALSHA's time."""
    per_master = [
        median([rep[i].cpu_s / wall for rep, wall in zip(cell.redis, cell.walls, strict=True)])
        for i in range(cell.masters)
    ]
    usec_per_req, evalsha = [], []
    for rep, run in zip(cell.redis, cell.runs, strict=True):
        usec = sum(m.cpu_s for m in rep) * 1e6
        calls = sum(m.calls.get("evalsha", 0.0) for m in rep)
        if run.requests:
            usec_per_req.append(usec / run.requests)
        if calls:
            evalsha.append(sum(m.usec.get("evalsha", 0.0) for m in rep) / calls)
    return {
        "cores_per_master": [round(c, 2) for c in per_master],
        "usec_per_purchase": round(median(usec_per_req), 1),
        "evalsha_usec_per_call": round(median(evalsha), 1),
        "by_command": by_command(cell),
    }


def by_command(cell: Cell, top: int = 4) -> dict[str, dict[str, float]]:
    """The commands that cost Redis the most, all masters together: {command: {"usec": per
    request, "calls": per request}} (medians over reps), the costliest first. Those a script
    calls are counted on their own and again inside EVALSHA's time."""
    names: set[str] = set()
    for rep in cell.redis:
        for m in rep:
            names.update(m.usec)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        usec, calls = [], []
        for rep, run in zip(cell.redis, cell.runs, strict=True):
            if run.requests:
                usec.append(sum(m.usec.get(name, 0.0) for m in rep) / run.requests)
                calls.append(sum(m.calls.get(name, 0.0) for m in rep) / run.requests)
        out[name] = {"usec": round(median(usec), 1), "calls": round(median(calls), 2)}
    ranked = sorted(out.items(), key=lambda kv: -kv[1]["usec"])[:top]
    return dict(ranked)


def _ratio(a: list[Run], b: list[Run], scale: float = 1.0) -> float | None:
    pairs = [x.rps / (scale * y.rps) for x, y in zip(a, b, strict=False) if y.rps]
    return round(median(pairs), 2) if pairs else None


def summary(cells: dict[tuple[int, int], Cell], pings: dict[int, list[Run]]) -> dict[str, Any]:
    g0 = min((g for g, _ in cells), default=1)
    m0 = min((m for _, m in cells), default=1)
    rows = []
    for (g, m), cell in sorted(cells.items()):
        base_g, base_m = cells.get((g0, m)), cells.get((g, m0))
        rows.append(
            {
                "gateways": g,
                "masters": m,
                "rps": round(median([r.rps for r in cell.runs])),
                "p50_ms": round(median([r.p50_ms for r in cell.runs]), 2),
                "p99_ms": round(median([r.p99_ms for r in cell.runs]), 2),
                "non2xx": sum(r.non2xx for r in cell.runs),
                "errors": sum(r.socket_errors for r in cell.runs),
                "vs_ping": _ratio(cell.runs, pings.get(g, [])),
                "efficiency_gateways": _ratio(cell.runs, base_g.runs, g / g0) if base_g else None,
                "efficiency_masters": _ratio(cell.runs, base_m.runs, m / m0) if base_m else None,
                "gateway_cores": round(median(cell.gateway_cores), 2),
                "wrk_cores": round(median(cell.wrk_cores), 2),
                "idle": round(median(cell.idle), 2),
                **redis_figures(cell),
            }
        )
    return {
        "cells": rows,
        "ping": {g: round(median([r.rps for r in runs])) for g, runs in sorted(pings.items())},
    }


def render(
    args: argparse.Namespace,
    command: str,
    cells: dict[tuple[int, int], Cell],
    pings: dict[int, list[Run]],
) -> str:
    s = summary(cells, pings)
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` "
        f"(risk {args.risk}; wrk -t{args.threads}, {args.connections} connections per gateway "
        f"process, {args.duration_s} s per run, median of {args.reps}).",
        "",
        f"**Machine:** {_machine()}. wrk, the gateways, every Redis master and PostgreSQL "
        "share these cores.",
        "",
        "| gateway processes | trivial endpoint req/s (each rep) |",
        "|---|---|",
    ]
    for g, runs in sorted(pings.items()):
        each = " · ".join(f"{r.rps:,.0f}" for r in runs)
        lines.append(f"| {g} | {median([r.rps for r in runs]):,.0f} ({each}) |")
    lines += [
        "",
        "| G | M | purchases/s | p50 ms | p99 ms | non-2xx | / trivial | eff. G | eff. M "
        "| Redis cores per master | Redis CPU µs / purchase | EVALSHA µs / call | gateway cores "
        "| wrk cores | idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in s["cells"]:
        lines.append(
            f"| {row['gateways']} | {row['masters']} | {row['rps']:,} | {row['p50_ms']:.2f} "
            f"| {row['p99_ms']:.2f} | {row['non2xx']} | {_f(row['vs_ping'])} "
            f"| {_f(row['efficiency_gateways'])} | {_f(row['efficiency_masters'])} "
            f"| {' · '.join(f'{c:.2f}' for c in row['cores_per_master'])} "
            f"| {row['usec_per_purchase']:.1f} | {row['evalsha_usec_per_call']:.1f} "
            f"| {row['gateway_cores']:.2f} | {row['wrk_cores']:.2f} | {row['idle']:.0%} |"
        )
    lines += [
        "",
        "Redis time per purchase by command (INFO commandstats, all masters; µs and "
        "calls per request, the costliest first; the commands purchase.lua calls are "
        "counted on their own and again inside EVALSHA's time):",
        "",
    ]
    for row in s["cells"]:
        parts = ", ".join(
            f"{name} {v['usec']:.1f} µs × {v['calls']:.2f}" for name, v in row["by_command"].items()
        )
        lines.append(f"- G={row['gateways']} M={row['masters']}: {parts}")
    lines += [
        "",
        "G: gateway processes (uvicorn --workers G, one port); M: Redis masters (1: "
        "one plain server; 2+: a cluster, the sale in M stock buckets on M masters). "
        "eff. G = purchases/s ÷ (G/G₀ × purchases/s at the fewest G, same M); eff. M = "
        "purchases/s ÷ (M/M₀ × purchases/s at the fewest M, same G); / trivial = "
        "purchases/s ÷ the trivial endpoint's req/s at the same G (medians of "
        "per-repetition ratios). Redis CPU µs / purchase: the Redis servers' CPU (INFO cpu, "
        "every master) ÷ requests answered; EVALSHA µs / call: INFO commandstats' "
        "usec ÷ calls (the scripts' own time: purchase.lua, ~1 call per purchase).",
    ]
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
