"""Card keys at rest: bulk import (validated, deduplicated, encrypted) and reveal to their order.

An import is a job with a row in key_imports, committed first (`running`), so that its
progress can be read from any gateway process (GET /v1/admin/imports/{id}) while it runs. Its
keys land in one PostgreSQL transaction: the batch lands whole or not at all (`done` or
`failed`). Only after it commits does Redis stock grow, through an idempotent script keyed by
the import id; an import whose stock step failed is picked up again by the next import of that
sale (`restock_pending`).

The event loop that serves purchases never does the CPU work (#11.10): the body is parsed, and
the codes checked, fingerprinted (HMAC) and sealed (AES-GCM) in batches of `BATCH` in a worker
thread (`asyncio.to_thread`); each batch is inserted (deduplicated by fingerprint, with its
key_events) while the thread seals the next, all in the import's one transaction; between
batches the job's row records how far it got. (COPY into a temporary staging table and one
INSERT .. SELECT at the end was measured slower: 9.5 s for that last statement alone at 200k
keys, the staging table spilling out of temp_buffers.)

Deduplication compares a keyed HMAC of each code's *dedup form*: the code itself by default,
or (per import, `normalize`) with letter case and/or the separators in `SEPARATORS` ignored,
for issuers whose codes are case-insensitive. The key stored and delivered is always the code
as it was given (trimmed), its first occurrence when the import holds several forms of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from core import metrics
from core.crypto import Keyring, fingerprint, open_sealed, seal
from core.ledger import Ledger

MAX_CODE_LENGTH = 512
BATCH = 5_000  # codes per thread hand-off and per INSERT
MAX_REJECTED_LINES = 100  # line numbers kept (and returned) per import
PROGRESS_EVERY_S = 0.5  # the job's row is updated at most this often while it runs
YIELD_EVERY = 100  # codes the sealing thread handles between offers of the GIL
NORMALIZE_RULES = ("ignore_case", "ignore_separators")
SEPARATORS = "- _."


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


def parse_body(raw: bytes, content_type: str) -> list[str]:
    """The entries of a text/plain or text/csv import body (CPU-bound for a large one: call it
    in a thread). ParseError says why it can't be read."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ParseError("the body must be UTF-8") from None
    return parse_csv(text) if content_type == "text/csv" else parse_text(text)


def parse_normalize(raw: str) -> tuple[str, ...]:
    """`none` (or "") or a comma list of NORMALIZE_RULES; returns them sorted, without `none`.
    ValueError names what is wrong."""
    parts = {p.strip().lower() for p in raw.split(",") if p.strip()} - {"none"}
    unknown = parts - set(NORMALIZE_RULES)
    if unknown:
        raise ValueError(
            f"normalize: unknown rule {sorted(unknown)[0]!r}; use none or a comma "
            f"list of {', '.join(NORMALIZE_RULES)}"
        )
    return tuple(sorted(parts))


def normalize(code: str) -> str | None:
    """The code as stored, or None if it can't be a card key (empty, too long, control chars).

    `str.isprintable()` is exactly the rule: no character of Unicode category C (other) or Z
    (separator) but the ASCII space, checked in C rather than per character in Python."""
    code = code.strip()
    if not code or len(code) > MAX_CODE_LENGTH or not code.isprintable():
        return None
    return code


_NO_SEPARATORS = str.maketrans("", "", SEPARATORS)


def dedup_form(code: str, rules: Sequence[str]) -> str:
    """What duplicates are compared by: the code, with the import's rules applied."""
    if "ignore_separators" in rules:
        code = code.translate(_NO_SEPARATORS)
    if "ignore_case" in rules:
        code = code.casefold()
    return code


