"""Liveness and readiness of the gateway, each within its probe's timeout.

- `/healthz` (liveness): the event loop answers. Nothing else: a backend that is down is not a
  reason to restart the process.
- `/readyz` (readiness): what the purchase path needs, Redis reachable with its scripts loaded,
  checked with a deadline of READY_TIMEOUT_S. PostgreSQL (and pending migrations) is checked
  at the same time, with the same deadline, and reported in the body, but does not fail
  readiness: the purchase path never touches it, and the admin routes answer 503 on their own
  while it is away. A PostgreSQL blip must not drop every gateway from the Service at once.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.db import pending_migrations
from core.runtime import Runtime
from gateway.responses import JSONResponse
from gateway.state import state

READY_TIMEOUT_S = 0.8  # each check's deadline; the checks run together (probe timeout >= 2 s)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _redis(rt: Runtime) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await rt.redis.ping()
            loaded = await rt.redis.script_exists(*[s.sha for s in rt.ledger.scripts.all()])
            scripts = "ok"
            if not all(loaded):
                await rt.ledger.scripts.load(rt.redis)  # re-arm after a SCRIPT FLUSH
                scripts = "reloaded"
        return {"redis": "ok", "scripts": scripts}
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as not ready
        return {"redis": type(exc).__name__}


async def _postgres(rt: Runtime) -> dict[str, str]:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), rt.pool.acquire() as conn:
            pending = await pending_migrations(conn)
        return {
            "postgres": "ok",
            "migrations": "ok" if not pending else f"pending: {', '.join(pending)}",
        }
    except Exception as exc:  # noqa: BLE001 - reported, not failing readiness
        return {"postgres": type(exc).__name__}


async def readyz(request: Request) -> Response:
    rt = state(request).runtime
    redis, postgres = await asyncio.gather(_redis(rt), _postgres(rt))
    checks = {**redis, **postgres}
    ready = redis.get("redis") == "ok" and redis.get("scripts") in ("ok", "reloaded")
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
