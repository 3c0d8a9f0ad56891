"""Who is calling: the admin (one bearer token) or a channel (its API key).

Channel keys are checked without PostgreSQL: the hot path hashes the presented key and looks
the hash up in a small in-process cache, falling back to the Redis hash `keys.channels()`
(written when the channel is created). Looking up by SHA-256 means the secret itself is never
compared byte by byte; the admin token is compared in constant time.
"""

from __future__ import annotations

import time

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from core.crypto import hash_api_key, tokens_equal
from core.errors import Unauthorized
from core.keys import Keys
from core.settings import Secret

_NEGATIVE_TTL_S = 1.0
_MAX_ENTRIES = 100_000


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()


def require_admin(request: Request, admin_token: Secret) -> None:
    if not tokens_equal(bearer(request), admin_token.reveal()):
        raise Unauthorized("wrong admin token")


class ChannelAuth:
    """`pool`: PostgreSQL, asked only while the Redis hash of channels is missing altogether
    (Redis lost its data, until `flashgate reconcile` restores it): channels keep working
    instead of hearing 401 for keys that are valid."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float,
                 pool: asyncpg.Pool | None = None) -> None:
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
            if not channel_id and self.pool is not None \
                    and not await self.redis.exists(self.keys.channels()):
                channel_id = str(await self.pool.fetchval(
                    "SELECT channel_id FROM channels WHERE api_key_hash = $1", digest) or "")
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            ttl = self.ttl_s if channel_id else _NEGATIVE_TTL_S
            self._cache[digest] = (channel_id, now + ttl)
        if not channel_id:
            raise Unauthorized("unknown API key")
        return channel_id

    def forget(self) -> None:
        self._cache.clear()
