"""Secrets: envelope encryption of card keys, keyed fingerprints, API keys, webhook signatures.

- Card keys are sealed with AES-256-GCM under a data key (DEK); each DEK is wrapped by the
  active master key (also AES-256-GCM) and stored with that master key's id, so rotating the
  master key rewraps DEKs only. The sale id is bound in as associated data: a ciphertext moved
  to another sale fails to open.
- Duplicates are found by HMAC-SHA256 under a dedicated fingerprint DEK, never by plaintext.
- API keys are random 256-bit tokens stored as SHA-256 (a fast hash is right for a token with
  that much entropy); the admin token is compared in constant time.
- Webhooks are signed with the channel's secret (HMAC-SHA256), in Flashgate's header and in
  the Standard Webhooks headers (docs/WEBHOOKS.md).

`cryptography` (pyca) provides the primitives: AESGCM is its audited AEAD API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Sequence

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.ids import ulid
from core.settings import MasterKey

NONCE_BYTES = 12
FINGERPRINT_DEK_ID = "fingerprint-v1"


class DecryptionError(Exception):
    """A sealed value could not be opened (wrong key, or tampered). Says nothing about the value."""


class Keyring:
    """Master keys (first = active) and the data keys they wrap, unwrapped once and cached."""

    def __init__(self, master_keys: tuple[MasterKey, ...]) -> None:
        self._masters = {k.key_id: k for k in master_keys}
        self.active = master_keys[0]
        self._deks: dict[str, bytes] = {}

    # -- wrapping -----------------------------------------------------------------------
    def wrap(self, dek: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return self.active.key_id, nonce + AESGCM(self.active.material).encrypt(nonce, dek, b"dek")

    def unwrap(self, master_key_id: str, wrapped: bytes) -> bytes:
        master = self._masters.get(master_key_id)
        if master is None:
            raise DecryptionError(f"master key {master_key_id!r} is not configured")
        try:
            nonce, sealed = wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:]
            return AESGCM(master.material).decrypt(nonce, sealed, b"dek")
        except InvalidTag as exc:
            raise DecryptionError("data key does not open with its master key") from exc

    # -- data keys in PostgreSQL ----------------------------------------------------------
    async def new_dek(self, conn: asyncpg.Connection, purpose: str) -> tuple[str, bytes]:
        dek, dek_id = AESGCM.generate_key(bit_length=256), "dek_" + ulid().lower()
        master_id, wrapped = self.wrap(dek)
        await conn.execute(
            "INSERT INTO data_keys (dek_id, purpose, master_key_id, wrapped) VALUES ($1,$2,$3,$4)",
            dek_id,
            purpose,
            master_id,
            wrapped,
        )
        self._deks[dek_id] = dek
        return dek_id, dek

    async def dek(self, conn: asyncpg.Connection, dek_id: str) -> bytes:
        cached = self._deks.get(dek_id)
        if cached is not None:
            return cached
        row = await conn.fetchrow(
            "SELECT master_key_id, wrapped FROM data_keys WHERE dek_id = $1", dek_id
        )
        if row is None:
            raise DecryptionError(f"unknown data key {dek_id!r}")
        dek = self.unwrap(row["master_key_id"], row["wrapped"])
        self._deks[dek_id] = dek
        return dek

    async def fingerprint_key(self, conn: asyncpg.Connection) -> bytes:
        """The one DEK used for keyed fingerprints (created by the first caller, race-free)."""
        if FINGERPRINT_DEK_ID in self._deks:
            return self._deks[FINGERPRINT_DEK_ID]
        master_id, wrapped = self.wrap(AESGCM.generate_key(bit_length=256))
        await conn.execute(
            "INSERT INTO data_keys (dek_id, purpose, master_key_id, wrapped)"
            " VALUES ($1, 'fingerprint', $2, $3) ON CONFLICT (dek_id) DO NOTHING",
            FINGERPRINT_DEK_ID,
            master_id,
            wrapped,
        )
        return await self.dek(conn, FINGERPRINT_DEK_ID)


# -- sealing values ---------------------------------------------------------------------
def seal(dek: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(dek).encrypt(nonce, plaintext, aad)


def open_sealed(dek: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(dek).decrypt(nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise DecryptionError("sealed value does not open") from exc


def fingerprint(key: bytes, code: str) -> bytes:
    return hmac.new(key, code.encode(), hashlib.sha256).digest()


# -- API keys and tokens ------------------------------------------------------------------
def new_api_key() -> str:
    return "fgk_" + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def tokens_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


# -- webhook signatures -------------------------------------------------------------------
# Two schemes, both HMAC-SHA256 over the same delivery (docs/WEBHOOKS.md):
# - Flashgate-Signature: `t=<unix s>,v1=<hex>[,v1=<hex>...]` over "<t>." + body, keyed with the
#   webhook_secret string exactly as the API showed it (its UTF-8 bytes);
# - Standard Webhooks (standardwebhooks.com): webhook-id, webhook-timestamp and
#   `webhook-signature: v1,<base64>[ v1,<base64>...]` over "<id>.<t>." + body, keyed with the
#   bytes after `whsec_` (base64-decoded), as that spec's libraries do.
# Several v1 values: one per secret that is valid now (a rotated-out secret signs beside the
# new one during the overlap). The channel keeps 32 random bytes; both keys come from them.
SIGNATURE_HEADER = "Flashgate-Signature"
EVENT_HEADER = "Flashgate-Event"
DELIVERY_HEADER = "Flashgate-Delivery"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
REPLAY_WINDOW_S = 300
SECRET_PREFIX = "whsec_"
# How a channel's secret was shown: `whsec` (`whsec_` + base64) since the Standard Webhooks
# headers; `b64url` (base64url, unpadded) for channels created before. Stored per channel.
SECRET_FORMS = ("whsec", "b64url")


def new_webhook_secret() -> bytes:
    return secrets.token_bytes(32)


def show_webhook_secret(raw: bytes, form: str = "whsec") -> str:
    """The webhook_secret string the API shows for the stored bytes."""
    if form == "b64url":
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign_webhook(secret: str | Sequence[str], body: bytes, timestamp: int | None = None) -> str:
    """The Flashgate-Signature value: one `v1=` per secret (each as the API showed it)."""
    keys = [secret] if isinstance(secret, str) else list(secret)
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + body
    macs = (hmac.new(k.encode(), signed, hashlib.sha256).hexdigest() for k in keys)
    return ",".join([f"t={ts}", *(f"v1={mac}" for mac in macs)])


def verify_webhook(
    secret: str | bytes,
    body: bytes,
    header: str,
    *,
    now: int | None = None,
    window_s: int = REPLAY_WINDOW_S,
) -> bool:
    """For receivers: one of the header's v1 signatures matches the webhook_secret (the string
    as shown, or its UTF-8 bytes) and its timestamp is within `window_s` of now."""
    key = secret.encode() if isinstance(secret, str) else secret
    stamps, sigs = [], []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            stamps.append(value)
        elif name == "v1":
            sigs.append(value)
    if len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit():
        return False
    ts = int(stamps[0])
    now = int(time.time()) if now is None else now
    if abs(now - ts) > window_s:
        return False
    expected = hmac.new(key, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    # Every candidate compared (no early exit), each in constant time.
    return sum(hmac.compare_digest(expected, sig) for sig in sigs) > 0


def sign_standard(raw_secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value: `v1,<base64>` per secret, spaced."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
        for k in raw_secrets
    )
