"""`make bench`'s report: the results of bench/run.py as the Markdown of docs/PERFORMANCE.md
(a pure function of what was measured, apart from the machine's description)."""

from __future__ import annotations

import argparse
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.parse import Run, median, median_ratio

STOCK = 10_000_000
HTTP_CASES = (
    "ping",
    "ping-granian",
    "purchase-off",
    "purchase-on",
    "purchase-on-granian",
    "naive-pg",
    "naive-pg-durable",
    "purchase-on-2p",
    "fixed-rate",
)
LABELS = {
    "ping": "ceiling: trivial JSON endpoint (same app, server, settings)",
    "ping-granian": "ceiling, under granian instead of uvicorn",
    "purchase-off": "purchase, risk off",
    "purchase-on": "purchase, risk on",
    "purchase-on-granian": "purchase, risk on, under granian instead of uvicorn",
    "naive-pg": "naive design: PostgreSQL-only purchase (same app), PostgreSQL fsync off",
    "naive-pg-durable": "naive design, durable PostgreSQL (fsync, synchronous_commit on)",
    "purchase-on-2p": "purchase, risk on, 2 gateway processes (`--workers 2`)",
    "fixed-rate": "purchase, risk on, fixed arrival rate (open loop; see below)",
    "redis-reserve": "Redis: reserve.lua (EVALSHA)",
    "redis-incr": "Redis: INCR",
    "workers": "workers: orders persisted + keys allocated",
}
_RPS, _P99 = "rps", "p99_ms"  # the Run field each ratio compares
# (label, numerator case, denominator case, figure): each a median of per-repetition ratios.
RATIOS: tuple[tuple[str, str, str, str], ...] = (
    ("purchase (risk on) / trivial endpoint", "purchase-on", "ping", _RPS),
    ("purchase (risk off) / trivial endpoint", "purchase-off", "ping", _RPS),
    ("purchase risk on / risk off", "purchase-on", "purchase-off", _RPS),
    ("trivial endpoint: granian / uvicorn", "ping-granian", "ping", _RPS),
    ("purchase (risk on): granian / uvicorn", "purchase-on-granian", "purchase-on", _RPS),
    ("p99: purchase (risk on), granian / uvicorn", "purchase-on-granian", "purchase-on", _P99),
    ("purchase (risk on) / naive PostgreSQL design (fsync off)", "purchase-on", "naive-pg", _RPS),
    ("purchase (risk off) / naive PostgreSQL design (fsync off)", "purchase-off", "naive-pg", _RPS),
    (
        "p99: purchase (risk on) / naive PostgreSQL design (fsync off)",
        "purchase-on",
        "naive-pg",
        _P99,
    ),
    (
        "purchase (risk on) / naive PostgreSQL design, durable",
        "purchase-on",
        "naive-pg-durable",
        _RPS,
    ),
    (
        "p99: purchase (risk on) / naive PostgreSQL design, durable",
        "purchase-on",
        "naive-pg-durable",
        _P99,
    ),
    ("naive PostgreSQL design: durable / fsync off", "naive-pg-durable", "naive-pg", _RPS),
    ("p99: naive PostgreSQL design, durable / fsync off", "naive-pg-durable", "naive-pg", _P99),
    ("Redis: reserve.lua / INCR", "redis-reserve", "redis-incr", _RPS),
    ("purchase (risk on): 2 gateway processes / 1", "purchase-on-2p", "purchase-on", _RPS),
    ("p99: purchase (risk on), 2 gateway processes / 1", "purchase-on-2p", "purchase-on", _P99),
    ("fixed-rate answered / max purchase (risk on)", "fixed-rate", "purchase-on", _RPS),
)


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        mem = "?"
    return (
        f"{os.cpu_count()} CPUs (nproc), {cpu}, {mem} RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def _fmt(runs: list[Run], unit: str) -> tuple[str, str, str]:
    rps = median([r.rps for r in runs])
    p50 = median([r.p50_ms for r in runs])
    p99 = median([r.p99_ms for r in runs])
    each = " · ".join(f"{r.rps:,.0f}" for r in runs)
    return f"{rps:,.0f} {unit} ({each})", f"{p50:.2f}", f"{p99:.2f}"


def render(
    args: argparse.Namespace,
    command: str,
    results: dict[str, list[Run]],
    commands: dict[str, str],
    detail: dict[str, Any] | None = None,
) -> str:
    detail = detail or {}
    lines = [
        "# Performance",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` (`{command.strip()}`).",
        "",
        f"**Machine:** {_machine()}. The load generator (wrk, redis-benchmark), the gateway, "
        "Redis and PostgreSQL all share these cores, so every HTTP figure is a lower bound "
        "set partly by wrk's own CPU; ratios measured in the same run are what to compare.",
        "",
        f"Every figure is the median of {args.reps} repetitions (each value listed in "
        "brackets); HTTP cases run interleaved within each repetition. Ratios are the median "
        "of per-repetition ratios.",
        "",
        "| what | throughput (median; each rep) | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        runs = results.get(name)
        if not runs:
            continue
        unit = (
            "req/s" if name in HTTP_CASES else ("ops/s" if name.startswith("redis") else "orders/s")
        )
        rps, p50, p99 = _fmt(runs, unit)
        if name == "fixed-rate":
            rps = rps.replace(" (", " answered (", 1)
        if name == "workers":
            p50 = p99 = "–"
        non2xx = str(sum(r.non2xx + r.socket_errors for r in runs)) if name in HTTP_CASES else "–"
        lines.append(f"| {label} | {rps} | {p50} | {p99} | {non2xx} |")
    ratios = ratio_rows(results)
    if ratios:
        lines += ["", "| ratio (pair by pair, same repetition) | median |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in ratios]
    lines += durable_lines(detail.get("durable") or {})
    lines += _fixed_rate_lines(detail.get("fixed") or [])
    lines += _cpu_lines(detail.get("cpu") or {})
    lines += ["", "## Commands", ""]
    lines += [f"- {LABELS.get(k, k)}: `{v}`" for k, v in commands.items()]
    servers = detail.get("servers") or {}
    if servers:
        lines += [
            "",
            "Servers (`$PORT` a free port; environment as `flashgate up` gives it, "
            "plus `FLASHGATE_BENCH_ENDPOINTS=1` and `FLASHGATE_RISK_ENABLED` as said):",
            "",
        ]
        lines += [f"- {who}: `{argv}`" for who, argv in servers.items()]
    lines += [
        "",
        "`$URL`, `$SALE`, `$KEY`, `$PORT`: the run's gateway, sale, channel key and "
        "Redis port. Purchase stock is added straight to the Redis ledger "
        f"(`Ledger.add_stock`, {STOCK:,} units, no card keys: the purchase path never "
        "reads keys); the naive design gets the same count in its own `bench_naive` "
        "schema, created by the benchmark (in each of its two PostgreSQL servers). "
        "Purchases are reservations (no payment ref), so nothing is confirmed or "
        "delivered during the HTTP runs and no workers run.",
    ]
    return "\n".join(lines) + "\n"


def durable_lines(durable: dict[str, Any]) -> list[str]:
    """What the durable naive design ran on: the server's own settings, WAL flushes per
    purchase, and the machine's flush latency, which bounds a design that holds one stock
    row's lock through every commit's flush."""
    if not durable:
        return []
    settings = ", ".join(f"{k}={v}" for k, v in durable.get("settings", {}).items())
    lines = [
        "",
        f"Durable PostgreSQL of `naive-pg-durable`: a second private server, settings "
        f"as it reports them: {settings or 'unknown'}.",
    ]
    if durable.get("wal_syncs_per_purchase") is not None:
        lines[-1] += (
            " WAL flushes per naive durable purchase (pg_stat_wal.wal_sync, over "
            f"every repetition): {durable['wal_syncs_per_purchase']:.2f} "
            f"({durable['wal_syncs']:,} flushes, {durable['purchases']:,} "
            "purchases)."
        )
    rows = []
    for method, (ops, us) in (durable.get("pg_test_fsync") or {}).items():
        if method in ("fdatasync", "fsync"):
            rows.append(
                f"| pg_test_fsync -s 1, one 8 kB write, {method} | {ops:,.0f} | "
                f"{us:.0f} µs (mean) |"
            )
    probe = durable.get("probe")
    if probe is not None:
        rows.append(
            f"| bench/durable.py: 8 kB pwrite + fdatasync loop, {probe.samples:,} "
            f"flushes | {probe.ops_s:,.0f} | p50 {probe.p50_us:.0f} µs, p99 "
            f"{probe.p99_us:.0f} µs |"
        )
    if rows:
        lines += [
            "",
            "Flush latency of this machine, on the PostgreSQL servers' filesystem "
            "(measured once, before the HTTP cases):",
            "",
            "| probe | flushes/s | per flush |",
            "|---|---|---|",
            *rows,
        ]
    if probe is not None and probe.p50_us > 0:
        lines += [
            "",
            "Each naive purchase updates the sale's one stock row and holds its lock "
            "until the commit is flushed, so one sale cannot sell faster than one flush "
            f"at a time: at most ~{round(1e6 / probe.p50_us, -2):,.0f} purchases/s at this "
            f"machine's median flush ({probe.p50_us:.0f} µs), before any other work.",
        ]
    return lines


def _fixed_rate_lines(fixed: list[dict[str, Any]]) -> list[str]:
    """Per repetition: the rate asked for, the share of that repetition's max it is, whether
    the generator held it, and where the latency went."""
    if not fixed:
        return []
    lines = [
        "",
        "Fixed-rate runs (bench/openloop.py, one per repetition; latency counted from "
        "each request's due time; `lag` is the generator's own lateness in handing a "
        "request over, `service` the time from writing it to its answer):",
        "",
        "| rep | rate asked | of max (purchase, risk on) | answered/s | p50 ms | p99 ms "
        "| service p99 ms | lag p99 ms | generator held the rate | non-2xx + errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(fixed, 1):
        lines.append(
            f"| {i} | {d['target_rate']:,.0f} req/s | {d['fraction']:.2f} of "
            f"{d['peak']:,.0f} | {d['achieved_rate']:,.0f} | {d['p50_ms']:.2f} | "
            f"{d['p99_ms']:.2f} | {d['service_p99_ms']:.2f} | {d['lag_p99_ms']:.2f} | "
            f"{'yes' if d['held'] else 'no'} | {d['non2xx'] + d['errors']} |"
        )
    return lines


def _cpu_lines(cpu: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    """Median CPU over each HTTP case's repetitions: does the load generator leave room?"""
    if not cpu:
        return []
    lines = [
        "",
        "CPU during the HTTP cases (median over repetitions; cores = CPU-seconds per "
        f"second of wall time, of the {os.cpu_count()} the machine has):",
        "",
        "| case | load generator (wrk / openloop) cores | gateway cores (all its "
        "processes) | everything else (Redis, PostgreSQL, the other gateways, bench) "
        "cores | machine idle |",
        "|---|---|---|---|---|",
    ]
    cores = os.cpu_count() or 1
    for name, samples in cpu.items():
        if not samples:
            continue
        gen = median([x[0] for x in samples])
        gw = median([x[1] for x in samples])
        idle = median([x[2] for x in samples])
        rest = max(0.0, cores * (1 - idle) - gen - gw)
        lines.append(
            f"| {LABELS.get(name, name)} | {gen:.2f} | {gw:.2f} | {rest:.2f} | {idle:.0%} |"
        )
    return lines


def ratio_rows(results: dict[str, list[Run]]) -> list[tuple[str, str]]:
    """(label, "0.00×") for every pair in RATIOS whose two cases both ran."""
    out: list[tuple[str, str]] = []
    for label, a, b, figure in RATIOS:
        if results.get(a) and results.get(b):
            ratio = median_ratio(
                [getattr(r, figure) for r in results[a]], [getattr(r, figure) for r in results[b]]
            )
            out.append((label, f"{ratio:.2f}×"))
    return out
