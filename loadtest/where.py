"""Where a load test's time went: the gateway's own view of purchase latency, and the CPU each
process used, over the whole run and in its busiest second.

The gate judges the client-side p99 (loadtest/audit.py): what a storefront sees. When Locust
shares the machine with the stack, that figure also holds the load generator's own queueing
(a request waits for Locust's CPU before it is sent and after it is answered). These figures
tell the two apart without changing the gate:
- the gateway's histogram (flashgate_http_request_duration_seconds, the purchase route),
  scraped from its private metrics port before and after the run: the share of purchases the gateway
  answered within the SLA, from the request reaching the app to the end of its response
  (the kernel's queues and uvicorn's parsing are outside it);
- CPU per process tree (bench/cpu.py, psutil: every descendant, those that exited included),
  sampled every SAMPLE_S, with the machine's idle share: the gateway, the workers and Locust
  by PID; Redis (valkey) and PostgreSQL (the postmaster, its backends in its tree) by command
  name among the processes started after this one (so the machine's own servers on the
  standard ports are left out); "rest" is everything else, this process included.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.cpu import roots_by_name, tree_cpu_s

PURCHASE_ROUTE = "/v1/sales/{sale_id}/purchase"
DURATION_BUCKET = "flashgate_http_request_duration_seconds_bucket"
SAMPLE_S = 0.25
TICKS = os.sysconf("SC_CLK_TCK")


# -- the gateway's histogram ----------------------------------------------------------------
def scrape_purchase_buckets(metrics_url: str | None) -> dict[float, float] | None:
    """Cumulative purchase-latency bucket counts {upper bound s: count}, or None when the
    gateway's metrics can't be read (no metrics port, a gateway behind a proxy, say).
    `metrics_url`: the full URL of the gateway's private metrics endpoint, as
    `Stack.metrics_url` gives it (`http://127.0.0.1:<metrics port>/metrics`), never the API's."""
    if not metrics_url:
        return None
    try:
        r = httpx.get(metrics_url, timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    text = r.text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == DURATION_BUCKET
                and s.labels.get("route") == PURCHASE_ROUTE
                and s.labels.get("method") == "POST"
            ):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value  # summed over processes
    return buckets or None


@dataclass(frozen=True)
class GatewayLatency:
    count: int  # purchases the gateway answered during the run
    within_sla: float  # share answered within the SLA's bucket edge
    sla_edge_ms: float  # the histogram edge the share is read at (<= the SLA)
    p99_bucket_ms: float  # upper edge of the bucket holding the gateway's p99 (inf: over all)


def gateway_latency(
    before: dict[float, float] | None, after: dict[float, float] | None, sla_ms: float
) -> GatewayLatency | None:
    if after is None:
        return None
    before = before or {}
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    count = delta[-1][1] if delta else 0.0
    if count <= 0:
        return None
    edges = [le for le, _ in delta if le * 1000 <= sla_ms + 1e-9]
    edge = edges[-1] if edges else delta[0][0]
    within = dict(delta)[edge] / count
    p99 = next(le for le, c in delta if c >= 0.99 * count)
    return GatewayLatency(int(count), within, edge * 1000, p99 * 1000)


# -- CPU ------------------------------------------------------------------------------------
def _machine() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine, from /proc/stat's `cpu ` line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _ticks(pid: int) -> float | None:
    """CPU clock ticks of a process and its whole tree (bench/cpu.py), None once it is gone."""
    seconds = tree_cpu_s(pid)
    return None if seconds is None else seconds * TICKS


BY_COMMAND = {"valkey-server": "redis", "redis-server": "redis", "postgres": "postgres"}


@dataclass
class Sample:
    at: float  # wall clock (time.time)
    busy: int
    total: int
    procs: dict[str, float]  # name -> CPU ticks so far


@dataclass(frozen=True)
class CpuWindow:
    start: float  # wall clock
    seconds: float
    cores: dict[str, float]  # name -> cores used; "rest" = the machine's busy time left over
    idle: float  # share of the machine idle


