"""The Starlette application: routes, error handlers, middleware, and the lifespan that opens
the Redis and PostgreSQL clients (never at import time).

Run with: uvicorn gateway.app:create_app --factory --loop uvloop --http httptools
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from core.runtime import Runtime
from core.settings import Settings
from gateway.auth import ChannelAuth
from gateway.middleware import BodyLimit
from gateway.problems import exception_handlers
from gateway.routes import admin, health, storefront
from gateway.state import GatewayState
from risk.engine import AllowAll, RiskEngine

log = logging.getLogger("flashgate.gateway")


def create_app(settings: Settings | None = None, risk: RiskEngine | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings)
        app.state.gateway = GatewayState(
            runtime=runtime,
            channels=ChannelAuth(runtime.redis, runtime.keys, settings.channel_cache_ttl_s),
            risk=risk or AllowAll(),
        )
        log.info("gateway ready")
        try:
            yield
        finally:
            await runtime.close()

    return Starlette(
        routes=[*health.routes, *storefront.routes, *admin.routes],
        middleware=[Middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                               max_import_bytes=settings.max_import_bytes)],
        exception_handlers=exception_handlers(),  # type: ignore[arg-type]
        lifespan=lifespan,
    )
