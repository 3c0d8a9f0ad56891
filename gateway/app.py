"""The Starlette application: routes, error handlers, middleware, and the lifespan that opens
the Redis and PostgreSQL clients (never at import time).

Run with: uvicorn gateway.app:create_app --factory --loop uvloop
    --http gateway.server:BoundedHttpToolsProtocol  (httptools with head size and time limits)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from core import logging as fglog
from core.metrics_http import MetricsServer
from core.runtime import Runtime
from core.settings import Settings
from gateway import server
from gateway.auth import ChannelAuth
from gateway.middleware import BodyLimit, HttpMetrics
from gateway.problems import exception_handlers
from gateway.routes import admin, bench, health, openapi, risk_admin, storefront
from gateway.routes.metrics import metrics_app
from gateway.state import GatewayState
from risk.engine import AllowAll, RiskEngine
from risk.scoring import ScoringEngine

log = logging.getLogger("flashgate.gateway")


def freeze_heap() -> None:
    """After start-up, move every object alive now (modules, clients, config) out of the
    collector's reach and collect the young generation less often: a full collection then
    scans only what requests allocate, not the whole heap (gateway CPU per purchase -20 us)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def create_app(settings: Settings | None = None, risk: RiskEngine | None = None) -> Starlette:
    """`risk`: the engine to use; by default the scoring engine (AllowAll when
    FLASHGATE_RISK_ENABLED is false)."""
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:  # under uvicorn: JSON lines (tests keep their own)
        fglog.configure()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings)
        engine = risk
        if engine is None:
            try:  # an invalid risk config file fails the start, with the clients closed
                engine = (
                    ScoringEngine.from_settings(runtime.redis, runtime.keys, settings)
                    if settings.risk_enabled
                    else AllowAll()
                )
            except BaseException:
                await runtime.close()
                raise
        app.state.gateway = GatewayState(
            runtime=runtime,
            channels=ChannelAuth(
                runtime.redis, runtime.keys, settings.channel_cache_ttl_s, runtime.pool
            ),
            risk=engine,
        )
        # /metrics: its own app, on its own port when FLASHGATE_METRICS_PORT is set (never on
        # the API's); kept on app.state for in-process tests.
        app.state.metrics_app = metrics_app(runtime, settings.metrics_refresh_s)
        exporter = None
        try:
            if settings.metrics_port:
                exporter = await MetricsServer.start(
                    app.state.metrics_app,
                    settings.metrics_host or "127.0.0.1",
                    settings.metrics_port,
                )
            if runtime.failover is not None:  # pause on a Redis failover (core/failover.py)
                if runtime.pipe is not None:
                    runtime.pipe.gate = runtime.failover.gate
                await runtime.failover.start()
            freeze_heap()
            log.info("gateway ready")
            yield
        finally:
            if exporter is not None:
                await exporter.stop()
            await runtime.close()

    server.configure(body_timeout_s=settings.body_timeout_s)  # served by gateway/server.py
    return Starlette(
        routes=[
            *health.routes,
            *openapi.routes,
            *storefront.routes,
            *admin.routes,
            *risk_admin.routes,
            *(bench.routes if settings.bench_endpoints else []),
        ],
        middleware=[
            Middleware(HttpMetrics),
            Middleware(
                BodyLimit,
                max_bytes=settings.max_body_bytes,
                max_import_bytes=settings.max_import_bytes,
            ),
        ],
        exception_handlers=exception_handlers(),  # type: ignore[arg-type]
        lifespan=lifespan,
    )
