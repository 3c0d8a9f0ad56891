"""PostgreSQL: the pool, and the migrations in migrations/*.sql applied in order, once.

Migrations run under an advisory lock, so several processes starting together apply each
file exactly once.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

_MIGRATIONS_LOCK = 0x466C617368  # "Flash"


def migration_files() -> list[tuple[str, str]]:
    root = resources.files("migrations")
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), root.joinpath(name).read_text()) for name in names]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATIONS_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATIONS_LOCK)
    return applied_now


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = (
        {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        if exists
        else set()
    )
    return [v for v, _ in migration_files() if v not in done]


async def create_pool(dsn: str, max_size: int = 10, timeout_s: float = 30.0) -> asyncpg.Pool:
    """`timeout_s` bounds connecting and every command on the client side (a stalled
    connection raises TimeoutError) and is the server's statement_timeout."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        command_timeout=timeout_s,
        timeout=timeout_s,
        # Server-side statement timeout: a slow query becomes an error, not a hang.
        server_settings={
            "statement_timeout": str(int(timeout_s * 1000)),
            "application_name": "flashgate",
        },
    )
    if pool is None:  # asyncpg types the result as Optional
        raise RuntimeError("asyncpg returned no pool")
    return pool
