"""GET /metrics: Prometheus text format (core/metrics.py declares every metric).

Before answering, the ledger gauges (stock, streams, invariant) are read from Redis with a short
deadline; a failed read answers the last good values and `flashgate_ledger_scrape_success 0`.
Unauthenticated, like /healthz: expose the port to the cluster's Prometheus only (k8s/).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import metrics
from core.keys import WORKER_GROUP
from gateway.state import state


async def prometheus_metrics(request: Request) -> Response:
    rt = state(request).runtime
    await metrics.LEDGER.refresh(rt.redis, rt.keys, WORKER_GROUP)
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


routes = [Route("/metrics", prometheus_metrics, methods=["GET"])]