@dataclass
class CpuSampler:
    """Samples the process trees every SAMPLE_S in a thread while the load runs. Processes
    are named; a process that exits keeps its last reading (so Locust's CPU counts up to its
    exit)."""

    pids: dict[str, int]
    discover: bool = True  # also Redis and PostgreSQL by command name (_started_after)
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last: dict[str, float] = field(default_factory=dict)
    _since: float = 0.0

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def __enter__(self) -> CpuSampler:
        self._since = psutil.Process().create_time()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_S)

    def _sample(self) -> None:
        pids = dict(self.pids)
        if self.discover:
            pids.update(roots_by_name(BY_COMMAND, self._since))
        for name, pid in pids.items():
            ticks = _ticks(pid)
            if ticks is not None:
                self._last[name] = ticks
        procs = dict(self._last)
        busy, total = _machine()
        self.samples.append(Sample(time.time(), busy, total, procs))

    def window(self, a: Sample, b: Sample) -> CpuWindow:
        seconds = max(b.at - a.at, 1e-9)
        cores: dict[str, float] = {}
        for name in sorted(b.procs):
            group = name.split(":")[0].split("-")[0]  # worker-1 -> worker, redis:123 -> redis
            used = (b.procs[name] - a.procs.get(name, 0.0)) / TICKS / seconds  # born since: 0
            cores[group] = cores.get(group, 0.0) + used
        machine_busy = (b.busy - a.busy) / TICKS / seconds
        cores["rest"] = max(0.0, machine_busy - sum(cores.values()))
        total = b.total - a.total
        idle = 1 - (b.busy - a.busy) / total if total else 0.0
        return CpuWindow(a.at, seconds, cores, idle)

    def whole(self) -> CpuWindow | None:
        return self.window(self.samples[0], self.samples[-1]) if len(self.samples) > 1 else None

    def busiest(self, seconds: float = 1.0) -> CpuWindow | None:
        """The window of about `seconds` in which the machine was least idle."""
        best: CpuWindow | None = None
        span = max(1, math.ceil(seconds / SAMPLE_S))
        for i in range(len(self.samples) - span):
            w = self.window(self.samples[i], self.samples[i + span])
            if best is None or w.idle < best.idle:
                best = w
        return best


def render(
    latency: GatewayLatency | None,
    whole: CpuWindow | None,
    busiest: CpuWindow | None,
    sla_ms: float,
    client_p99_ms: float | None,
    requests: int = 0,
) -> list[str]:
    """The report's lines. `requests`: all requests Locust made, for its CPU per request (at
    an opening, N users pressing at once wait up to N x that for Locust alone)."""
    lines = []
    if latency is None:
        lines.append("gateway   its /metrics could not be read: no server-side latency")
    else:
        p99 = (
            "over the last bucket"
            if math.isinf(latency.p99_bucket_ms)
            else f"<= {latency.p99_bucket_ms:.0f} ms"
        )
        lines.append(
            f"gateway   {latency.within_sla:.2%} of {latency.count} purchases answered "
            f"within {latency.sla_edge_ms:.0f} ms by the gateway itself; its p99 "
            f"{p99} (histogram: app in to response out)"
        )

    def cores(w: CpuWindow) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in w.cores.items())
        return f"{parts} cores; idle {w.idle:.0%}"

    if whole is not None:
        lines.append(f"cpu       whole run: {cores(whole)}")
        locust = whole.cores.get("locust", 0.0) * whole.seconds
        if requests and locust:
            lines.append(
                f"          Locust: {locust / requests * 1e6:.0f} us of CPU per request "
                f"({requests} requests)"
            )
    if busiest is not None:
        stamp = time.strftime("%H:%M:%S", time.gmtime(busiest.start))
        lines.append(f"          busiest second ({stamp} UTC): {cores(busiest)}")
    if (
        client_p99_ms is not None
        and client_p99_ms > sla_ms
        and latency is not None
        and latency.within_sla >= 0.99
        and busiest is not None
        and busiest.idle < 0.05
    ):
        lines.append(
            "note      the app answered >= 99% of purchases within the SLA but the clients' p99 "
            "did not, on a machine with no idle CPU left: the difference is queueing in front "
            "of the app (requests waiting in sockets for the gateway's event loop, and for "
            "Locust's own CPU). Give the gateway and Locust cores of their own to tell them "
            "apart; the gate judges the clients' view."
        )
    return lines
