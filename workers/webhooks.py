"""Webhook delivery from the outbox: signed POSTs, retried with exponential backoff.

Rows are leased, not held: a short transaction takes due rows with FOR UPDATE SKIP LOCKED and
pushes their next_attempt_at past the HTTP timeout, so no transaction stays open during a
POST and a worker that dies mid-delivery only delays the row by one lease. Delivery is at
least once; receivers dedupe on the delivery id (or on (order_id, event)).

Each POST goes to the address core.egress checked, resolved once, never to a re-resolved
host (no SSRF through the channel's URL, no DNS rebinding); redirects are not followed and the
response body is never read. `last_error` holds a coarse category (`timeout`,
`connect_failed`, `http_503`, `blocked_address`...), never exception text: it must not tell a
channel what answers on a port.

The signing secrets are stored sealed (nonce + AES-GCM ciphertext, aad = channel id) under a
data key; they are opened here, per channel, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import httpx

from core import egress
from core.crypto import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    NONCE_BYTES,
    SIGNATURE_HEADER,
    STANDARD_ID_HEADER,
    STANDARD_SIGNATURE_HEADER,
    STANDARD_TIMESTAMP_HEADER,
    DecryptionError,
    Keyring,
    open_sealed,
    show_webhook_secret,
    sign_standard,
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
          c.channel_id, c.webhook_url, c.webhook_secret, c.webhook_dek_id,
          c.webhook_secret_form,
          CASE WHEN c.webhook_prev_until > now() THEN c.webhook_prev_secret END AS prev_secret,
          c.webhook_prev_form
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


# `last_error` categories (besides core.egress' blocked_url, blocked_address, dns_failed, and
# http_<status>): coarse on purpose, see the module doc.
NO_URL = "no_webhook_url"
NO_SECRET = "secret_unavailable"
TIMEOUT = "timeout"
CONNECT_FAILED = "connect_failed"


@dataclass(frozen=True, slots=True)
class Attempt:
    row_id: int
    ok: bool
    error: str | None = None
    detail: str | None = None  # for the operator's log only (an exception's class name)


@dataclass(frozen=True, slots=True)
class ChannelSecret:
    """A secret that signs now: the raw bytes and the form the API showed them in."""

    raw: bytes
    form: str

    @property
    def shown(self) -> str:
        return show_webhook_secret(self.raw, self.form)


def backoff_s(attempts: int, base_s: float) -> float:
    """Delay before retry number `attempts` (1-based): base * 2^(n-1), capped, with jitter."""
    delay = min(base_s * 2.0 ** (attempts - 1), BACKOFF_CAP_S)
    # Jitter: receivers that failed together (an outage) must not be retried in lockstep.
    return delay * random.uniform(0.8, 1.2)


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        keyring: Keyring,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        channel_ids: Iterable[str] | None = None,
        backoff_base_s: float = 1.0,
        batch: int = BATCH,
    ) -> None:
        self.pool = pool
        self.keyring = keyring
        self.settings = settings
        self.http = http
        self.allow = egress.AllowList.from_settings(settings)
        self.channel_ids = sorted(channel_ids) if channel_ids is not None else None
        self.backoff_base_s = backoff_base_s
        self.batch = batch

    async def dispatch_once(self) -> int:
        """Deliver one batch of due rows; returns how many were attempted."""
        lease_s = self.settings.webhook_timeout_s * 2 + 5
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(CLAIM_DUE, self.batch, lease_s, self.channel_ids)
            secrets: dict[str, list[ChannelSecret] | None] = {}
            for row in rows:
                if row["channel_id"] not in secrets:
                    secrets[row["channel_id"]] = await self._secret(conn, row)
        if not rows:
            return 0
        results = await asyncio.gather(
            *(self._post(row, secrets[row["channel_id"]]) for row in rows)
        )
        async with self.pool.acquire() as conn:
            for result, row in zip(results, rows, strict=True):
                worker_metrics.webhook(
                    result.ok, row["attempts"] + 1, self.settings.webhook_max_attempts
                )
                if result.ok:
                    await conn.execute(RECORD_SUCCESS, result.row_id)
                else:
                    attempts = row["attempts"] + 1
                    await conn.execute(
                        RECORD_FAILURE,
                        result.row_id,
                        result.error,
                        backoff_s(attempts, self.backoff_base_s),
                        self.settings.webhook_max_attempts,
                    )
                    log.warning(
                        "webhook %s for order %s to channel %s failed (attempt %d): %s%s",
                        row["event"],
                        row["order_id"],
                        row["channel_id"],
                        attempts,
                        result.error,
                        f" ({result.detail})" if result.detail else "",
                    )
        return len(rows)

    async def dispatch_due(self) -> int:
        """Deliver until nothing is due (burst mode, tests); returns attempts made."""
        total = 0
        while n := await self.dispatch_once():
            total += n
        return total

    async def _secret(
        self, conn: asyncpg.Connection, row: asyncpg.Record
    ) -> list[ChannelSecret] | None:
        """The channel's current secret, then the rotated-out one while it still signs."""
        sealed = [(row["webhook_secret"], row["webhook_secret_form"])]
        if row["prev_secret"] is not None:
            sealed.append((row["prev_secret"], row["webhook_prev_form"]))
        aad = row["channel_id"].encode()
        try:
            dek = await self.keyring.dek(conn, row["webhook_dek_id"])
            return [
                ChannelSecret(open_sealed(dek, s[:NONCE_BYTES], s[NONCE_BYTES:], aad), form)
                for s, form in sealed
            ]
        except DecryptionError as exc:
            log.error("channel %s: webhook secret does not open: %s", row["channel_id"], exc)
            return None

    async def _post(self, row: asyncpg.Record, secrets: list[ChannelSecret] | None) -> Attempt:
        if row["webhook_url"] is None:
            return Attempt(row["id"], False, NO_URL)
        if not secrets:
            return Attempt(row["id"], False, NO_SECRET)
        timeout = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout):
                target = await egress.pin(row["webhook_url"], self.allow)
        except egress.Refused as exc:
            return Attempt(row["id"], False, exc.category, str(exc))
        except TimeoutError:
            return Attempt(row["id"], False, TIMEOUT, "DNS")
        body: bytes = row["payload"]
        delivery_id, now = str(row["id"]), int(time.time())
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_webhook([s.shown for s in secrets], body, now),
            EVENT_HEADER: row["event"],
            DELIVERY_HEADER: delivery_id,
            STANDARD_ID_HEADER: delivery_id,
            STANDARD_TIMESTAMP_HEADER: str(now),
            STANDARD_SIGNATURE_HEADER: sign_standard(
                [s.raw for s in secrets], delivery_id, now, body
            ),
        }
        extensions = {}
        if target.sni_hostname:
            extensions["sni_hostname"] = target.sni_hostname
            # The pool keys connections by address, not by server name: a kept-alive TLS
            # connection to a shared address (a CDN) must not carry another host's webhook.
            headers["Connection"] = "close"
        try:
            # No redirects (a 3xx is a failure): the channel registered this exact URL. The
            # response body is never read.
            async with self.http.stream(
                "POST",
                target.url,
                content=body,
                headers=headers,
                timeout=timeout,
                follow_redirects=False,
                extensions=extensions,
            ) as response:
                status = response.status_code
        except httpx.TimeoutException as exc:
            return Attempt(row["id"], False, TIMEOUT, type(exc).__name__)
        except httpx.HTTPError as exc:
            return Attempt(row["id"], False, CONNECT_FAILED, type(exc).__name__)
        if 200 <= status < 300:
            return Attempt(row["id"], True)
        return Attempt(row["id"], False, f"http_{status}")
