"""Card keys at rest: bulk import (validated, deduplicated, encrypted) and reveal to their order.

An import is one PostgreSQL transaction: the batch lands whole or not at all. Only after it
commits does Redis stock grow, through an idempotent script keyed by the import id; an import
whose stock step failed is picked up again by the next import of that sale (`restock_pending`).
"""

from __future__ import annotations

import csv
import io
import unicodedata
from dataclasses import dataclass, field

import asyncpg

from core import metrics
from core.crypto import Keyring, fingerprint, open_sealed, seal
from core.ledger import Ledger

MAX_CODE_LENGTH = 512


@dataclass
class ImportResult:
    import_id: int
    imported: int
    duplicates: int
    rejected: int
    stock_total: int
    rejected_lines: list[int] = field(default_factory=list)  # 1-based; never the codes


class ParseError(ValueError):
    """The body can't be read as a list of codes (says why, never quotes a code)."""


def parse_text(body: str) -> list[str]:
    return body.splitlines()


def parse_csv(body: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(body))
    if reader.fieldnames is None or "code" not in [f.strip().lower() for f in reader.fieldnames]:
        raise ParseError("CSV needs a header row with a 'code' column")
    column = next(f for f in reader.fieldnames if f.strip().lower() == "code")
    try:
        return [row.get(column) or "" for row in reader]
    except csv.Error as exc:
        raise ParseError(f"CSV is malformed at line {reader.line_num}") from exc


def normalize(code: str) -> str | None:
    """The code as stored, or None if it can't be a card key (empty, too long, control chars)."""
    code = code.strip()
    if not code or len(code) > MAX_CODE_LENGTH:
        return None
    if any(unicodedata.category(ch)[0] in ("C", "Z") and ch != " " for ch in code):
        return None
    return code


async def import_keys(
    pool: asyncpg.Pool, keyring: Keyring, ledger: Ledger, sale_id: str, lines: list[str],
    *, skip_blank: bool = True, actor: str = "admin", request_id: str | None = None,
) -> ImportResult:
    """Import codes into a sale (which must exist); returns counts, never codes. Each new key
    gets its `imported` event in key_events, in the import's transaction."""
    await restock_pending(pool, ledger, sale_id)
    codes: list[str] = []
    rejected_lines: list[int] = []
    for number, raw in enumerate(lines, start=1):
        if skip_blank and not raw.strip():
            continue
        code = normalize(raw)
        if code is None:
            rejected_lines.append(number)
        else:
            codes.append(code)

    async with pool.acquire() as conn, conn.transaction():
        fp_key = await keyring.fingerprint_key(conn)
        unique: dict[bytes, str] = {}
        for code in codes:
            unique.setdefault(fingerprint(fp_key, code), code)
        import_id: int = await conn.fetchval(
            "INSERT INTO key_imports (sale_id, imported, duplicates, rejected)"
            " VALUES ($1, 0, 0, $2) RETURNING import_id", sale_id, len(rejected_lines),
        )
        dek_id, dek = await keyring.new_dek(conn, "card_keys")
        aad = sale_id.encode()
        fps, nonces, cts = [], [], []
        for fp, code in unique.items():
            nonce, ct = seal(dek, code.encode(), aad)
            fps.append(fp)
            nonces.append(nonce)
            cts.append(ct)
        imported: int = await conn.fetchval(
            """
            WITH ins AS (
                INSERT INTO card_keys (sale_id, import_id, fingerprint, dek_id, nonce, ciphertext)
                SELECT $1, $2, f, $3, n, c FROM unnest($4::bytea[], $5::bytea[], $6::bytea[])
                    AS t(f, n, c)
                ON CONFLICT (fingerprint) DO NOTHING
                RETURNING key_id
            ), events AS (
                INSERT INTO key_events (key_id, event, actor, request_id)
                SELECT key_id, 'imported', $7, $8 FROM ins
            ) SELECT count(*) FROM ins
            """,
            sale_id, import_id, dek_id, fps, nonces, cts, actor, request_id,
        )
        duplicates = len(codes) - imported
        await conn.execute(
            "UPDATE key_imports SET imported = $2, duplicates = $3 WHERE import_id = $1",
            import_id, imported, duplicates,
        )
    total = await _stock_import(pool, ledger, sale_id, import_id, imported)
    metrics.KEYS_IMPORTED.labels("imported").inc(imported)
    metrics.KEYS_IMPORTED.labels("duplicate").inc(duplicates)
    metrics.KEYS_IMPORTED.labels("rejected").inc(len(rejected_lines))
    return ImportResult(import_id, imported, duplicates, len(rejected_lines), total,
                        rejected_lines[:100])


async def _stock_import(
    pool: asyncpg.Pool, ledger: Ledger, sale_id: str, import_id: int, count: int
) -> int:
    total = await ledger.add_stock(sale_id, import_id, count)
    await pool.execute(
        "UPDATE key_imports SET stocked_at = now() WHERE import_id = $1", import_id
    )
    return total


async def restock_pending(pool: asyncpg.Pool, ledger: Ledger, sale_id: str) -> None:
    """Add to Redis any committed import whose stock step didn't finish (idempotent)."""
    rows = await pool.fetch(
        "SELECT import_id, imported FROM key_imports WHERE sale_id = $1 AND stocked_at IS NULL",
        sale_id,
    )
    for row in rows:
        await _stock_import(pool, ledger, sale_id, row["import_id"], row["imported"])


REVEAL = """
SELECT key_id, sale_id, dek_id, nonce, ciphertext FROM card_keys
WHERE order_id = $1 AND voided_at IS NULL ORDER BY key_id
"""

LOG_REVEALED = """
INSERT INTO key_events (key_id, order_id, event, actor, request_id)
SELECT unnest($2::bigint[]), $1, 'revealed', $3, $4
"""


async def reveal(conn: asyncpg.Connection, keyring: Keyring, order_id: str, *,
                 actor: str, request_id: str | None = None) -> list[str]:
    """Decrypt the keys allocated to an order (never a voided one), for that order's channel
    only, and record who saw them (key_events `revealed`: actor, request id, when; never the
    keys). Call it inside the transaction that read the order, so that a refund voiding the
    keys waits for it (core/refunds.py)."""
    rows = await conn.fetch(REVEAL, order_id)
    if rows:
        await conn.execute(LOG_REVEALED, order_id, [r["key_id"] for r in rows], actor,
                           request_id)
    out = []
    for row in rows:
        dek = await keyring.dek(conn, row["dek_id"])
        plain = open_sealed(dek, row["nonce"], row["ciphertext"], row["sale_id"].encode())
        out.append(plain.decode())
    return out
