"""Proof-of-work challenges in the ALTCHA v2 format (the `altcha` library), bound to a request.

A challenge is stateless: its parameters (random nonce and salt, expiry, and `data` naming the
sale, channel, user and device it was issued for) are HMAC-signed, so any gateway holding the
secret can verify a solution without storing the challenge. It is issued in ALTCHA's
deterministic mode: the server picks the counter below `work`, the client must find it (on
average work/2 SHA-256 hashes), and the server verifies with one HMAC (`keySignature`),
whatever the work was.
Because the format is ALTCHA's, a storefront page can show the ALTCHA widget instead of a
bespoke solver; risk/solver.py solves it in Python for tests, the demo and load tests.

Single use is enforced by the caller: the challenge id goes to lua/risk_features.lua, which
marks it used (SET NX) in the same round trip as the features.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

import altcha
import msgspec

from risk.signals import Signals

ALGORITHM = "SHA-256"


class Verified(msgspec.Struct, frozen=True):
    challenge_id: str | None  # set when the solution is genuine, bound and unexpired
    problem: str | None  # why it was refused: solution_invalid|expired|foreign
    expires_at: int = 0  # unix seconds, when genuine


def _binding(sig: Signals) -> dict[str, str]:
    # The channel too: user ids are namespaced per channel (channel B's "u-1" is another user).
    return {
        "sale": sig.sale_id,
        "channel": sig.channel_id,
        "user": sig.user_id,
        "device": sig.device_id,
    }


class Challenges:
    def __init__(self, secret: bytes) -> None:
        # Two keys from one secret: one signs the parameters, one signs the expected answer.
        self._params_key = hmac.new(secret, b"flashgate/pow/params", hashlib.sha256).digest()
        self._answer_key = hmac.new(secret, b"flashgate/pow/answer", hashlib.sha256).digest()

    def issue(self, sig: Signals, work: int, ttl_s: int, now_s: float) -> dict[str, Any]:
        """A challenge (ALTCHA v2 JSON) for this sale, channel, user and device."""
        challenge = altcha.create_challenge(
            ALGORITHM,
            1,
            counter=secrets.randbelow(max(1, work)),
            counter_mode="uint32",
            expires_at=int(now_s) + ttl_s,
            data=_binding(sig),
            hmac_secret=self._params_key,
            hmac_key_secret=self._answer_key,
        )
        out: dict[str, Any] = challenge.to_dict()
        return out

    def verify(self, payload: str, sig: Signals, now_s: float) -> Verified:
        """Check a solution (base64 ALTCHA payload) presented with this request."""
        try:
            doc = json.loads(base64.b64decode(payload, validate=True))
            parsed = altcha.Payload.from_dict(doc)
        except (ValueError, binascii.Error, KeyError, TypeError, AttributeError):
            return Verified(None, "solution_invalid")
        result = altcha.verify_solution(parsed, self._params_key, hmac_key_secret=self._answer_key)
        if result.expired:
            return Verified(None, "solution_expired")
        if not result.verified:
            return Verified(None, "solution_invalid")
        params = parsed.challenge.parameters
        # Signed, so these are ours; checked against our clock too (tests run a fixed clock).
        if not isinstance(params.expires_at, int) or params.expires_at < now_s:
            return Verified(None, "solution_expired")
        if params.data != _binding(sig):
            return Verified(None, "solution_foreign")
        signature = parsed.challenge.signature or ""
        return Verified(signature[:32], None, params.expires_at)
