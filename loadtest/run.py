"""`make loadtest`: a flash sale under Locust, gated by the SLA and audited through the API.

    python -m loadtest.run [--shape spike|steady|none] [--users 1000] [--duration-s 30]
                           [--url http://127.0.0.1:8000 --admin-token T] [--sla-set k=v]

1. Without --url: start the stack (embedded Redis + PostgreSQL unless FLASHGATE_*_URL are set,
   the gateway, workers), as `flashgate demo` does; with --url, use that gateway.
2. Through the admin API: a channel, a sale opening a few seconds ahead, its card keys.
3. Locust headless in a subprocess (its gevent patching stays out of this process), HTML and
   CSV reports under loadtest/results/<time>/.
4. Wait up to the SLA's grace for every confirmed order to be delivered, and up to the
   reservation TTL for every open reservation to settle; then read every order the users saw
   through the storefront API and the sale's ledger through the admin API.
5. Judge (loadtest/audit.py), print the verdict, write verdict.json. Exit 0 pass, 1 fail,
   2 set-up failure. Everything started is stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from core.embedded import stop_process
from loadtest import progress, where
from loadtest.audit import SLA, SLA_FILE, Verdict, judge, read_stats
from loadtest.target import require_loopback

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SWEEP_MARGIN_S = 5.0  # past a reservation's deadline, the sweeper's interval and a batch


class SetupError(RuntimeError):
    pass


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default in --help."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadtest",
        description=__doc__,
        epilog="What each shape does and what --users controls: loadtest/README.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--shape",
        choices=("spike", "steady", "none"),
        default="spike",
        help="spike: a flash-sale opening (all users within 2 s of it, then a tail); "
        "steady: a constant population; none: Locust's -u/-r/-t "
        "(loadtest/profiles.py)",
    )
    p.add_argument(
        "--users",
        type=int,
        default=1000,
        help="honest buyers at the peak (spike) "
        "or throughout (steady, none); bots and solvers are extra (--bots, --solvers)",
    )
    p.add_argument(
        "--spawn-rate",
        type=float,
        default=0,
        help="users started per second, with --shape none; 0 = all users at once",
    )
    p.add_argument("--duration-s", type=float, default=30, help="length of the Locust run")
    p.add_argument("--keys", type=int, default=2000, help="card keys in the sale")
    p.add_argument(
        "--opens-in-s", type=float, default=5, help="the sale opens this long after Locust starts"
    )
    p.add_argument(
        "--reservation-ttl-s",
        type=int,
        default=10,
        help="the sale's reservation deadline: unconfirmed reservations come back after it",
    )
    p.add_argument("--per-user-limit", type=int, default=1, help="the sale's units per buyer")
    p.add_argument(
        "--bots",
        type=int,
        default=3,
        help="bot users (one farm: rotating user "
        "ids on few devices and one /24), a fixed count whatever --users is",
    )
    p.add_argument(
        "--bot-rate",
        type=float,
        default=200,
        help="purchases per second of each "
        "bot (no think time, paced so the load is a stated one); 0 = as fast as "
        "the load generator can",
    )
    p.add_argument(
        "--solvers",
        type=int,
        default=2,
        help="buyers from a datacenter range who get a proof-of-work challenge and solve it",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (own stack only)")
    p.add_argument(
        "--url", help="an already running gateway on loopback (default: start a stack)%(default).0s"
    )
    # never shown in --help: the default is read from the environment after parsing
    p.add_argument(
        "--admin-token",
        default=None,
        help="with --url (default: $FLASHGATE_ADMIN_TOKEN)%(default).0s",
    )
    p.add_argument(
        "--metrics-url",
        default="",
        help="with --url: that gateway's private "
        "metrics endpoint (http://127.0.0.1:<metrics port>/metrics), for its own view "
        "of purchase latency",
    )
    p.add_argument(
        "--database-url",
        default="",
        help="with --url: PostgreSQL of that "
        "gateway, for server-side delivery times (else measured by polling)",
    )
    p.add_argument(
        "--results-dir",
        default=str(ROOT / "loadtest" / "results"),
        help="each run writes a folder <time>/ here (report.html, verdict.json, ...)",
    )
    p.add_argument("--sla", default=str(SLA_FILE), help="the gate's values")
    p.add_argument("--progress-s", type=float, default=3, help="seconds between progress lines")
    p.add_argument(
        "--sla-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one SLA value (e.g. purchase_p99_ms=200)",
    )
    args = p.parse_args(argv)
    if args.admin_token is None:
        args.admin_token = os.environ.get("FLASHGATE_ADMIN_TOKEN", "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: float(v) for k, v in (s.split("=", 1) for s in args.sla_set)}
    sla = SLA.load(Path(args.sla), overrides)
    out = Path(args.results_dir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)  # unwind like Ctrl-C: stop what we started
    try:
        with _gateway(args) as (url, metrics_url, token, database_url, pids):
            print(f"loadtest: gateway {url}; results in {out}", flush=True)
            verdict = _session(args, sla, url, metrics_url, token, database_url, pids, out)
    except (SetupError, RuntimeError) as exc:
        print(f"loadtest: set-up failed: {exc}", file=sys.stderr)
        return 2
    print(_report(args, sla, verdict))
    (out / "verdict.json").write_text(json.dumps(verdict.to_json(), indent=2, default=_jsonable))
    _put_verdict_in_report(out / "report.html", verdict)
    print(json.dumps({"ok": verdict.ok, "results": str(out)}), flush=True)
    return 0 if verdict.ok else 1


@contextlib.contextmanager
def _gateway(
    args: argparse.Namespace,
) -> Iterator[tuple[str, str | None, str, str, dict[str, int]]]:
    """(gateway URL, its metrics URL or None, admin token, database URL or "", our stack's
    pids: none with --url)."""
    if args.url:
        if not args.admin_token:
            raise SetupError("--url needs --admin-token or FLASHGATE_ADMIN_TOKEN")
        try:  # a deployment: `kubectl port-forward svc/flashgate-gateway 8000:80`
            require_loopback(args.url, "--url")
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        yield (
            args.url.rstrip("/"),
            args.metrics_url or None,
            args.admin_token,
            args.database_url,
            {},
        )
        return
    from cli.stack import running_stack

    with running_stack(workers=args.workers) as stack:
        assert stack.gateway_url is not None
        print("loadtest: pids " + " ".join(f"{k}={v}" for k, v in stack.pids.items()), flush=True)
        yield (
            stack.gateway_url,
            stack.metrics_url,
            stack.admin_token,
            stack.urls.database_url,
            stack.pids,
        )
        dead = stack.dead()
        if dead:
            raise SetupError(", ".join(f"{c.name} died: {c.tail(10)}" for c in dead))


def _session(
    args: argparse.Namespace,
    sla: SLA,
    url: str,
    metrics_url: str | None,
    token: str,
    database_url: str,
    pids: dict[str, int],
    out: Path,
) -> Verdict:
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    with admin:
        channel = _ok(admin.post("/v1/admin/channels", json={"name": "loadtest"}), 201)
        sale_id = "lt-" + uuid.uuid4().hex[:10]
        locust_start_s = 3.0  # Locust's own start-up, so users are there at the opening
        opens = datetime.now(UTC) + timedelta(seconds=args.opens_in_s + locust_start_s)
        _ok(
            admin.post(
                "/v1/admin/sales",
                json={
                    "sale_id": sale_id,
                    "sku": "LOAD-1",
                    "name": "Load test",
                    "starts_at": _rfc3339(opens),
                    "ends_at": _rfc3339(opens + timedelta(hours=1)),
                    "per_user_limit": args.per_user_limit,
                    "reservation_ttl_s": args.reservation_ttl_s,
                },
            ),
            201,
        )
        codes = [f"LT-{i:06d}-{secrets.token_hex(6).upper()}" for i in range(args.keys)]
        _ok(admin.post(f"/v1/admin/sales/{sale_id}/keys", json={"keys": codes}), 200)
        print(
            f"loadtest: sale {sale_id}, {args.keys} keys, opens {_rfc3339(opens)}; "
            f"{args.shape} shape, {args.users} users, {args.duration_s:.0f} s",
            flush=True,
        )

        records_file = out / "records.jsonl"
        buckets_before = where.scrape_purchase_buckets(metrics_url)
        with where.CpuSampler(dict(pids)) as cpu:
            _run_locust(
                args, url, sale_id, channel["api_key"], opens.timestamp(), records_file, out, cpu
            )
        latency = where.gateway_latency(
            buckets_before, where.scrape_purchase_buckets(metrics_url), sla.purchase_p99_ms
        )
        records = (
            [json.loads(line) for line in records_file.read_text().splitlines()]
            if records_file.exists()
            else []
        )
        print(
            "loadtest: Locust done; waiting for deliveries and expiries to settle, then "
            "auditing every order",
            flush=True,
        )
        _settle(
            admin,
            sale_id,
            time.monotonic() + sla.delivery_grace_s,
            time.monotonic() + args.reservation_ttl_s + SWEEP_MARGIN_S,
        )
        order_ids = sorted({r["order_id"] for r in records if r.get("order_id")})
        orders = asyncio.run(_read_orders(url, channel["api_key"], order_ids))
        stock = _ok(admin.get(f"/v1/admin/sales/{sale_id}"), 200)["stock"]
    delivery_ms = _delivery_ms(database_url, sale_id, records, orders)
    stats_csv = out / "locust_stats.csv"
    if not stats_csv.exists():
        raise SetupError(f"Locust wrote no stats; see {out / 'locust.log'}")
    verdict = judge(
        sla,
        read_stats(stats_csv),
        records,
        orders,
        stock,
        stock_total=args.keys,
        imported=set(codes),
        per_user_limit=args.per_user_limit,
        delivery_ms=delivery_ms,
        gateway=None if latency is None else (latency.count, latency.p99_bucket_ms),
    )
    # Not part of the gate: where the time went (loadtest/where.py).
    verdict.figures["where"] = {
        "gateway_latency": latency,
        "cpu_whole_run": cpu.whole(),
        "cpu_busiest_second": cpu.busiest(),
    }
    return verdict


def _settle(admin: httpx.Client, sale_id: str, delivered_by: float, expired_by: float) -> None:
    """Wait until the sale stops moving: every confirmed order delivered (within the grace)
    and every reservation left by the users confirmed, cancelled or expired (within its TTL).
    Only then are the orders and the ledger read, so the audit compares one state: a
    reservation expiring between the two reads would look like a unit sold twice."""
    while True:
        stock = _ok(admin.get(f"/v1/admin/sales/{sale_id}"), 200)["stock"]
        now = time.monotonic()
        undelivered = int(stock["confirmed"]) > 0 and now < delivered_by
        unexpired = int(stock["reserved"]) > 0 and now < expired_by
        if not (undelivered or unexpired):
            return
        time.sleep(0.2)


def _run_locust(
    args: argparse.Namespace,
    url: str,
    sale_id: str,
    api_key: str,
    opens_at: float,
    records: Path,
    out: Path,
    cpu: where.CpuSampler,
) -> None:
    env = {
        **os.environ,
        "FG_SALE_ID": sale_id,
        "FG_API_KEY": api_key,
        "FG_OPENS_AT": str(opens_at),
        "FG_SHAPE": args.shape,
        "FG_USERS": str(args.users),
        "FG_DURATION_S": str(args.duration_s),
        "FG_RECORDS": str(records),
        "FG_BOTS": str(args.bots),
        "FG_BOT_RATE": str(args.bot_rate),
        "FG_SOLVERS": str(args.solvers),
        "FG_PROGRESS": str(out / "progress.jsonl"),
        "FG_PROGRESS_S": str(args.progress_s),
        "PYTHONPATH": str(ROOT),
    }
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--logfile",
        str(out / "locust.log"),
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "1",
    ]
    if args.shape == "none":
        rate = args.spawn_rate or args.users
        argv += ["-u", str(args.users), "-r", str(rate), "-t", f"{args.duration_s:.0f}s"]
    print("loadtest: " + " ".join(argv[1:]), flush=True)
    with open(out / "locust.out", "wb") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        cpu.add("locust", proc.pid)
        follower = progress.Follower(out / "progress.jsonl")
        deadline = time.monotonic() + args.duration_s + args.opens_in_s + 60
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, args.duration_s)
                time.sleep(0.5)
                for snap in follower.new():
                    print(progress.describe(snap), flush=True)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            stop_process(proc, timeout=15)
            raise
    if proc.returncode != 0:
        tail = (out / "locust.out").read_text(errors="replace")[-2000:]
        raise SetupError(f"Locust exited {proc.returncode}:\n{tail}")


async def _read_orders(url: str, api_key: str, order_ids: list[str]) -> dict[str, Any]:
    """Every order as its buyer reads it now (status, quantity, card keys)."""
    out: dict[str, Any] = {}
    sem = asyncio.Semaphore(32)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def one(oid: str) -> None:
            async with sem:
                r = await client.get(f"/v1/orders/{oid}")
            out[oid] = r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}

        await asyncio.gather(*(one(o) for o in order_ids))
    return out


def _delivery_ms(
    database_url: str, sale_id: str, records: list[dict[str, Any]], orders: dict[str, Any]
) -> list[float]:
    """Confirm -> delivered per delivered order: PostgreSQL's own timestamps when we can read
    them; otherwise the buyers' view (confirm answered -> first poll that saw the key)."""
    if database_url:

        async def fetch() -> list[float]:
            conn = await asyncpg.connect(database_url)
            try:
                rows = await conn.fetch(
                    "SELECT extract(epoch FROM delivered_at - confirmed_at) * 1000 AS ms"
                    " FROM orders WHERE sale_id = $1 AND delivered_at IS NOT NULL",
                    sale_id,
                )
            finally:
                await conn.close()
            return [float(r["ms"]) for r in rows]

        with contextlib.suppress(OSError, asyncpg.PostgresError):
            return asyncio.run(fetch())
    return [
        (r["delivered_seen_at"] - r["confirmed_at"]) * 1000
        for r in records
        if r.get("delivered_seen_at")
        and r.get("confirmed_at")
        and orders.get(r.get("order_id", ""), {}).get("status") == "delivered"
    ]