@dataclass
class _Staged:
    rows: list[tuple[bytes, bytes, bytes]]
    valid: int
    rejected_lines: list[int]

    def columns(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        fps, nonces, cts = zip(*self.rows, strict=True)
        return list(fps), list(nonces), list(cts)


def _seal_batch(
    entries: Sequence[str],
    start: int,
    skip_blank: bool,
    rules: Sequence[str],
    fp_key: bytes,
    dek: bytes,
    aad: bytes,
    seen: set[bytes],
) -> _Staged:
    """Check, fingerprint and seal entries[start:start+BATCH] (in a worker thread). `seen`:
    the fingerprints of this import so far; a code seen before is a duplicate, not staged."""
    rows: list[tuple[bytes, bytes, bytes]] = []
    rejected: list[int] = []
    valid = 0
    for number, raw in enumerate(entries[start : start + BATCH], start=start + 1):
        if number % YIELD_EVERY == 0:
            time.sleep(0)  # hand the GIL to the event loop now, not at the 5 ms switch interval
        if skip_blank and not raw.strip():
            continue
        code = normalize(raw)
        form = dedup_form(code, rules) if code is not None else ""
        if code is None or not form:
            rejected.append(number)
            continue
        valid += 1
        fp = fingerprint(fp_key, form)
        if fp in seen:
            continue
        seen.add(fp)
        nonce, ct = seal(dek, code.encode(), aad)
        rows.append((fp, nonce, ct))
    return _Staged(rows, valid, rejected)


NEW_IMPORT = """
INSERT INTO key_imports (sale_id, imported, duplicates, rejected, status, normalize, total_lines)
VALUES ($1, 0, 0, 0, 'running', $2, $3) RETURNING import_id
"""
PROGRESS = "UPDATE key_imports SET read_lines = $2, updated_at = now() WHERE import_id = $1"
INSERT_BATCH = """
WITH ins AS (
    INSERT INTO card_keys (sale_id, import_id, fingerprint, dek_id, nonce, ciphertext)
    SELECT $1, $2, f, $3, n, c FROM unnest($4::bytea[], $5::bytea[], $6::bytea[]) AS t(f, n, c)
    ON CONFLICT (fingerprint) DO NOTHING
    RETURNING key_id
), events AS (
    INSERT INTO key_events (key_id, event, actor, request_id, client_request_id)
    SELECT key_id, 'imported', $7, $8, $9 FROM ins
) SELECT count(*) FROM ins
"""
FINISHED = """
UPDATE key_imports SET status = 'done', imported = $2, duplicates = $3, rejected = $4,
    rejected_lines = $5, read_lines = total_lines, updated_at = now(), finished_at = now()
WHERE import_id = $1
"""
FAILED = """
UPDATE key_imports SET status = 'failed', error = $2, updated_at = now(), finished_at = now()
WHERE import_id = $1 AND status = 'running'
"""


async def start_import(pool: asyncpg.Pool, sale_id: str, rules: Sequence[str], entries: int) -> int:
    """The job's row, committed (`running`) so that its progress is readable at once."""
    import_id: int = await pool.fetchval(NEW_IMPORT, sale_id, ",".join(rules) or "none", entries)
    return import_id


async def run_import(
    pool: asyncpg.Pool,
    keyring: Keyring,
    ledger: Ledger,
    import_id: int,
    sale_id: str,
    entries: Sequence[str],
    *,
    skip_blank: bool = True,
    rules: Sequence[str] = (),
    actor: str = "admin",
    request_id: str | None = None,
    client_request_id: str | None = None,
) -> ImportResult:
    """Import the entries as the job `import_id` (see start_import); returns counts, never
    codes. Each new key gets its `imported` event in key_events, in the import's transaction.
    On any failure (cancellation included) the job is marked `failed` and nothing lands."""
    try:
        await restock_pending(pool, ledger, sale_id)
        imported, valid, rejected = await _land(
            pool,
            keyring,
            import_id,
            sale_id,
            entries,
            skip_blank,
            rules,
            actor,
            request_id,
            client_request_id,
        )
    except BaseException as exc:
        reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}"
        await asyncio.shield(_mark_failed(pool, import_id, reason))
        raise
    total = await _stock_import(pool, ledger, sale_id, import_id, imported)
    metrics.KEYS_IMPORTED.labels("imported").inc(imported)
    metrics.KEYS_IMPORTED.labels("duplicate").inc(valid - imported)
    metrics.KEYS_IMPORTED.labels("rejected").inc(len(rejected))
    return ImportResult(
        import_id, imported, valid - imported, len(rejected), total, rejected[:MAX_REJECTED_LINES]
    )


async def _land(
    pool: asyncpg.Pool,
    keyring: Keyring,
    import_id: int,
    sale_id: str,
    entries: Sequence[str],
    skip_blank: bool,
    rules: Sequence[str],
    actor: str,
    request_id: str | None,
    client_request_id: str | None,
) -> tuple[int, int, list[int]]:
    """Seal and insert batch after batch in one transaction: (imported, valid, rejected line
    numbers)."""
    seen: set[bytes] = set()
    rejected: list[int] = []
    valid = 0
    imported = 0
    async with pool.acquire() as conn, conn.transaction():
        fp_key = await keyring.fingerprint_key(conn)
        dek_id, dek = await keyring.new_dek(conn, "card_keys")
        reported = time.monotonic()

        def sealing(start: int) -> asyncio.Future[_Staged]:
            return asyncio.ensure_future(
                asyncio.to_thread(
                    _seal_batch,
                    entries,
                    start,
                    skip_blank,
                    rules,
                    fp_key,
                    dek,
                    sale_id.encode(),
                    seen,
                )
            )

        starts = range(0, len(entries), BATCH)
        pending = sealing(0) if starts else None
        try:
            for start in starts:
                assert pending is not None
                staged = await pending
                # The thread seals the next batch while this one is written.
                pending = sealing(start + BATCH) if start + BATCH < len(entries) else None
                valid += staged.valid
                rejected += staged.rejected_lines
                if staged.rows:
                    imported += await conn.fetchval(
                        INSERT_BATCH,
                        sale_id,
                        import_id,
                        dek_id,
                        *staged.columns(),
                        actor,
                        request_id,
                        client_request_id,
                    )
                if time.monotonic() - reported >= PROGRESS_EVERY_S:
                    await pool.execute(PROGRESS, import_id, min(start + BATCH, len(entries)))
                    reported = time.monotonic()
        finally:
            if pending is not None:
                pending.cancel()  # the thread finishes its batch; the result is dropped
        await conn.execute(
            FINISHED,
            import_id,
            imported,
            valid - imported,
            len(rejected),
            rejected[:MAX_REJECTED_LINES],
        )
    return imported, valid, rejected


