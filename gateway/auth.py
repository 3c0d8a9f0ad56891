"""Who is calling: the admin (a bearer token of FLASHGATE_ADMIN_TOKEN) or a channel (its API key).

Admin tokens are compared as SHA-256 digests in constant time (neither content nor length
leaks), against every configured token (several during a rotation). Failed admin
authentications are counted per client address in Redis (`keys.admin_auth_failures`, shared by
every gateway process): past FLASHGATE_ADMIN_AUTH_MAX_FAILURES in a window of
FLASHGATE_ADMIN_AUTH_WINDOW_S, that address gets 429 `rate_limited` with Retry-After for the
rest of the window, without its token even being checked, so a guess made while locked out
tells nothing. A request without any bearer token is a plain 401 and not counted (it guesses
nothing). Only admin routes pay for this (one Redis GET); the purchase path never does.

Channel keys are checked without PostgreSQL: the hot path hashes the presented key and looks
the hash up in a small in-process cache, falling back to the Redis hash `keys.channels()`
(written when the channel is created). Looking up by SHA-256 means the secret itself is never
compared byte by byte; the admin token is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from core.crypto import hash_api_key
from core.errors import RateLimited, Unauthorized
from core.keys import Keys
from core.runtime import Runtime
from core.settings import Secret

log = logging.getLogger("flashgate.auth")

_NEGATIVE_TTL_S = 1.0
_MAX_ENTRIES = 100_000


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()


def client_address(request: Request) -> str:
    """The peer's address as the server saw it (behind a proxy: what the server's
    forwarded-header settings make of it); bounded, so it can't bloat a Redis key."""
    host = request.client.host if request.client else ""
    return host[:64] or "unknown"


def admin_token_matches(given: str, tokens: tuple[Secret, ...]) -> bool:
    """Constant time in the content and length of the given token; checks every token."""
    digest = hashlib.sha256(given.encode()).digest()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(digest, hashlib.sha256(token.reveal().encode()).digest())
    return found


async def require_admin(request: Request, rt: Runtime) -> None:
    """401 for a missing or wrong admin token; 429 while this address is locked out."""
    s, redis = rt.settings, rt.redis
    key = rt.keys.admin_auth_failures(client_address(request))
    failures = int(await redis.get(key) or 0)
    if failures >= s.admin_auth_max_failures:
        raise RateLimited(
            await _retry_after(redis, key, s.admin_auth_window_s),
            "too many failed admin authentications from this address",
        )
    if admin_token_matches(bearer(request), s.admin_tokens):
        return
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(key, 0, ex=s.admin_auth_window_s, nx=True)  # the window opens at the 1st
        pipe.incr(key)
        _, failures = await pipe.execute()
    if failures == s.admin_auth_max_failures:
        log.warning(
            "admin authentication locked for %s after %d failures",
            client_address(request),
            failures,
        )
    raise Unauthorized("wrong admin token")


async def _retry_after(redis: Redis, key: str, window_s: int) -> int:
    ttl = int(await redis.ttl(key))
    return ttl if ttl > 0 else window_s


class ChannelAuth:
    """`pool`: PostgreSQL, asked only while the Redis hash of channels is missing altogether
    (Redis lost its data, until `flashgate reconcile` restores it): channels keep working
    instead of hearing 401 for keys that are valid."""

    def __init__(
        self, redis: Redis, keys: Keys, ttl_s: float, pool: asyncpg.Pool | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.pool = pool
        self._cache: dict[bytes, tuple[str, float]] = {}

    async def channel_of(self, request: Request) -> str:
        digest = hash_api_key(bearer(request))
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            channel_id = hit[0]
        else:
            channel_id = str(await self.redis.hget(self.keys.channels(), digest.hex()) or "")
            if (
                not channel_id
                and self.pool is not None
                and not await self.redis.exists(self.keys.channels())
            ):
                channel_id = str(
                    await self.pool.fetchval(
                        "SELECT channel_id FROM channels WHERE api_key_hash = $1", digest
                    )
                    or ""
                )
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            ttl = self.ttl_s if channel_id else _NEGATIVE_TTL_S
            self._cache[digest] = (channel_id, now + ttl)
        if not channel_id:
            raise Unauthorized("unknown API key")
        return channel_id

    def forget(self) -> None:
        self._cache.clear()
