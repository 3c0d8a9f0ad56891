"""Webhook delivery from the outbox: signed POSTs, retried with exponential backoff.

Rows are leased, not held: a short transaction takes due rows with FOR UPDATE SKIP LOCKED and
pushes their next_attempt_at past the HTTP timeout, so no transaction stays open during a
POST and a worker that dies mid-delivery only delays the row by one lease. Delivery is at
least once; receivers dedupe on (order_id, event).

The signing secret is stored sealed (nonce + AES-GCM ciphertext, aad = channel id) under a
data key; it is opened here, per channel, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import httpx

from core.crypto import (
    NONCE_BYTES,
    SIGNATURE_HEADER,
    DecryptionError,
    Keyring,
    open_sealed,
    sign_webhook,
)
from core.settings import Settings
from workers import metrics as worker_metrics

log = logging.getLogger(__name__)

BATCH = 20
BACKOFF_CAP_S = 3600.0

CLAIM_DUE = """
UPDATE webhook_outbox w
SET next_attempt_at = now() + make_interval(secs => $2)
FROM channels c
WHERE w.id IN (
    SELECT id FROM webhook_outbox
    WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
      AND ($3::text[] IS NULL OR channel_id = ANY($3::text[]))
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) AND c.channel_id = w.channel_id
RETURNING w.id, w.order_id, w.event, w.payload, w.attempts,
          c.channel_id, c.webhook_url, c.webhook_secret, c.webhook_dek_id
"""

RECORD_SUCCESS = """
UPDATE webhook_outbox SET delivered_at = now(), attempts = attempts + 1, last_error = NULL
WHERE id = $1
"""

RECORD_FAILURE = """
UPDATE webhook_outbox
SET attempts = attempts + 1, last_error = $2,
    next_attempt_at = now() + make_interval(secs => $3),
    failed_at = CASE WHEN attempts + 1 >= $4 THEN now() END
WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    row_id: int
    ok: bool
    error: str | None = None


def backoff_s(attempts: int, base_s: float) -> float:
    """Delay before retry number `attempts` (1-based): base * 2^(n-1), capped, with jitter."""
    delay = min(base_s * 2 ** (attempts - 1), BACKOFF_CAP_S)
    # Jitter: receivers that failed together (an outage) must not be retried in lockstep.
    return delay * random.uniform(0.8, 1.2)


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, keyring: Keyring, settings: Settings,
                 http: httpx.AsyncClient, *, channel_ids: Iterable[str] | None = None,
                 backoff_base_s: float = 1.0, batch: int = BATCH) -> None:
        self.pool = pool
        self.keyring = keyring
        self.settings = settings
        self.http = http
        self.channel_ids = sorted(channel_ids) if channel_ids is not None else None
        self.backoff_base_s = backoff_base_s
        self.batch = batch

    async def dispatch_once(self) -> int:
        """Deliver one batch of due rows; returns how many were attempted."""
        lease_s = self.settings.webhook_timeout_s * 2 + 5
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(CLAIM_DUE, self.batch, lease_s, self.channel_ids)
            secrets = {}
            for row in rows:
                if row["channel_id"] not in secrets:
                    secrets[row["channel_id"]] = await self._secret(conn, row)
        if not rows:
            return 0
        results = await asyncio.gather(*(self._post(row, secrets[row["channel_id"]])
                                         for row in rows))
        async with self.pool.acquire() as conn:
            for result, row in zip(results, rows, strict=True):
                worker_metrics.webhook(result.ok, row["attempts"] + 1,
                                       self.settings.webhook_max_attempts)
                if result.ok:
                    await conn.execute(RECORD_SUCCESS, result.row_id)
                else:
                    attempts = row["attempts"] + 1
                    await conn.execute(RECORD_FAILURE, result.row_id, result.error,
                                       backoff_s(attempts, self.backoff_base_s),
                                       self.settings.webhook_max_attempts)
                    log.warning("webhook %s for order %s to channel %s failed (attempt %d): %s",
                                row["event"], row["order_id"], row["channel_id"], attempts,
                                result.error)
        return len(rows)

    async def dispatch_due(self) -> int:
        """Deliver until nothing is due (burst mode, tests); returns attempts made."""
        total = 0
        while n := await self.dispatch_once():
            total += n
        return total

    async def _secret(self, conn: asyncpg.Connection, row: asyncpg.Record) -> bytes | None:
        sealed: bytes = row["webhook_secret"]
        try:
            dek = await self.keyring.dek(conn, row["webhook_dek_id"])
            return open_sealed(dek, sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                               row["channel_id"].encode())
        except DecryptionError as exc:
            log.error("channel %s: webhook secret does not open: %s", row["channel_id"], exc)
            return None

    async def _post(self, row: asyncpg.Record, secret: bytes | None) -> Attempt:
        if row["webhook_url"] is None:
            return Attempt(row["id"], False, "channel has no webhook_url")
        if secret is None:
            return Attempt(row["id"], False, "webhook secret unavailable")
        body: bytes = row["payload"]
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_webhook(secret, body),
            "Flashgate-Event": row["event"],
            "Flashgate-Delivery": str(row["id"]),
        }
        try:
            # No redirects: the channel registered this exact URL.
            response = await self.http.post(row["webhook_url"], content=body, headers=headers,
                                            timeout=self.settings.webhook_timeout_s)
        except httpx.HTTPError as exc:
            return Attempt(row["id"], False, type(exc).__name__)
        if 200 <= response.status_code < 300:
            return Attempt(row["id"], True)
        return Attempt(row["id"], False, f"HTTP {response.status_code}")