async def _mark_failed(pool: asyncpg.Pool, import_id: int, reason: str) -> None:
    # PostgreSQL gone: the job reads as abandoned once its row goes stale (import_job)
    with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
        await pool.execute(FAILED, import_id, reason)


async def import_keys(
    pool: asyncpg.Pool,
    keyring: Keyring,
    ledger: Ledger,
    sale_id: str,
    lines: Sequence[str],
    *,
    skip_blank: bool = True,
    rules: Sequence[str] = (),
    actor: str = "admin",
    request_id: str | None = None,
    client_request_id: str | None = None,
) -> ImportResult:
    """Import codes into a sale (which must exist) and wait for it: start_import + run_import."""
    import_id = await start_import(pool, sale_id, rules, len(lines))
    return await run_import(
        pool,
        keyring,
        ledger,
        import_id,
        sale_id,
        lines,
        skip_blank=skip_blank,
        rules=rules,
        actor=actor,
        request_id=request_id,
        client_request_id=client_request_id,
    )


JOB_COLUMNS = """
import_id, sale_id, status, normalize, total_lines, read_lines, imported, duplicates, rejected,
rejected_lines, error, created_at, updated_at, finished_at
"""
ABANDON = """
UPDATE key_imports SET status = 'failed', error = 'abandoned', finished_at = now()
WHERE import_id = $1 AND status = 'running' AND updated_at < now() - make_interval(secs => $2)
"""


async def import_job(
    pool: asyncpg.Pool, import_id: int, stale_after_s: float
) -> asyncpg.Record | None:
    """An import's row. A `running` one whose row hasn't moved for `stale_after_s` lost its
    gateway (its transaction was rolled back with its connection): it is marked `failed`."""
    await pool.execute(ABANDON, import_id, stale_after_s)
    row: asyncpg.Record | None = await pool.fetchrow(
        f"SELECT {JOB_COLUMNS} FROM key_imports WHERE import_id = $1", import_id
    )
    return row


async def _stock_import(
    pool: asyncpg.Pool, ledger: Ledger, sale_id: str, import_id: int, count: int
) -> int:
    total = await ledger.add_stock(sale_id, import_id, count)
    await pool.execute("UPDATE key_imports SET stocked_at = now() WHERE import_id = $1", import_id)
    return total


async def restock_pending(pool: asyncpg.Pool, ledger: Ledger, sale_id: str) -> None:
    """Add to Redis any committed import whose stock step didn't finish (idempotent). Only
    finished ones: a running job's stock is added by the job itself, once its keys land."""
    rows = await pool.fetch(
        "SELECT import_id, imported FROM key_imports WHERE sale_id = $1 AND stocked_at IS NULL"
        " AND status = 'done'",
        sale_id,
    )
    for row in rows:
        await _stock_import(pool, ledger, sale_id, row["import_id"], row["imported"])


REVEAL = """
SELECT key_id, sale_id, dek_id, nonce, ciphertext FROM card_keys
WHERE order_id = $1 AND voided_at IS NULL ORDER BY key_id
"""

LOG_REVEALED = """
INSERT INTO key_events (key_id, order_id, event, actor, request_id, client_request_id)
SELECT unnest($2::bigint[]), $1, 'revealed', $3, $4, $5
"""


async def reveal(
    conn: asyncpg.Connection,
    keyring: Keyring,
    order_id: str,
    *,
    actor: str,
    request_id: str | None = None,
    client_request_id: str | None = None,
) -> list[str]:
    """Decrypt the keys allocated to an order (never a voided one), for that order's channel
    only, and record who saw them (key_events `revealed`: actor, the server's request id, the
    client's own (sanitized, apart: never trusted as the audit id), when; never the keys).
    Call it inside the transaction that read the order, so that a refund voiding the keys
    waits for it (core/refunds.py)."""
    rows = await conn.fetch(REVEAL, order_id)
    if rows:
        await conn.execute(
            LOG_REVEALED,
            order_id,
            [r["key_id"] for r in rows],
            actor,
            request_id,
            client_request_id or None,
        )
    out = []
    for row in rows:
        dek = await keyring.dek(conn, row["dek_id"])
        plain = open_sealed(dek, row["nonce"], row["ciphertext"], row["sale_id"].encode())
        out.append(plain.decode())
    return out
