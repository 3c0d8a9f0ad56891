"""Settings validation and the crypto helpers (no services needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from core.crypto import (
    Keyring,
    open_sealed,
    seal,
    show_webhook_secret,
    sign_webhook,
    verify_webhook,
)
from core.settings import ConfigError, Settings, parse_master_keys

KEY = base64.b64encode(b"k" * 32).decode()
BASE = {
    "FLASHGATE_REDIS_URL": "redis://127.0.0.1:1/0",
    "FLASHGATE_DATABASE_URL": "postgresql://u:secret-pw@127.0.0.1:1/db",
    "FLASHGATE_ADMIN_TOKEN": "admin-secret-PzYMKqsw4VRfQBGEqMJsrtniqKJ2Uv8TzQovz_N_1Ms",
    "FLASHGATE_MASTER_KEY": KEY,
}


def test_defaults_and_secrets_never_print() -> None:
    s = Settings.from_env(BASE)
    assert s.worker_batch_size == 1000 and s.key_prefix == "fg"
    text = repr(s) + str(s.database_url) + str(s.admin_token)
    assert "secret-pw" not in text and "admin-secret" not in text and KEY not in text


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("FLASHGATE_REDIS_URL", "", "FLASHGATE_REDIS_URL is required"),
        ("FLASHGATE_MASTER_KEY", "not base64!", "FLASHGATE_MASTER_KEY: not valid base64"),
        ("FLASHGATE_MASTER_KEY", base64.b64encode(b"short").decode(), "32 bytes"),
        ("FLASHGATE_WORKER_BATCH_SIZE", "many", "expected an integer"),
        ("FLASHGATE_WORKER_BATCH_SIZE", "0", "between 1 and 10000"),
        ("FLASHGATE_REDIS_TIMEOUT_S", "fast", "expected a number"),
        ("FLASHGATE_KEY_PREFIX", "a{b}", "FLASHGATE_KEY_PREFIX"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env({**BASE, name: value})


def test_rotation_keeps_old_data_keys_readable() -> None:
    old, new = os.urandom(32), os.urandom(32)
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    before = Keyring(parse_master_keys(f"v1:{b64(old)}"))
    master_id, wrapped = before.wrap(b"d" * 32)
    after = Keyring(parse_master_keys(f"v2:{b64(new)},v1:{b64(old)}"))
    assert after.active.key_id == "v2" and master_id == "v1"
    assert after.unwrap(master_id, wrapped) == b"d" * 32
    assert after.wrap(b"d" * 32)[0] == "v2"


def test_sealed_values_are_bound_to_their_sale() -> None:
    dek = os.urandom(32)
    nonce, ct = seal(dek, b"CODE-1", b"sale-a")
    assert open_sealed(dek, nonce, ct, b"sale-a") == b"CODE-1"
    with pytest.raises(Exception, match="does not open"):
        open_sealed(dek, nonce, ct, b"sale-b")


def test_webhook_signature_and_replay_window() -> None:
    secret, body = show_webhook_secret(os.urandom(32)), b'{"event":"order.delivered"}'
    header = sign_webhook(secret, body, timestamp=1_000)
    assert verify_webhook(secret, body, header, now=1_100)
    assert verify_webhook(secret.encode(), body, header, now=1_100)
    assert not verify_webhook(secret, body, header, now=1_000 + 301)  # replayed too late
    assert not verify_webhook(secret, body + b" ", header, now=1_000)
    assert not verify_webhook(show_webhook_secret(os.urandom(32)), body, header, now=1_000)
    assert not verify_webhook(secret, body, "garbage", now=1_000)


def test_webhook_secret_is_the_hmac_key_as_shown() -> None:
    """#10.4: HMAC-SHA256 keyed with the webhook_secret string the API shows, as documented."""
    secret, body = show_webhook_secret(os.urandom(32)), b'{"event":"order.delivered"}'
    mac = hmac.new(secret.encode(), b"1000." + body, hashlib.sha256).hexdigest()
    assert sign_webhook(secret, body, timestamp=1_000) == f"t=1000,v1={mac}"
    assert verify_webhook(secret, body, f"t=1000,v1={mac}", now=1_000)
    # A channel created before the whsec_ form keeps its base64url string as its key.
    legacy = show_webhook_secret(os.urandom(32), "b64url")
    assert verify_webhook(legacy, body, sign_webhook(legacy, body), now=None)


def test_webhook_signatures_of_a_rotation_all_verify() -> None:
    """Both secrets sign during a rotation's overlap; either one verifies, whatever order."""
    old, new = (show_webhook_secret(os.urandom(32)) for _ in range(2))
    body = b'{"event":"order.refunded"}'
    header = sign_webhook([new, old], body, timestamp=1_000)
    assert header.count("v1=") == 2
    for secret in (old, new):
        assert verify_webhook(secret, body, header, now=1_000)
    assert not verify_webhook(show_webhook_secret(os.urandom(32)), body, header, now=1_000)
    assert not verify_webhook(new, body, header.replace("t=1000", "t=1000,t=1001"), now=1_000)
