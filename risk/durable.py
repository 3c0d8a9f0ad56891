"""The risk lists and the sales' config overrides, kept in PostgreSQL as well as in Redis.

Redis is what the hot path reads (risk/lists.py, risk/config.py); PostgreSQL is the record
that survives Redis. An admin change is written to PostgreSQL first, then to Redis; a change
whose Redis write fails after the commit is answered with an error and, retried, is a no-op in
PostgreSQL that applies in Redis. After Redis lost its data (a restart without persistence, a
failover that lost writes), `flashgate reconcile` compares the two and writes PostgreSQL's
state back (`sync`): a block list that vanished with Redis would let a banned farm back in
at the next sale. While PostgreSQL is unreachable a change is refused (503, nothing written),
rather than held by Redis alone.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from core.keys import Keys
from risk.lists import ACTIONS, KINDS

ADD_ENTRIES = """
INSERT INTO risk_list_entries (action, kind, entry)
SELECT $1, $2, e FROM unnest($3::text[]) AS e
ON CONFLICT DO NOTHING
"""
REMOVE_ENTRIES = """
DELETE FROM risk_list_entries WHERE action = $1 AND kind = $2 AND entry = ANY($3::text[])
"""
SAVE_OVERRIDE = """
INSERT INTO risk_overrides (sale_id, override) VALUES ($1, $2::jsonb)
ON CONFLICT (sale_id) DO UPDATE SET override = EXCLUDED.override, updated_at = now()
"""


async def save_list_change(
    pool: asyncpg.Pool, action: str, kind: str, entries: list[str], *, add: bool
) -> None:
    """Record an add or remove of already normalized entries (risk.lists.normalize)."""
    if entries:
        await pool.execute(ADD_ENTRIES if add else REMOVE_ENTRIES, action, kind, entries)


async def save_override(pool: asyncpg.Pool, sale_id: str, override: dict[str, Any]) -> None:
    """Record a validated override; an empty one removes the sale's."""
    if override:
        await pool.execute(SAVE_OVERRIDE, sale_id, msgspec.json.encode(override).decode())
    else:
        await pool.execute("DELETE FROM risk_overrides WHERE sale_id = $1", sale_id)


async def _lists(pool: asyncpg.Pool) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {(a, k): set() for a in ACTIONS for k in KINDS}
    for r in await pool.fetch("SELECT action, kind, entry FROM risk_list_entries"):
        out[(r["action"], r["kind"])].add(r["entry"])
    return out


async def _override(pool: asyncpg.Pool, sale_id: str) -> dict[str, Any]:
    raw = await pool.fetchval(
        "SELECT override::text FROM risk_overrides WHERE sale_id = $1", sale_id
    )
    doc: dict[str, Any] = msgspec.json.decode(raw) if raw else {}
    return doc


async def sync_lists(pool: asyncpg.Pool, redis: Redis, keys: Keys, *, write: bool) -> int:
    """Compare every list in Redis with PostgreSQL: returns the entries missing from or extra
    in Redis; with `write`, Redis is first made PostgreSQL's copy (the stale lists replaced
    whole in one MULTI, and the lists' version bumped so every gateway reloads them). The
    lists are global: a periodic job compares them once, not once per sale."""
    wanted = await _lists(pool)
    async with redis.pipeline(transaction=False) as pipe:  # one slot: the {risk} tag
        for action, kind in wanted:
            pipe.smembers(keys.risk_list(action, kind))
        members = await pipe.execute()
    have = {pair: {str(m) for m in got} for pair, got in zip(wanted, members, strict=True)}
    stale = [pair for pair in wanted if have[pair] != wanted[pair]]
    if write and stale:
        async with redis.pipeline(transaction=True) as tx:
            for action, kind in stale:
                key = keys.risk_list(action, kind)
                tx.delete(key)
                if wanted[(action, kind)]:
                    tx.sadd(key, *sorted(wanted[(action, kind)]))
            tx.incr(keys.risk_lists_version())
            await tx.execute()
    return sum(len(have[p] ^ wanted[p]) for p in stale)


async def sync_override(
    pool: asyncpg.Pool, redis: Redis, keys: Keys, sale_id: str, *, write: bool
) -> int:
    """Compare one sale's override in Redis with PostgreSQL: 1 if they differ, else 0; with
    `write`, Redis is first set to PostgreSQL's."""
    raw = await redis.get(keys.risk_config(sale_id))  # the sale's slot
    current = msgspec.json.decode(raw) if raw else {}
    override = await _override(pool, sale_id)
    if current == override:
        return 0
    if write:
        if override:
            await redis.set(keys.risk_config(sale_id), msgspec.json.encode(override))
        else:
            await redis.delete(keys.risk_config(sale_id))
    return 1


async def sync(
    pool: asyncpg.Pool, redis: Redis, keys: Keys, sale_id: str, *, write: bool
) -> dict[str, int]:
    """Both, for `flashgate reconcile SALE`: {"risk_list_entries": n, "risk_override": 0 | 1},
    the drift found before any write."""
    return {
        "risk_list_entries": await sync_lists(pool, redis, keys, write=write),
        "risk_override": await sync_override(pool, redis, keys, sale_id, write=write),
    }
