"""`flashgate`: run the stack, its parts, the admin API's operations, and the demo."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from cli import admin
from core.settings import ConfigError, Settings

if TYPE_CHECKING:
    from cli.stack import Stack


class Stop(Exception):
    """SIGTERM (or Ctrl-C) asked us to stop; raised once, then the stack's clean-up runs."""


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


UP_PORT = 8000  # the port the docs use; `up` falls back to a free one when it is taken


def cmd_up(args: argparse.Namespace) -> int:
    import os

    from cli import envfile
    from cli.stack import redact, running_stack

    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else (envfile.RUN_ROOT / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    )
    port = gateway_port(args.port)
    if port is None:
        return 2
    base_env = dict(os.environ)
    stale = envfile.sourced_from_previous_up(base_env)
    if stale:
        print(
            f"ignoring {', '.join(stale)}: this shell sourced the env file of an earlier "
            f"flashgate up ({base_env['FLASHGATE_ENV_FILE']})",
            file=sys.stderr,
        )
        for name in stale:
            del base_env[name]
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        with running_stack(
            run_dir=run_dir,
            workers=args.workers,
            port=port,
            capture_logs=not args.foreground_logs,
            base_env=base_env,
        ) as stack:
            env_file = envfile.write(
                run_dir, up_variables(stack, os.getpid()), bin_dir=envfile.cli_bin_dir()
            )
            try:  # the env file goes first, before the stack stops
                print(up_banner(stack, run_dir, env_file, redact), flush=True)
                print("pids " + " ".join(f"{k}={v}" for k, v in stack.pids.items()), flush=True)
                print("Ctrl-C stops everything.", flush=True)
                return watch(stack)
            finally:
                envfile.remove(env_file)
    except Stop as why:
        print(f"stopping ({why}) ... stopped.", flush=True)
        return 0
    except RuntimeError as exc:  # StackError, or an embedded server that would not start
        print(f"flashgate up failed: {exc}", file=sys.stderr)
        return 1


def watch(stack: Stack) -> int:
    """Until Stop: 1 as soon as a child exits on its own (its log's tail printed)."""
    while True:
        dead = stack.dead()
        if dead:
            for child in dead:
                print(
                    f"{child.name} (pid {child.pid}) exited with "
                    f"{child.proc.returncode}:\n{child.tail()}",
                    file=sys.stderr,
                )
            return 1
        time.sleep(0.5)


def gateway_port(asked: int | None) -> int | None:
    """--port P: P, which must be free (0: any free port); no --port: 8000 when it is free,
    else a free one, said so. None: the asked port is taken (message printed)."""
    from cli.stack import port_free

    if asked is None:
        if port_free("127.0.0.1", UP_PORT):
            return UP_PORT
        print(
            f"port {UP_PORT} is in use (another flashgate up?): the gateway takes a free "
            f"port instead; its URL is printed below and in .run/flashgate.env",
            file=sys.stderr,
            flush=True,
        )
        return 0
    if asked and not port_free("127.0.0.1", asked):
        print(
            f"flashgate up: port {asked} is in use; choose another, or --port 0 for a free one",
            file=sys.stderr,
        )
        return None
    return asked


def up_variables(stack: Stack, pid: int) -> dict[str, str]:
    """The env file's values (cli/envfile.py): how a shell or the CLI reaches this stack."""
    values = {
        "FLASHGATE_ADMIN_TOKEN": stack.admin_token,
        "FLASHGATE_MASTER_KEY": stack.env["FLASHGATE_MASTER_KEY"],
        "FLASHGATE_REDIS_URL": stack.urls.redis_url,
        "FLASHGATE_DATABASE_URL": stack.urls.database_url,
        "FLASHGATE_KEY_PREFIX": stack.env.get("FLASHGATE_KEY_PREFIX") or "fg",
        "FLASHGATE_WORKER_METRICS_URLS": " ".join(stack.worker_metrics_urls),
        "FLASHGATE_RUN_DIR": str(stack.run_dir),
        "FLASHGATE_UP_PID": str(pid),
    }
    if stack.gateway_url is not None:
        values["FLASHGATE_URL"] = stack.gateway_url
    if stack.metrics_url is not None:
        values["FLASHGATE_METRICS_URL"] = stack.metrics_url
    return values


