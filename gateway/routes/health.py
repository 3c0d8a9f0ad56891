"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.db import pending_migrations
from gateway.responses import JSONResponse
from gateway.state import state


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    rt = state(request).runtime
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await rt.redis.ping()
            loaded = await rt.redis.script_exists(*[s.sha for s in rt.ledger.scripts.all()])
            checks["redis"] = "ok"
            checks["scripts"] = "ok" if all(loaded) else "missing"
            if not all(loaded):
                await rt.ledger.scripts.load(rt.redis)  # re-arm after a SCRIPT FLUSH
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure as not ready
        checks["redis"] = type(exc).__name__
    try:
        async with asyncio.timeout(2), rt.pool.acquire() as conn:
            pending = await pending_migrations(conn)
            checks["postgres"] = "ok"
            checks["migrations"] = "ok" if not pending else f"pending: {', '.join(pending)}"
    except Exception as exc:  # noqa: BLE001
        checks["postgres"] = type(exc).__name__
    ready = all(v == "ok" for v in checks.values()) and len(checks) == 4
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
