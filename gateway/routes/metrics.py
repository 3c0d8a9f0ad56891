"""The gateway's Prometheus endpoint: GET /metrics on a private port of its own.

Not a route of the public API: /metrics lists every live sale with its exact stock and the risk
rules' hit counts, so it is served by a second small server in the gateway process
(core/metrics_http.py) on FLASHGATE_METRICS_PORT (0 = off), bound to FLASHGATE_METRICS_HOST,
and kept out of the public Service and ingress (k8s/). The API port answers 404 for /metrics.

Before answering, the ledger gauges (stock, streams, invariant) are read from Redis with a short
deadline, at most once per FLASHGATE_METRICS_REFRESH_S (a scrape storm costs one read per
interval); a failed read answers the last good values and `flashgate_ledger_scrape_success 0`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import metrics
from core.keys import WORKER_GROUP
from core.runtime import Runtime


def metrics_app(runtime: Runtime, refresh_s: float) -> Starlette:
    """The metrics port's whole application: GET /metrics, 404 for anything else."""

    async def prometheus_metrics(request: Request) -> Response:
        await metrics.LEDGER.refresh(runtime.redis, runtime.keys, WORKER_GROUP, max_age_s=refresh_s)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return Starlette(routes=[Route("/metrics", prometheus_metrics, methods=["GET"])])