def _put_verdict_in_report(report: Path, verdict: Verdict) -> None:
    """The SLA verdict at the top of Locust's report.html, so the page alone tells the
    outcome."""
    if not report.exists():
        return
    html = report.read_text(errors="replace")
    at = html.find("<body")
    at = html.find(">", at) + 1 if at >= 0 else 0
    report.write_text(html[:at] + verdict.to_html() + html[at:])


def _jsonable(o: object) -> object:
    return (
        dataclasses.asdict(o) if dataclasses.is_dataclass(o) and not isinstance(o, type) else str(o)
    )


def _ok(r: httpx.Response, status: int) -> Any:
    if r.status_code != status:
        raise SetupError(
            f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text[:300]}"
        )
    return r.json()


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _report(args: argparse.Namespace, sla: SLA, v: Verdict) -> str:
    f = v.figures
    lines = [
        "",
        "Flashgate load test",
        "===================",
        f"SLA ({args.sla}): purchase p99 <= {sla.purchase_p99_ms:.0f} ms, errors <= "
        f"{sla.error_rate_max:.2%}, delivery p99 <= {sla.delivery_p99_ms:.0f} ms, "
        f"grace {sla.delivery_grace_s:.0f} s",
        f"load      {args.shape} shape, {args.users} users, {args.bots} bots "
        f"({f'{args.bot_rate:.0f} purchases/s each' if args.bot_rate else 'unpaced'}), "
        f"{args.solvers} challenge solvers, {args.duration_s:.0f} s",
    ]
    for name, s in f.get("requests", {}).items():
        lines.append(
            f"  {name:<24} {s['count']:>7} req {s['failures']:>5} failed  "
            f"p50 {s['p50_ms']:>5.0f} ms  p99 {s['p99_ms']:>5.0f} ms  "
            f"{s['rps']:>7.1f} req/s"
        )
    lines += [
        f"buyers    {f.get('buyers')} honest, {f.get('solvers')} challenged "
        f"({f.get('solved')} solved); outcomes {f.get('outcomes')}",
        f"bots      {f.get('bot_answers')}",
        f"second tries (new key after a confirmed order) {f.get('second_tries')}",
        f"delivery  {f.get('delivered')} of {f.get('confirmed')} confirmed; p50 "
        f"{f.get('delivery_p50_ms')} ms, p99 {f.get('delivery_p99_ms')} ms",
        f"ledger    {f.get('ledger')}",
    ]
    w = f.get("where", {})
    client_p99 = max(
        (s["p99_ms"] for n, s in f.get("requests", {}).items() if n.startswith("purchase")),
        default=None,
    )
    lines += where.render(
        w.get("gateway_latency"),
        w.get("cpu_whole_run"),
        w.get("cpu_busiest_second"),
        sla.purchase_p99_ms,
        client_p99,
        f.get("requests", {}).get("Aggregated", {}).get("count", 0),
    )
    lines.append(v.render())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
