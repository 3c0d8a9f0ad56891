"""Migrations as the k8s manifests run them: `flashgate migrate` in the init container of every
gateway and worker pod, so a rollout starts several at once against one database. Against the
harness's real PostgreSQL: they all succeed, each migration is applied exactly once, and a later
rollout's init containers find nothing to do."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys

import asyncpg

from core.db import migration_files
from core.embedded import ServiceURLs
from tests.conftest import ADMIN_TOKEN, scratch_database

PODS = 4  # init containers starting together (a scale-up or a rollout's surge)


async def migrate_like_an_init_container(env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "migrate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode()


async def test_init_containers_starting_together_apply_each_migration_once(
    service_urls: ServiceURLs,
) -> None:
    versions = [v for v, _ in migration_files()]
    async with scratch_database(service_urls.database_url, "flashgate_k8s_") as url:
        env = {
            **os.environ,
            "FLASHGATE_REDIS_URL": service_urls.redis_url,
            "FLASHGATE_DATABASE_URL": url,
            "FLASHGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        }
        results = await asyncio.gather(*(migrate_like_an_init_container(env) for _ in range(PODS)))
        assert [rc for rc, _ in results] == [0] * PODS, results
        outputs = sorted(out.strip() for _, out in results)
        assert outputs == sorted(
            ["applied: " + ", ".join(versions)] + ["up to date"] * (PODS - 1)
        ), outputs
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        assert [r["version"] for r in rows] == versions
        # the next rollout (a new image, the same schema): its init containers pass at once
        assert await migrate_like_an_init_container(env) == (0, "up to date\n")
