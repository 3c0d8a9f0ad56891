"""`flashgate rotate-master-key`: every data key rewrapped under the new master key, online,
in batches; then readable without the old key; a second run changes nothing.

Runs in a database of its own: rewrapping the session's shared database would leave other
tests' processes (started with the old key only) unable to read it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.crypto import NONCE_BYTES, Keyring, open_sealed
from core.embedded import ServiceURLs
from core.rotation import RotationError, rotate_master_key
from core.runtime import Runtime
from core.settings import MasterKey, Secret, Settings
from tests.conftest import scratch_database
from tests.workers_fixtures import buy_and_confirm, make_channel, make_sale, revealed_codes
from workers.runner import Worker

ROOT = Path(__file__).resolve().parent.parent


def env_keys(*keys: MasterKey) -> str:
    return ",".join(f"{k.key_id}:{base64.b64encode(k.material).decode()}" for k in keys)


@pytest.fixture
async def own_runtime(service_urls: ServiceURLs, settings: Settings) -> AsyncIterator[Runtime]:
    async with scratch_database(service_urls.database_url, "flashgate_rot_") as url:
        rt = await Runtime.open(dataclasses.replace(settings, database_url=Secret(url)))
        try:
            yield rt
        finally:
            await rt.close()


async def read_everything(pool: asyncpg.Pool, keyring: Keyring) -> tuple[list[str], list[bytes]]:
    """Every card key and webhook secret, opened with a fresh keyring (nothing cached)."""
    async with pool.acquire() as conn:
        codes = []
        for r in await conn.fetch(
            "SELECT sale_id, dek_id, nonce, ciphertext FROM card_keys ORDER BY key_id"
        ):
            dek = await keyring.dek(conn, r["dek_id"])
            codes.append(
                open_sealed(dek, r["nonce"], r["ciphertext"], r["sale_id"].encode()).decode()
            )
        hooks = []
        for r in await conn.fetch(
            "SELECT channel_id, webhook_secret, webhook_dek_id FROM channels ORDER BY channel_id"
        ):
            dek = await keyring.dek(conn, r["webhook_dek_id"])
            sealed = r["webhook_secret"]
            hooks.append(
                open_sealed(
                    dek, sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], r["channel_id"].encode()
                )
            )
        await keyring.fingerprint_key(conn)
    return codes, hooks


async def by_master(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT master_key_id, count(*) AS n FROM data_keys GROUP BY 1")
    return {r["master_key_id"]: r["n"] for r in rows}


async def test_rotation_rewraps_everything_online_and_only_once(own_runtime: Runtime) -> None:
    rt = own_runtime
    old = rt.settings.master_keys
    new = MasterKey("mk-new", secrets.token_bytes(32))
    channel, _ = await make_channel(rt, webhook_url="http://127.0.0.1:9/h")
    sales = [await make_sale(rt, keys=5) for _ in range(3)]  # one data key per import
    delivered = [await buy_and_confirm(rt, sale, channel) for sale, _ in sales]
    await Worker(rt, sale_ids=[s for s, _ in sales]).run_burst()
    codes, hooks = await read_everything(rt.pool, Keyring(old))
    assert sorted(codes) == sorted(c for _, cs in sales for c in cs)
    async with rt.pool.acquire() as conn:
        fingerprint = await rt.keyring.fingerprint_key(conn)
    stale = sum((await by_master(rt.pool)).values())
    assert stale >= 5 and set(await by_master(rt.pool)) == {old[0].key_id}

    # The CLI, with the new key first and the old one listed, one data key per batch. Meanwhile
    # a gateway (a keyring listing both) reads every key between the batches.
    env = {
        **os.environ,
        "FLASHGATE_DATABASE_URL": rt.settings.database_url.reveal(),
        "FLASHGATE_MASTER_KEY": env_keys(new, *old),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "rotate-master-key",
        "--batch-size",
        "1",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    reads = 0
    while proc.returncode is None:
        assert await read_everything(rt.pool, Keyring((new, *old))) == (codes, hooks)
        reads += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.01)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["rewrapped"] == report["batches"] == stale
    assert report["data_keys_by_master_key"] == {"mk-new": stale}
    assert reads >= 1

    # Everything opens with the new keyring, and then with the new key alone.
    assert await read_everything(rt.pool, Keyring((new, *old))) == (codes, hooks)
    alone = Keyring((new,))
    assert await read_everything(rt.pool, alone) == (codes, hooks)
    async with rt.pool.acquire() as conn:
        assert await alone.fingerprint_key(conn) == fingerprint  # dedup keeps working
    for order in delivered:
        assert len(await revealed_codes(dataclasses.replace(rt, keyring=alone), order)) == 1

    # A second run changes nothing.
    wrapped_before = await rt.pool.fetch("SELECT dek_id, wrapped FROM data_keys ORDER BY 1")
    again = await rotate_master_key(rt.pool, Keyring((new, *old)), batch_size=2)
    assert (again.rewrapped, again.batches) == (0, 0)
    assert await rt.pool.fetch("SELECT dek_id, wrapped FROM data_keys ORDER BY 1") == wrapped_before


async def test_rotation_refuses_a_data_key_whose_master_key_is_missing(
    own_runtime: Runtime,
) -> None:
    rt = own_runtime
    await make_sale(rt, keys=1)
    stranger = Keyring((MasterKey("mk-other", secrets.token_bytes(32)),))
    with pytest.raises(RotationError, match=rt.settings.master_keys[0].key_id):
        await rotate_master_key(rt.pool, stranger)
    assert set(await by_master(rt.pool)) == {rt.settings.master_keys[0].key_id}
