"""What the fault tests share: child processes running this tree's code, a TCP proxy that
can stall or cut a connection, and the audit every fault test ends with."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli.stack import Child, gateway_argv, spawn, worker_argv
from core.embedded import stop_process
from core.keys import WORKER_GROUP
from core.reconcile import check
from core.runtime import Runtime
from core.settings import Settings
from tests.workers_fixtures import keys_by_order, order_rows, revealed_codes

ROOT = Path(__file__).resolve().parents[2]  # this tree: children import its code, not main's


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `flashgate worker` / gateway child on the test's servers."""
    key = settings.active_master_key
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHGATE_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "FLASHGATE_REDIS_URL": settings.redis_url,
            "FLASHGATE_DATABASE_URL": settings.database_url.reveal(),
            "FLASHGATE_ADMIN_TOKEN": settings.admin_token.reveal(),
            "FLASHGATE_MASTER_KEY": f"{key.key_id}:{base64.b64encode(key.material).decode()}",
            "FLASHGATE_KEY_PREFIX": settings.key_prefix,
            "FLASHGATE_WORKER_BLOCK_MS": "50",
            "FLASHGATE_WORKER_CLAIM_IDLE_MS": str(settings.worker_claim_idle_ms),
            "FLASHGATE_SWEEP_INTERVAL_S": "0.1",
            "FLASHGATE_REDIS_MIN_CONNECTIONS": "2",
            "FLASHGATE_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


def imports_this_tree(env: dict[str, str]) -> bool:
    """The children's interpreter, with this env, imports the modules of this tree."""
    out = subprocess.run(
        [sys.executable, "-c", "import workers.faults as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    return out.stdout.strip().startswith(str(ROOT))


def start_worker(env: dict[str, str], log_dir: Path, name: str) -> Child:
    return spawn(name, worker_argv(), env, log_dir)


def start_gateway(
    env: dict[str, str],
    log_dir: Path,
    port: int,
    name: str = "gateway",
) -> Child:
    return spawn(name, gateway_argv("127.0.0.1", port), env, log_dir)


def wait_healthy(url: str, child: Child, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise AssertionError(f"{child.name} exited:\n{child.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{child.name} not ready within {timeout_s} s:\n{child.tail()}")


def kill(child: Child) -> None:
    """SIGKILL, by PID, and reap."""
    stop_process(child.proc, signal.SIGKILL, timeout=5)


def stop_all(children: Iterable[Child]) -> None:
    for child in children:
        stop_process(child.proc, signal.SIGTERM, timeout=20)


# -- a TCP proxy that can stall or cut ---------------------------------------------------------
class TcpProxy:
    """127.0.0.1:<port> -> target. `pause()` stalls every connection (bytes are held, nothing
    is closed, new connections hang); `resume()` lets them flow; `cut()` closes them all."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.resume()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


# -- the audit ---------------------------------------------------------------------------------
@dataclass
class AuditResult:
    confirmed_orders: int
    units: int
    keys_delivered: int
    report: dict[str, object] = field(default_factory=dict)


async def wait_quiescent(
    rt: Runtime, sale_id: str, confirmed: Iterable[str], timeout_s: float = 60
) -> None:
    """Until every given order is delivered in PostgreSQL and the sale's stream is settled."""
    ids = list(confirmed)
    deadline = time.monotonic() + timeout_s
    while True:
        delivered = await rt.pool.fetchval(
            "SELECT count(*) FROM orders WHERE order_id = ANY($1) AND status = 'delivered'", ids
        )
        report = await check(rt.redis, rt.keys, rt.pool, sale_id, orders=False)
        if delivered == len(ids) and report.quiescent:
            return
        dead = await rt.redis.xlen(rt.keys.dead_letters(sale_id))
        assert not dead, f"{dead} entries dead-lettered"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{delivered}/{len(ids)} delivered, quiescent "
                f"{report.quiescent} after {timeout_s} s"
            )
        await asyncio.sleep(0.1)


async def audit(
    rt: Runtime,
    sale_id: str,
    confirmed: dict[str, int],
    codes: list[str],
) -> AuditResult:
    """Every confirmed order delivered exactly once (its quantity of keys, distinct, imported),
    no oversell, the ledger adds up, and Redis and PostgreSQL agree (core.reconcile.check)."""
    rows = await order_rows(rt, sale_id)
    allocated = await keys_by_order(rt, sale_id)
    for order_id, qty in confirmed.items():
        assert rows[order_id]["status"] == "delivered", (order_id, rows[order_id]["status"])
        assert len(allocated.get(order_id, [])) == qty, order_id
        assert (await rt.ledger.order(order_id) or {}).get("status") == "delivered", order_id
    assert set(allocated) == {o for o, r in rows.items() if r["status"] == "delivered"}
    key_ids = [k for ks in allocated.values() for k in ks]
    assert len(key_ids) == len(set(key_ids))
    revealed = [c for o in allocated for c in await revealed_codes(rt, o)]
    assert len(revealed) == len(set(revealed)) == len(key_ids)
    assert set(revealed) <= set(codes)
    live = sum(
        int(str(r["quantity"]))
        for r in rows.values()
        if r["status"] in ("reserved", "confirmed", "delivered")
    )
    assert live <= len(codes)
    stock = await rt.ledger.stock(sale_id)
    assert stock is not None
    assert stock["total"] == len(codes) and stock["available"] >= 0
    assert (
        stock["available"] + stock["reserved"] + stock["confirmed"] + stock["delivered"]
        == stock["total"]
    )
    pending = await rt.redis.xpending(rt.keys.events(sale_id), WORKER_GROUP)
    assert int(pending["pending"]) == 0
    assert await rt.redis.xlen(rt.keys.dead_letters(sale_id)) == 0
    report = await check(rt.redis, rt.keys, rt.pool, sale_id)
    assert report.quiescent and report.ok, report.as_dict()
    return AuditResult(len(confirmed), sum(confirmed.values()), len(key_ids), report.as_dict())
