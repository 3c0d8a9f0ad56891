"""Verify a Flashgate webhook: Python 3.8+, standard library only. Copy `verify` into your app.

    WEBHOOK_SECRET='whsec_...' python verify_webhook.py "$FLASHGATE_SIGNATURE" < body.json

exits 0 when the Flashgate-Signature header is valid for the body, 1 when it is not.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time

TOLERANCE_S = 300  # refuse deliveries signed more than 5 minutes from now (replays)


def verify(secret: str, body: bytes, signature_header: str, now: float | None = None) -> bool:
    """secret: the channel's webhook_secret exactly as Flashgate showed it;
    body: the raw request body (bytes, before any JSON parsing);
    signature_header: the Flashgate-Signature header, `t=<unix s>,v1=<hex>[,v1=<hex>...]`."""
    timestamps, signatures = [], []
    for item in signature_header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t":
            timestamps.append(value)
        elif name == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not (timestamps[0].isascii() and timestamps[0].isdigit()):
        return False
    timestamp = int(timestamps[0])
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE_S:
        return False
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    # Several v1 while Flashgate rotates the secret: any one may match.
    return any(hmac.compare_digest(expected, sig) for sig in signatures)


if __name__ == "__main__":
    ok = verify(os.environ["WEBHOOK_SECRET"], sys.stdin.buffer.read(), sys.argv[1])
    print("valid" if ok else "INVALID")
    sys.exit(0 if ok else 1)
