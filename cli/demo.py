"""`flashgate demo`: a flash sale under load on a private stack, then an audit of the outcome.

1. Start the stack (embedded Redis + PostgreSQL unless URLs are given, the gateway, 2 workers).
2. Through the admin API: a channel, a sale opening in a few seconds, its card keys.
3. At the opening second, many buyers purchase concurrently (cli/load.py), with idempotent
   retries, double clicks and second tries; a bot farm (a few devices cycling through many
   user ids from two /24s) fires among them, and the risk engine should refuse most of it.
4. Confirm every reservation; poll until each confirmed order reads "delivered".
5. Audit (cli/audit.py), print a report and, as the last line, one JSON object.
Exit 1 when an invariant fails; everything started is stopped either way.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import secrets
import sys
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from cli.admin import rfc3339
from cli.audit import Audit, Delivery, audit, render
from cli.load import Attempt, Plan, default_bots, make_plan, play, play_in_process
from cli.stack import Stack, redact, running_stack


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=int, default=1000, help="card keys in the sale (stock)")
    p.add_argument("--buyers", type=int, default=5000, help="distinct honest buyers")
    p.add_argument(
        "--attempts",
        type=int,
        default=20000,
        help="purchase attempts in all, the bot farm's included",
    )
    p.add_argument(
        "--bots",
        type=int,
        default=None,
        help="attempts of the bot farm, 2 per bot user id (default: 10%% of "
        "--attempts; 0: no farm)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="requests in flight (connections), split over the load processes",
    )
    p.add_argument(
        "--load-procs",
        type=int,
        default=1,
        help="load-generating processes (one keeps up with the gateway on 2 cores)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--opens-in-s", type=float, default=3.0, help="sale opens this far ahead")
    p.add_argument("--reservation-ttl-s", type=int, default=120)
    p.add_argument("--delivery-timeout-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--run-dir", help="keep server data and logs here (default: a temp dir, removed at the end)"
    )


class DemoError(RuntimeError):
    """The demo could not set up its sale (an admin call failed)."""


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        bots = default_bots(args.attempts) if args.bots is None else args.bots
        plan = make_plan(args.buyers, args.attempts, bots=bots, seed=args.seed)
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(f"demo: starting the stack ({args.workers} workers) ...", flush=True)
    try:
        with running_stack(
            run_dir=Path(args.run_dir) if args.run_dir else None, workers=args.workers
        ) as stack:
            print(
                f"demo: gateway at {stack.gateway_url}; redis {redact(stack.urls.redis_url)}; "
                f"postgres {redact(stack.urls.database_url)}",
                flush=True,
            )
            print("demo: pids " + " ".join(f"{k}={v}" for k, v in stack.pids.items()), flush=True)
            try:
                result = asyncio.run(_session(stack, args, plan))
            except DemoError as exc:
                print(f"demo: {exc}", file=sys.stderr)
                _show_logs(stack)
                return 2
            dead = stack.dead()
            for child in dead:
                result.failures.append(f"{child.name} died (exit {child.proc.returncode})")
            if not result.ok:
                _show_logs(stack)
    except RuntimeError as exc:  # StackError, or an embedded server that would not start
        print(f"demo: the stack failed: {exc}", file=sys.stderr)
        return 2
    result.elapsed_s = round(time.monotonic() - started, 2)
    print(render(result))
    print(json.dumps(result.summary(), separators=(",", ":")), flush=True)
    return 0 if result.ok else 1


def _show_logs(stack: Stack) -> None:
    for child in stack.children:
        print(
            f"--- {child.name} (pid {child.pid}) log, last lines ---\n{child.tail(15)}",
            file=sys.stderr,
        )


async def _session(stack: Stack, args: argparse.Namespace, plan: Plan) -> Audit:
    assert stack.gateway_url is not None
    base = stack.gateway_url
    admin_headers = {"Authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=base, headers=admin_headers, timeout=60) as admin:
        channel = await _ok(admin.post("/v1/admin/channels", json={"name": "demo-shop"}), 201)
        sale_id = "demo-" + uuid.uuid4().hex[:10]
        opens = datetime.now(UTC) + timedelta(seconds=args.opens_in_s)
        await _ok(
            admin.post(
                "/v1/admin/sales",
                json={
                    "sale_id": sale_id,
                    "sku": "GIFT-25",
                    "name": "Demo flash sale",
                    "starts_at": rfc3339(opens),
                    "ends_at": rfc3339(opens + timedelta(hours=1)),
                    "per_user_limit": 1,
                    "reservation_ttl_s": args.reservation_ttl_s,
                },
            ),
            201,
        )
        codes = [f"GC-{i:05d}-{secrets.token_hex(6).upper()}" for i in range(args.keys)]
        imported = await _ok(
            admin.post(f"/v1/admin/sales/{sale_id}/keys", json={"keys": codes}), 200
        )
        print(
            f"demo: sale {sale_id}: {imported['imported']} keys imported; opens at "
            f"{rfc3339(opens)}; {plan.attempts} attempts from {plan.honest} buyers"
            f"{_farm_text(plan)}, {args.concurrency} in flight over {args.load_procs} load "
            "process(es)",
            flush=True,
        )

        attempts = await _fire(base, sale_id, channel["api_key"], plan, opens.timestamp(), args)
        print(
            f"demo: {len(attempts)} purchase answers; confirming and awaiting delivery ...",
            flush=True,
        )
        deliveries = await _confirm_and_deliver(
            base, channel["api_key"], admin, sale_id, stack.urls.database_url, attempts, args
        )
        stock = await _ok(admin.get(f"/v1/admin/sales/{sale_id}"), 200)
    return audit(
        stock_total=args.keys,
        imported=set(codes),
        buyers=plan.honest,
        per_user_limit=1,
        attempts=attempts,
        deliveries=deliveries,
        sale=stock,
        opens_at=opens.timestamp(),
        imported_count=imported["imported"],
        load_procs=args.load_procs,
        concurrency=args.concurrency,
        bots=plan.bot_users,
        farm=plan.farm.describe() if plan.farm else "",
    )


def _farm_text(plan: Plan) -> str:
    return f" and a bot farm of {plan.farm.describe()}" if plan.farm else ""


async def _ok(request: Any, status: int) -> Any:
    try:
        r: httpx.Response = await request
    except httpx.HTTPError as exc:
        raise DemoError(f"admin API unreachable: {exc!r}") from exc
    if r.status_code != status:
        raise DemoError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text}")
    return r.json()


async def _fire(
    base: str, sale_id: str, api_key: str, plan: Plan, opens_at: float, args: argparse.Namespace
) -> list[Attempt]:
    procs = max(1, args.load_procs)
    per_proc = max(1, args.concurrency // procs)
    parts = plan.partitions(procs)
    if procs == 1:
        return await play(base, sale_id, api_key, parts[0], opens_at, per_proc)
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        futures = [
            loop.run_in_executor(
                pool, play_in_process, base, sale_id, api_key, part, opens_at, per_proc
            )
            for part in parts
        ]
        results = await asyncio.gather(*futures)
    return [Attempt(*row) for rows in results for row in rows]  # type: ignore[arg-type]


async def _confirm_and_deliver(
    base: str,
    api_key: str,
    admin: httpx.AsyncClient,
    sale_id: str,
    database_url: str,
    attempts: list[Attempt],
    args: argparse.Namespace,
) -> dict[str, Delivery]:
    """Confirm every reservation; wait until the sale's ledger counts them all delivered; then
    read each order as its buyer would (status and card keys)."""
    orders = sorted({a.order_id for a in attempts if a.status == 201 and a.order_id})
    out = {oid: Delivery(oid) for oid in orders}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=httpx.Timeout(30.0, pool=None)
    ) as client:

        async def confirm(d: Delivery) -> None:
            d.confirm_sent_at = time.time()
            try:
                r = await client.post(
                    f"/v1/orders/{d.order_id}/confirm", json={"payment_ref": "pay-" + d.order_id}
                )
            except httpx.HTTPError as exc:
                d.confirm_error = repr(exc)
                return
            if r.status_code == 202 and r.json().get("status") == "confirmed":
                d.confirmed_at = time.time()
            else:
                d.confirm_error = f"{r.status_code} {r.text[:200]}"

        async def read(d: Delivery) -> None:
            try:
                r = await client.get(f"/v1/orders/{d.order_id}")
            except httpx.HTTPError:
                return
            d.polls += 1
            if r.status_code == 200 and (doc := r.json()).get("status") == "delivered":
                d.delivered_seen_at = time.time()
                d.card_keys = list(doc.get("card_keys") or [])
                d.quantity = int(doc.get("quantity", 1))

        await _bounded(64, [confirm(d) for d in out.values()])
        confirmed = sum(1 for d in out.values() if d.confirmed_at is not None)
        deadline = time.monotonic() + args.delivery_timeout_s
        # The ledger's counter is one Redis read: cheap to poll, unlike 1,000 order reads.
        while time.monotonic() < deadline:
            sale = await _ok(admin.get(f"/v1/admin/sales/{sale_id}"), 200)
            if int((sale.get("stock") or {}).get("delivered", 0)) >= confirmed:
                break
            await asyncio.sleep(0.1)
        while True:
            pending = [
                d
                for d in out.values()
                if d.confirmed_at is not None and d.delivered_seen_at is None
            ]
            await _bounded(64, [read(d) for d in pending])
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
    await _delivered_at(database_url, sale_id, out)
    return out


async def _bounded(limit: int, coros: list[Coroutine[Any, Any, None]]) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c: Coroutine[Any, Any, None]) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


async def _delivered_at(database_url: str, sale_id: str, out: dict[str, Delivery]) -> None:
    """When each order was delivered, from PostgreSQL's record (orders.delivered_at): exact,
    unlike the moment a poll happened to see it. Best effort: without it, polls are used."""
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError):
        return
    try:
        rows = await conn.fetch(
            "SELECT order_id, extract(epoch FROM delivered_at)::float8 AS at,"
            " extract(epoch FROM confirmed_at)::float8 AS confirmed FROM orders"
            " WHERE sale_id = $1 AND delivered_at IS NOT NULL",
            sale_id,
        )
    except asyncpg.PostgresError:
        return
    finally:
        await conn.close()
    for row in rows:
        if (d := out.get(row["order_id"])) is not None:
            d.delivered_at = row["at"]
            d.confirmed_in_ledger_at = row["confirmed"]
