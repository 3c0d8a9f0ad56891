"""Reading the load generators' output, and the statistics over repetitions (pure functions)."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import dataclass
from typing import Any

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    non2xx: int = 0
    socket_errors: int = 0


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> Run:
    """wrk --latency output: Requests/sec, the 50% and 99% lines, errors."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return Run(
        rps,
        p50,
        p99,
        int(total.group(1)) if total else 0,
        int(non2xx.group(1)) if non2xx else 0,
        sum(int(g) for g in sock.groups()) if sock else 0,
    )


def parse_redis_benchmark(text: str) -> Run:
    """redis-benchmark --csv (7.x): "test","rps","avg_latency_ms","min_latency_ms",
    "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"."""
    rows = list(csv.DictReader(io.StringIO(text.strip())))
    row = rows[-1]
    return Run(float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"]))


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of per-repetition ratios (pair by pair, same repetition), not a ratio of
    medians: noise that hits both sides of one pair cancels."""
    pairs = [a / b for a, b in zip(numerators, denominators, strict=True) if b]
    return median(pairs)


def parse_openloop(text: str) -> tuple[Run, dict[str, Any]]:
    """bench/openloop.py's `openloop {json}` line: the run (rps = answers per second of the
    measured window, latency from each request's due time) and every field as printed."""
    line = next((ln for ln in text.splitlines() if ln.startswith("openloop ")), None)
    if line is None:
        raise ValueError("no `openloop {json}` line in the output")
    d = json.loads(line.removeprefix("openloop "))
    return Run(
        float(d["achieved_rate"]),
        float(d["p50_ms"]),
        float(d["p99_ms"]),
        int(d["sent"]),
        int(d["non2xx"]),
        int(d["errors"]),
    ), d


def cpu_seconds(stat: str) -> float:
    """utime + stime of one /proc/<pid>/stat line, in clock ticks (the command name may hold
    spaces and parentheses, so fields are counted after its last ')')."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return float(int(fields[11]) + int(fields[12]))


def idle_fraction(before: str, after: str) -> float:
    """Share of the machine's CPU time idle (idle + iowait) between two `cpu ` lines of
    /proc/stat."""
    a = [int(x) for x in before.split()[1:]]
    b = [int(x) for x in after.split()[1:]]
    delta = [y - x for x, y in zip(a, b, strict=False)]
    total = sum(delta[:8])  # guest time is already counted in user
    return (delta[3] + delta[4]) / total if total else 0.0


def parse_pg_test_fsync(text: str) -> dict[str, tuple[float, float]]:
    """pg_test_fsync's first section ("using one 8kB write"): {method: (ops/s, µs per op)};
    methods the platform lacks ("n/a") are left out."""
    _, found, rest = text.partition("one 8kB write")
    section = rest.split("\n\n", 1)[0] if found else ""
    return {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"^\s+(\w+)\s+([\d.]+) ops/sec\s+([\d.]+) usecs/op", section, re.M)
    }
