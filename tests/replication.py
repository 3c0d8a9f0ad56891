"""A Valkey primary and its replica in the fault tests: wait for the link, stall and cut it,
fail over. Real servers (core.embedded.EmbeddedRedis), signals by PID."""

from __future__ import annotations

import os
import signal

from redis.asyncio import Redis

from core.embedded import EmbeddedRedis
from tests.conftest import until


async def replica_online(primary_url: str, timeout_s: float = 15) -> None:
    """Until the primary's first replica is online and has every write the primary has."""
    primary = Redis.from_url(primary_url, decode_responses=True)

    async def up() -> bool:
        info = await primary.info("replication")
        replica = info.get("slave0") or {}
        return (
            isinstance(replica, dict)
            and replica.get("state") == "online"
            and int(replica.get("offset", -1)) == int(info["master_repl_offset"])
        )

    try:
        await until(up, timeout_s=timeout_s)
    finally:
        await primary.aclose()


def send(server: EmbeddedRedis, sig: int) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, sig)


async def stall_and_cut_link(primary: EmbeddedRedis, replica: EmbeddedRedis) -> None:
    """The replica stops (SIGSTOP), then the primary drops its link: what the primary writes
    from now on never reaches the replica, even once it runs again."""
    send(replica, signal.SIGSTOP)
    client = Redis.from_url(primary.url, decode_responses=True)
    try:
        await client.execute_command("CLIENT", "KILL", "TYPE", "replica")
    finally:
        await client.aclose()


async def fail_over(primary: EmbeddedRedis, replica: EmbeddedRedis) -> None:
    """The primary killed (SIGKILL), the replica running again and promoted (REPLICAOF NO
    ONE), as an operator or Sentinel would."""
    assert primary.proc is not None
    send(primary, signal.SIGKILL)
    primary.proc.wait()
    send(replica, signal.SIGCONT)
    client = Redis.from_url(replica.url, decode_responses=True)
    try:
        await client.execute_command("REPLICAOF", "NO", "ONE")
    finally:
        await client.aclose()
