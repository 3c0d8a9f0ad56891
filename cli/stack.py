"""The local stack: Redis + PostgreSQL, migrations, the gateway and N workers, as child processes.

`running_stack()` is shared by `flashgate up` (foreground, for manual use) and `flashgate demo`.
Everything it starts it stops again, by PID and in order: the gateway first (no new requests),
then the workers (they drain on SIGTERM), then the backing servers. Each child gets SIGTERM, a
grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from core.db import migrate
from core.embedded import CHILD_SETUP, ServiceURLs, backing_services, free_port

GATEWAY_STOP_GRACE_S = 10.0
WORKER_STOP_GRACE_S = 20.0  # workers drain: finish the batch in hand, ack, then exit
HEALTH_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    """A part of the stack failed to start; the message says which and shows its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        if self.log is None:
            return "(output not captured)"
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    urls: ServiceURLs
    admin_token: str
    env: dict[str, str]
    run_dir: Path
    gateway_url: str | None = None
    metrics_url: str | None = None  # the gateway's private /metrics (its own port)
    worker_metrics_urls: list[str] = field(default_factory=list)  # each worker's /metrics
    children: list[Child] = field(default_factory=list)

    admin_token_generated: bool = False  # False: it came from FLASHGATE_ADMIN_TOKEN

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.children}

    def dead(self) -> list[Child]:
        """Children that exited on their own (none should, while the stack is up)."""
        return [c for c in self.children if c.proc.poll() is not None]


def redact(url: str) -> str:
    """A URL fit to print: any password replaced by *****."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":*****@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def stack_env(urls: ServiceURLs, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The children's environment: ours, plus the servers' URLs and the secrets, generated if
    not given (an ephemeral admin token and master key live only as long as the stack)."""
    env = dict(os.environ if base is None else base)
    env["FLASHGATE_REDIS_URL"] = urls.redis_url
    env["FLASHGATE_DATABASE_URL"] = urls.database_url
    if not env.get("FLASHGATE_ADMIN_TOKEN"):
        env["FLASHGATE_ADMIN_TOKEN"] = secrets.token_urlsafe(32)  # 43 characters
    if not env.get("FLASHGATE_MASTER_KEY"):
        env["FLASHGATE_MASTER_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def spawn(name: str, argv: list[str], env: Mapping[str, str], log_dir: Path | None) -> Child:
    """Start a child in its own session, so a terminal's Ctrl-C reaches only us and we stop the
    children in order. Output goes to `<log_dir>/<name>.log`, or to our own stdout/stderr."""
    out: IO[bytes] | None = None
    log = None
    if log_dir is not None:
        log = log_dir / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child holds it; we close our copy below
    try:
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
            preexec_fn=CHILD_SETUP,
        )
    finally:
        if out is not None:
            out.close()
    return Child(name, proc, log)


def stop_children(children: list[Child], grace_s: float) -> None:
    """SIGTERM each, wait up to `grace_s` in total, SIGKILL what is left, reap everything."""
    for child in children:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            child.proc.wait(5)


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now (as uvicorn does, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_migrations(database_url: str) -> list[str]:
    async def _run() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    return asyncio.run(_run())


def gateway_argv(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "gateway.app:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "gateway.server:BoundedHttpToolsProtocol",
        "--no-access-log",
    ]


def worker_argv() -> list[str]:
    return [sys.executable, "-m", "cli.main", "worker"]


def wait_healthy(child: Child, url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise StackError(f"{child.name} exited at start-up:\n{child.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/healthz").status_code == 200:
                    return
            time.sleep(0.1)
    raise StackError(f"{child.name} not healthy within {timeout_s:.0f} s:\n{child.tail()}")


@contextlib.contextmanager
def running_stack(
    *,
    run_dir: Path | None = None,
    workers: int = 2,
    gateway: bool = True,
    host: str = "127.0.0.1",
    port: int = 0,
    capture_logs: bool = True,
    extra_env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Start the stack, yield it, stop it. `run_dir=None` uses a temporary directory that is
    removed at the end; a given run_dir is kept (server data and the children's logs).
    `base_env` replaces our environment as the children's base (`extra_env` goes over it).
    Each worker serves its metrics on a port of its own."""
    owned = run_dir is None
    base_dir = Path(tempfile.mkdtemp(prefix="flashgate-")) if run_dir is None else run_dir
    services = contextlib.ExitStack()
    children: list[Child] = []
    try:
        base = {**(os.environ if base_env is None else base_env), **(extra_env or {})}
        urls = services.enter_context(backing_services(run_dir=base_dir, env=base))
        env = stack_env(urls, base)
        log_dir = base_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        stack = Stack(
            urls,
            env["FLASHGATE_ADMIN_TOKEN"],
            env,
            base_dir,
            children=children,
            admin_token_generated=not base.get("FLASHGATE_ADMIN_TOKEN"),
        )
        run_migrations(urls.database_url)
        logs = log_dir if capture_logs else None
        if gateway:
            port = port or free_port()
            stack.gateway_url = f"http://{host}:{port}"
            metrics_port = free_port()
            stack.metrics_url = f"http://{host}:{metrics_port}/metrics"
            children.append(
                spawn(
                    "gateway",
                    gateway_argv(host, port),
                    {
                        **env,
                        "FLASHGATE_METRICS_PORT": str(metrics_port),
                        "FLASHGATE_METRICS_HOST": host,
                    },
                    logs,
                )
            )
        for i in range(workers):
            worker_port = free_port()
            stack.worker_metrics_urls.append(f"http://{host}:{worker_port}/metrics")
            children.append(
                spawn(
                    f"worker-{i + 1}",
                    worker_argv(),
                    {
                        **env,
                        "FLASHGATE_WORKER_METRICS_PORT": str(worker_port),
                        "FLASHGATE_METRICS_HOST": host,
                    },
                    logs,
                )
            )
        if stack.gateway_url is not None:
            wait_healthy(children[0], stack.gateway_url)
        yield stack
    finally:
        # A second Ctrl-C or SIGTERM while we stop must not abandon half of the stack.
        with _signals_deferred():
            gateways = [c for c in children if c.name == "gateway"]
            stop_children(gateways, GATEWAY_STOP_GRACE_S)
            stop_children([c for c in children if c not in gateways], WORKER_STOP_GRACE_S)
            services.close()  # the servers last, by PID
            if owned:
                shutil.rmtree(base_dir, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Signals that arrive inside the block are ignored (we are already stopping)."""
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: nothing to defer
            previous[sig] = signal.signal(sig, lambda s, _f: received.append(s))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
