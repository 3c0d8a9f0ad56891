"""Master-key rotation: rewrap every data key wrapped by an older master key under the active one.

Online and in batches. Each data_keys row names the master key that wrapped it, and a reader
(core.crypto.Keyring.dek) reads the id and the wrapped bytes of one row in one statement, so it
sees the old pair or the new one, and opens either as long as its keyring lists both keys. The
plaintext data key never changes, so nothing sealed under it (card keys, webhook secrets,
fingerprints) is touched, and in-process caches of unwrapped data keys stay right.

Order of operations (docs/RELIABILITY.md, Security):
1. deploy FLASHGATE_MASTER_KEY=<new>,<old> to every gateway and worker (new first = active);
2. run `flashgate rotate-master-key` (any number of times, even two at once: rows are taken
   FOR UPDATE SKIP LOCKED, and a row already under the active key is never selected);
3. once it reports nothing left under the old key, drop the old key from the list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from core.crypto import DecryptionError, Keyring

DEFAULT_BATCH = 500

STALE = """
SELECT dek_id, master_key_id, wrapped FROM data_keys
WHERE master_key_id <> $1
ORDER BY dek_id
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

REWRAP = """
UPDATE data_keys d SET master_key_id = $2, wrapped = r.wrapped
FROM unnest($1::text[], $3::bytea[], $4::text[]) AS r(dek_id, wrapped, old_id)
WHERE d.dek_id = r.dek_id AND d.master_key_id = r.old_id
"""

BY_MASTER = "SELECT master_key_id, count(*) AS n FROM data_keys GROUP BY 1 ORDER BY 1"


class RotationError(Exception):
    """A data key can't be rewrapped (its master key isn't configured, or it doesn't open).
    The message names the master key id, never key material; batches before it are kept."""


@dataclass
class RotationReport:
    active: str
    rewrapped: int = 0
    batches: int = 0
    by_master_key: dict[str, int] = field(default_factory=dict)  # data keys per master key


async def rotate_master_key(
    pool: asyncpg.Pool,
    keyring: Keyring,
    *,
    batch_size: int = DEFAULT_BATCH,
    after_batch: Callable[[int], Awaitable[None]] | None = None,
) -> RotationReport:
    """Rewrap, `batch_size` rows per transaction, until no row names another master key.
    `after_batch(rows)` runs after each commit (tests read keys between batches there)."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    report = RotationReport(active=keyring.active.key_id)
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(STALE, keyring.active.key_id, batch_size)
            if not rows:
                break
            rewrapped: list[bytes] = []
            for row in rows:
                try:
                    dek = keyring.unwrap(row["master_key_id"], row["wrapped"])
                except DecryptionError as exc:
                    raise RotationError(
                        f"data key {row['dek_id']} (master key {row['master_key_id']!r}): "
                        f"{exc}; list that master key after the active one"
                    ) from None
                master_id, wrapped = keyring.wrap(dek)
                if master_id != keyring.active.key_id:  # wrap() always uses the active key
                    raise RotationError("the keyring wrapped with a non-active key")
                rewrapped.append(wrapped)
            await conn.execute(
                REWRAP,
                [r["dek_id"] for r in rows],
                keyring.active.key_id,
                rewrapped,
                [r["master_key_id"] for r in rows],
            )
        report.rewrapped += len(rows)
        report.batches += 1
        if after_batch is not None:
            await after_batch(len(rows))
    report.by_master_key = {r["master_key_id"]: r["n"] for r in await pool.fetch(BY_MASTER)}
    return report
