"""Open-loop purchase load at a fixed arrival rate (what wrk2 does; wrk2 is not in Debian).

    python -m bench.openloop --url http://127.0.0.1:PORT --path /v1/sales/SALE/purchase \
        --api-key KEY --rate 2500 [--duration-s 10] [--warmup-s 1] [--connections 64]

wrk is closed-loop: a connection sends its next request only once the previous answer is in,
so when the server stalls wrk simply sends less and the stall hides in a few slow samples
(coordinated omission). Here request i is due at `start + i / rate` whatever happened before:
the scheduler hands it to the pool of keep-alive connections (cli/http1.py, httptools) at that
time, and its latency runs from the time it was due, so waiting for a free connection counts.
Each request is a new buyer, device, Idempotency-Key and IP, as bench/purchase.lua makes them.
Requests due in the first --warmup-s are sent but not counted (connections open there).

The scheduler wakes once a millisecond (the event loop's timer resolution; sleeping less
spins a core) and hands over everything due, so up to ~1 ms of the generator's own lateness
is in every latency: left in, on the safe side. That lateness is also reported apart
(`lag_*`: when the scheduler handed a request over, minus when it was due); with lag p99
above LAG_LIMIT_MS or fewer requests sent than planned, the generator did not hold the rate
on this machine, and `held` is false.

Bounded: loopback only (127.0.0.1), at most MAX_REQUESTS planned, each request at most
--timeout-s, and the answers still out --timeout-s after the last one was due are errors.
Prints one line `openloop {json}` (bench/parse.py: parse_openloop) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from cli.http1 import Connection, ConnectionLost, build_request

LAG_LIMIT_MS = 5.0
TICK_S = 0.001  # the scheduler wakes at most once a millisecond and sends all that is due
MAX_REQUESTS = 300_000


@dataclass(frozen=True)
class Plan:
    rate: float  # requests per second
    duration_s: float  # the measured window, after the warm-up
    warmup_s: float = 1.0

    @property
    def total(self) -> int:
        return math.ceil((self.warmup_s + self.duration_s) * self.rate)

    @property
    def first_measured(self) -> int:
        """Index of the first request due after the warm-up."""
        return math.ceil(self.warmup_s * self.rate)

    def due(self, i: int) -> float:
        """Seconds after the start at which request i is due."""
        return i / self.rate

    def due_by(self, elapsed_s: float) -> int:
        """How many requests are due `elapsed_s` after the start (indexes 0 .. n-1)."""
        if elapsed_s < 0:
            return 0
        return min(self.total, math.floor(elapsed_s * self.rate) + 1)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def buyer(run: str, n: int) -> tuple[str, str]:
    """Buyer n of a run: (user id, IP), spread like bench/purchase.lua over the 16,384 /24s
    of 100.64.0.0/10 so that the risk engine sees people, not a farm."""
    s = n % 16384
    ip = f"100.{64 + s // 256}.{s % 256}.{1 + (n // 16384) % 254}"
    return f"{run}-{n}", ip


def purchase_request(host: str, path: str, api_key: str, run: str, n: int) -> bytes:
    user, ip = buyer(run, n)
    body = (
        f'{{"user_id":"{user}","client_ip":"{ip}","device_id":"d-{user}",'
        f'"user_agent":"openloop/1"}}'
    ).encode()
    return build_request(
        "POST",
        host,
        path,
        {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Idempotency-Key": user,
        },
        body,
    )


@dataclass
class Result:
    target_rate: float
    duration_s: float
    planned: int = 0  # measured requests planned (after the warm-up)
    sent: int = 0  # measured requests handed to a connection
    ok: int = 0  # 2xx answers
    non2xx: int = 0
    errors: int = 0  # connection lost, timed out, or still out at the end
    achieved_rate: float = 0.0  # answers (any status) per second of the measured window
    p50_ms: float = 0.0  # from the time each request was due, answers of any status
    p99_ms: float = 0.0
    max_ms: float = 0.0
    service_p99_ms: float = 0.0  # from the time it was written (what a closed loop sees)
    lag_p50_ms: float = 0.0  # the generator's lateness in handing requests over
    lag_p99_ms: float = 0.0
    held: bool = False
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        del out["latencies_ms"]
        return out


def summarize(
    plan: Plan,
    due_ms: list[float],
    service_ms: list[float],
    lag_ms: list[float],
    sent: int,
    ok: int,
    non2xx: int,
    errors: int,
) -> Result:
    """The run's figures from the measured requests' samples (pure: tested without load)."""
    due_ms, service_ms, lag_ms = sorted(due_ms), sorted(service_ms), sorted(lag_ms)
    planned = plan.total - plan.first_measured
    res = Result(
        plan.rate,
        plan.duration_s,
        planned,
        sent,
        ok,
        non2xx,
        errors,
        (ok + non2xx) / plan.duration_s if plan.duration_s else 0.0,
        percentile(due_ms, 50),
        percentile(due_ms, 99),
        due_ms[-1] if due_ms else 0.0,
        percentile(service_ms, 99),
        percentile(lag_ms, 50),
        percentile(lag_ms, 99),
    )
    res.held = sent == planned and res.lag_p99_ms <= LAG_LIMIT_MS
    return res


async def run(
    url: str,
    path: str,
    api_key: str,
    plan: Plan,
    connections: int = 64,
    timeout_s: float = 5.0,
    run_id: str | None = None,
) -> Result:
    parts = urlsplit(url)
    if parts.hostname != "127.0.0.1" or parts.scheme != "http":
        raise ValueError(f"open-loop load goes to http://127.0.0.1 only, not {url!r}")
    if plan.total > MAX_REQUESTS:
        raise ValueError(f"{plan.total} requests planned; at most {MAX_REQUESTS}")
    host, port = "127.0.0.1", parts.port or 80
    run_id = run_id or f"ol{time.time_ns() % 10**10:x}"
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    first = plan.first_measured
    due_ms: list[float] = []
    service_ms: list[float] = []
    lag_ms: list[float] = []
    counts = {"sent": 0, "ok": 0, "non2xx": 0}

    async def worker(conn: Connection) -> None:
        while (item := await queue.get()) is not None:
            i, due = item
            raw = purchase_request(f"{host}:{port}", path, api_key, run_id, i)
            measured = i >= first
            counts["sent"] += measured
            sent_at = time.perf_counter()
            try:
                status, _ = await conn.request(raw, timeout_s)
            except (ConnectionLost, OSError, TimeoutError):
                continue  # counted below: every measured request not answered is an error
            if measured:
                done = time.perf_counter()
                due_ms.append((done - due) * 1000)
                service_ms.append((done - sent_at) * 1000)
                counts["ok" if 200 <= status < 300 else "non2xx"] += 1

    conns = [Connection(host, port) for _ in range(connections)]
    workers = [asyncio.create_task(worker(c)) for c in conns]
    start = time.perf_counter()
    i = 0
    try:
        while i < plan.total:
            elapsed = time.perf_counter() - start
            upto = plan.due_by(elapsed)
            while i < upto:
                queue.put_nowait((i, start + plan.due(i)))
                if i >= first:
                    lag_ms.append((elapsed - plan.due(i)) * 1000)
                i += 1
            if i < plan.total:  # the loop's timers tick in ms: a shorter sleep would spin
                await asyncio.sleep(max(TICK_S, plan.due(i) - (time.perf_counter() - start)))
        for _ in workers:
            queue.put_nowait(None)
        _, late = await asyncio.wait(workers, timeout=timeout_s + 1.0)
        for task in late:  # answers still out: cut off, counted as errors below
            task.cancel()
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for c in conns:
            c.close()
    planned = plan.total - first
    return summarize(
        plan,
        due_ms,
        service_ms,
        lag_ms,
        counts["sent"],
        counts["ok"],
        counts["non2xx"],
        planned - counts["ok"] - counts["non2xx"],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.openloop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    p.add_argument("--path", required=True, help="the purchase path")
    p.add_argument("--api-key", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--timeout-s", type=float, default=5.0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration_s <= 0 or args.warmup_s < 0 or args.connections < 1:
        p.error("--rate and --duration-s must be > 0, --warmup-s >= 0, --connections >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the venv has it (uvicorn[standard])
        runner = asyncio.run
    else:
        runner = uvloop.run
    plan = Plan(args.rate, args.duration_s, args.warmup_s)
    try:
        res = runner(run(args.url, args.path, args.api_key, plan, args.connections, args.timeout_s))
    except ValueError as exc:
        print(f"bench.openloop: {exc}", file=sys.stderr)
        return 2
    print("openloop " + json.dumps(res.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
