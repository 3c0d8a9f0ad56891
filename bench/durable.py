"""The naive design with production durability, and what bounds it: the machine's flush rate.

The stack's PostgreSQL runs with fsync and synchronous_commit off, which flatters the naive
PostgreSQL-only purchase. `durable_postgres()` starts a second private PostgreSQL with
PostgreSQL's own defaults (fsync, synchronous_commit, full_page_writes on), so each naive
purchase's commit waits for its WAL flush while it holds the stock row's lock. The flush
latency is measured twice: `pg_test_fsync` (PostgreSQL's own tool, from the pgserver wheel)
and a small fdatasync loop that also gives percentiles, both on the servers' filesystem.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.openloop import percentile
from bench.parse import parse_pg_test_fsync
from core.embedded import EmbeddedPostgres

BLOCK = 8192  # one WAL page: what a small commit flushes
PROBE_FILE_BYTES = 16 * 1024 * 1024  # one WAL segment, preallocated as PostgreSQL does


@dataclass(frozen=True)
class FsyncProbe:
    ops_s: float
    p50_us: float
    p99_us: float
    samples: int


@contextlib.contextmanager
def durable_postgres(run_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A private durable PostgreSQL under `run_dir`, stopped by its PID on exit."""
    pg = EmbeddedPostgres(run_dir, durable=True)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


async def server_settings(database_url: str) -> dict[str, str]:
    """The durability settings as the server reports them (not as we asked for them)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name",
            ["fsync", "synchronous_commit", "full_page_writes", "wal_sync_method"],
        )
        return {r["name"]: r["setting"] for r in rows}
    finally:
        await conn.close()


async def wal_syncs(database_url: str) -> int:
    """WAL flushes so far (pg_stat_wal.wal_sync): per purchase, it shows group commit."""
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT wal_sync FROM pg_stat_wal"))
    finally:
        await conn.close()


def fsync_probe(directory: Path, seconds: float = 2.0) -> FsyncProbe:
    """Write one 8 kB block and fdatasync it (Linux's default wal_sync_method), in a loop over
    a preallocated 16 MiB file, for `seconds`: flushes per second and per-flush percentiles."""
    path = directory / "fsync-probe.tmp"
    block = os.urandom(BLOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, PROBE_FILE_BYTES)
        os.fsync(fd)
        took: list[float] = []
        offset, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            os.pwrite(fd, block, offset)
            os.fdatasync(fd)
            took.append((time.perf_counter() - t0) * 1e6)
            offset = (offset + BLOCK) % PROBE_FILE_BYTES
        wall = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    took.sort()
    return FsyncProbe(len(took) / wall, percentile(took, 50), percentile(took, 99), len(took))


def pg_test_fsync(directory: Path, secs_per_test: int = 1) -> dict[str, tuple[float, float]]:
    """pg_test_fsync's one-8kB-write section ({method: (ops/s, µs/op)}); {} without the tool.
    It runs all of its tests, about 16 s at one second each."""
    tool = EmbeddedPostgres.bindir() / "pg_test_fsync"
    if not tool.exists():
        return {}
    path = directory / "pg_test_fsync.tmp"
    try:
        out = subprocess.run(
            [str(tool), "-s", str(secs_per_test), "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        path.unlink(missing_ok=True)
    return parse_pg_test_fsync(out)