def up_banner(stack: Stack, run_dir: Path, env_file: Path, redact: Callable[[str], str]) -> str:
    token = stack.admin_token if stack.admin_token_generated else "(from FLASHGATE_ADMIN_TOKEN)"
    lines = [
        f"flashgate is up (run dir {run_dir})",
        f"  gateway         {stack.gateway_url}",
        f"  metrics         {stack.metrics_url}",
        *(f"  worker metrics  {url}" for url in stack.worker_metrics_urls),
        f"  redis           {redact(stack.urls.redis_url)}",
        f"  postgres        {redact(stack.urls.database_url)}",
        f"  logs            {run_dir / 'logs'}",
        f"  admin token     {token}",
        f"  env file        {env_file} (and .run/flashgate.env; mode 0600, deleted on stop)",
        "  in another shell, in this directory:",
        "    source .run/flashgate.env",
        '    curl -H "Authorization: Bearer $FLASHGATE_ADMIN_TOKEN" '
        "$FLASHGATE_URL/v1/admin/risk/stats",
        "    flashgate channel create shop    # the CLI finds .run/flashgate.env by itself",
    ]
    return "\n".join(lines)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.runner import main as worker_main

    worker_main(Settings.from_env())
    return 0


def cmd_worker_check(args: argparse.Namespace) -> int:
    """Exit 0 if a worker's heartbeat key is present (this host's, or any with --any), else 1."""
    import asyncio
    import socket

    from core.keys import Keys
    from core.runtime import redis_client
    from workers.metrics import alive_workers

    settings = Settings.from_env(admin.stack_env())
    prefix = "" if args.any else f"{socket.gethostname()}-"

    async def check() -> list[str]:
        client = redis_client(settings)
        try:
            return await alive_workers(client, Keys(settings.key_prefix), prefix)
        finally:
            await client.aclose()

    try:
        alive = asyncio.run(check())
    except Exception as exc:  # noqa: BLE001 - Redis unreachable: not healthy
        print(f"worker-check: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"alive: {', '.join(alive)}" if alive else "no live worker")
    return 0 if alive else 1


def cmd_gateway(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    # The app factory reads the environment: --metrics-port overrides FLASHGATE_METRICS_PORT,
    # and the metrics port listens on the API's host unless FLASHGATE_METRICS_HOST says.
    if args.metrics_port is not None:
        os.environ["FLASHGATE_METRICS_PORT"] = str(args.metrics_port)
    os.environ.setdefault("FLASHGATE_METRICS_HOST", args.host)
    Settings.from_env()  # fail fast, with the variable's name, before uvicorn starts
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="gateway.server:BoundedHttpToolsProtocol",
        access_log=False,
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from cli.stack import run_migrations

    settings = Settings.from_env(admin.stack_env())
    applied = run_migrations(settings.database_url.reveal())
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Redis ledger vs PostgreSQL vs card keys for one sale: prints a JSON report; exits 1 on
    drift. Without --check, a ledger Redis lost is first rebuilt from PostgreSQL."""
    import asyncio
    import json

    from core.reconcile import ReconcileError, reconcile
    from core.runtime import Runtime
    from risk import durable

    settings = Settings.from_env(admin.stack_env())

    async def run() -> dict[str, object]:
        rt = await Runtime.open(settings, run_migrations=False)
        try:
            write = not args.check
            report = await reconcile(rt.ledger, rt.pool, args.sale_id, write=write)
            # The risk lists and the sale's override (risk/durable.py): Redis made PostgreSQL's
            # copy unless --check; "risk" is the drift found before any restore.
            risk = await durable.sync(rt.pool, rt.redis, rt.keys, args.sale_id, write=write)
        finally:
            await rt.close()
        out = report.as_dict()
        out["risk"] = risk
        out["risk_restored"] = write and any(risk.values())
        out["ok"] = report.ok and (write or not any(risk.values()))
        return out

    try:
        out = asyncio.run(run())
    except ReconcileError as exc:
        print(f"reconcile: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0 if out["ok"] else 1


def cmd_rotate_master_key(args: argparse.Namespace) -> int:
    """Rewrap every data key under the active master key (the first of FLASHGATE_MASTER_KEY);
    prints a JSON report. Online: run it while gateways and workers serve (core/rotation.py)."""
    import asyncio
    import json

    from core.crypto import Keyring
    from core.db import create_pool
    from core.rotation import RotationError, rotate_master_key
    from core.settings import RotationSettings

    settings = RotationSettings.from_env(admin.stack_env())

    async def run() -> dict[str, object]:
        pool = await create_pool(settings.database_url.reveal(), max_size=2)
        try:
            report = await rotate_master_key(
                pool, Keyring(settings.master_keys), batch_size=args.batch_size
            )
        finally:
            await pool.close()
        return {
            "active_master_key": report.active,
            "rewrapped": report.rewrapped,
            "batches": report.batches,
            "data_keys_by_master_key": report.by_master_key,
        }

    try:
        out = asyncio.run(run())
    except RotationError as exc:
        print(f"rotate-master-key: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: unwind, stopping what we started
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flashgate {version()}")
    admin.add_connection_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "up",
        help="run Redis, PostgreSQL, the gateway and workers in the "
        "foreground (embedded servers unless FLASHGATE_*_URL are set)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"gateway port (default: {UP_PORT} when free, else a free one; 0: a free one)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run-dir", help="where server data and logs go (default ./.run/<time>)")
    p.add_argument(
        "--foreground-logs",
        action="store_true",
        help="children log to this terminal instead of <run-dir>/logs",
    )
    p.set_defaults(handler=cmd_up)

    p = sub.add_parser("worker", help="run one worker process (until SIGTERM)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser(
        "worker-check",
        help="exit 0 if this host's worker (or --any worker) "
        "refreshed its heartbeat key in the last 30 s, else 1",
    )
    p.add_argument("--any", action="store_true", help="any worker, not only this host's")
    p.set_defaults(handler=cmd_worker_check)

    p = sub.add_parser("gateway", help="run the HTTP gateway (uvicorn, uvloop, httptools)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="private Prometheus port, /metrics (default FLASHGATE_METRICS_PORT; "
        "0 = off); never served on --port",
    )
    p.set_defaults(handler=cmd_gateway)

    p = sub.add_parser("migrate", help="apply pending PostgreSQL migrations")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser(
        "reconcile",
        help="compare a sale's Redis ledger with PostgreSQL and "
        "its card keys (JSON report, exit 1 on drift); a ledger Redis lost is "
        "rebuilt from PostgreSQL unless --check",
    )
    p.add_argument("sale_id")
    p.add_argument("--check", action="store_true", help="report only, never write")
    p.set_defaults(handler=cmd_reconcile)

    p = sub.add_parser(
        "rotate-master-key",
        help="rewrap every data key under the active "
        "master key (first of FLASHGATE_MASTER_KEY; older ones still listed), "
        "in batches, online",
    )
    p.add_argument("--batch-size", type=int, default=500, help="data keys per transaction")
    p.set_defaults(handler=cmd_rotate_master_key)

    admin.add_parsers(sub)

    from cli.demo import add_demo_arguments

    p = sub.add_parser("demo", help="a flash sale under load on a private stack, audited")
    add_demo_arguments(p)
    p.set_defaults(handler=cmd_demo)
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("flashgate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
