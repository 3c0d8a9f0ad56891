"""A channel's webhook secret: rotation with an overlap window (docs/WEBHOOKS.md, "Rotation").

The new secret is shown once, like the first. Until `webhook_prev_until` the rotated-out one
keeps signing beside it (a second `v1` in each signature header), so a receiver can deploy the
new secret at its own pace without rejecting a delivery. Rotating again during an overlap
drops the oldest secret at once: at most two sign. Both are sealed under the channel's data
key with the channel id as associated data, exactly like the first secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from core.crypto import Keyring, new_webhook_secret, seal, show_webhook_secret

LOCK_CHANNEL = "SELECT webhook_dek_id FROM channels WHERE channel_id = $1 FOR UPDATE"

ROTATE = """
UPDATE channels SET
    webhook_prev_secret = webhook_secret,
    webhook_prev_form = webhook_secret_form,
    webhook_prev_until = now() + make_interval(secs => $3),
    webhook_secret = $2,
    webhook_secret_form = 'whsec'
WHERE channel_id = $1
RETURNING webhook_prev_until
"""


@dataclass(frozen=True, slots=True)
class Rotated:
    webhook_secret: str  # the new secret, as shown (whsec_...)
    previous_valid_until: datetime  # the old one signs until then


async def rotate(
    conn: asyncpg.Connection, keyring: Keyring, channel_id: str, overlap_s: int
) -> Rotated | None:
    """A new secret for the channel (None: no such channel). Runs in one transaction."""
    async with conn.transaction():
        dek_id = await conn.fetchval(LOCK_CHANNEL, channel_id)
        if dek_id is None:
            return None
        raw = new_webhook_secret()
        nonce, sealed = seal(await keyring.dek(conn, dek_id), raw, channel_id.encode())
        until: datetime = await conn.fetchval(ROTATE, channel_id, nonce + sealed, overlap_s)
    return Rotated(show_webhook_secret(raw), until)
