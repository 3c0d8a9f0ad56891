"""Redis layouts for `make bench-scale`: one plain server, or a cluster of M masters; and, per
master, what it spent (process CPU, and commandstats' time per command) over a run.

M = 1 is the single server `flashgate up` runs (redis:// URL, the auto-pipelined client);
M >= 3 is core.embedded.EmbeddedRedisCluster; M = 2 is made here by hand (valkey-cli
--cluster create wants 3 masters at least): slots split with CLUSTER ADDSLOTSRANGE, the nodes
joined with CLUSTER MEET, both through redis-py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis as redis_sync
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from core.embedded import (
    EmbeddedRedis,
    EmbeddedRedisCluster,
)


class SmallCluster(EmbeddedRedisCluster):
    """A cluster of 1 or 2 masters (EmbeddedRedisCluster's `--cluster create` needs 3)."""

    def start(self, timeout_s: float = 30) -> str:
        try:
            bus_ports = self._start_nodes()
            self._assign(bus_ports[0], timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _assign(self, bus_port: int, timeout_s: float) -> None:
        nodes = [redis_sync.Redis(port=p) for p in self.ports]
        try:
            share = REDIS_CLUSTER_HASH_SLOTS // len(nodes)
            for i, node in enumerate(nodes):
                hi = REDIS_CLUSTER_HASH_SLOTS - 1 if i == len(nodes) - 1 else (i + 1) * share - 1
                node.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, hi)  # type: ignore[no-untyped-call]
                if i:
                    node.execute_command(
                        "CLUSTER",
                        "MEET",
                        "127.0.0.1",
                        self.ports[0],  # type: ignore[no-untyped-call]
                        bus_port,
                    )
            deadline = time.monotonic() + timeout_s
            while not all(_cluster_ok(n) for n in nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster of {len(nodes)} not ok within {timeout_s} s")
                time.sleep(0.05)
        finally:
            for node in nodes:
                node.close()


def _cluster_ok(node: redis_sync.Redis) -> bool:
    info: Any = node.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


@dataclass
class Layout:
    masters: int
    url: str  # FLASHGATE_REDIS_URL
    ports: list[int]  # one per master

    def owner(self, key: str) -> int:
        """The port of the master that holds `key` (its slot), by CLUSTER SLOTS."""
        if self.masters == 1:
            return self.ports[0]
        node = redis_sync.Redis(port=self.ports[0])
        try:
            slots: Any = node.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            node.close()
        slot = key_slot(key.encode())
        return next(int(master[1]) for lo, hi, master, *_ in slots if int(lo) <= slot <= int(hi))


@contextlib.contextmanager
def redis_layout(run_dir: Path, masters: int) -> Iterator[Layout]:
    """Start M masters (see the module's docstring), yield them, stop them."""
    if masters == 1:
        single = EmbeddedRedis(run_dir, name="redis-m1")
        url = single.start()
        try:
            yield Layout(1, url, [single.port])
        finally:
            single.stop()
        return
    kind = EmbeddedRedisCluster if masters >= 3 else SmallCluster
    cluster = kind(run_dir / f"m{masters}", masters=masters)
    cluster.start()
    try:
        yield Layout(masters, cluster.url, list(cluster.ports))
    finally:
        cluster.stop()


@dataclass(frozen=True)
class MasterStats:
    cpu_s: float  # used_cpu_sys + used_cpu_user (the whole server process)
    usec: dict[str, float]  # commandstats: microseconds spent per command
    calls: dict[str, float]  # commandstats: calls per command


def read_stats(port: int) -> MasterStats:
    node = redis_sync.Redis(port=port)
    try:
        cpu: Any = node.info("cpu")
        cmds: Any = node.info("commandstats")
    finally:
        node.close()
    names = {k.removeprefix("cmdstat_"): v for k, v in cmds.items()}
    return MasterStats(
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        {k: float(v["usec"]) for k, v in names.items()},
        {k: float(v["calls"]) for k, v in names.items()},
    )


def delta(before: MasterStats, after: MasterStats) -> MasterStats:
    return MasterStats(
        after.cpu_s - before.cpu_s,
        {k: v - before.usec.get(k, 0.0) for k, v in after.usec.items()},
        {k: v - before.calls.get(k, 0.0) for k, v in after.calls.items()},
    )
