"""Plain ASGI middleware on the hot path (no BaseHTTPMiddleware): body-size limits, HTTP
metrics, request ids."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logging as fglog
from core import metrics
from core.errors import PayloadTooLarge
from gateway.models import Problem
from gateway.responses import ProblemResponse


class BodyLimit:
    """Refuse bodies over the limit with 413, before the app reads them whole.

    Key imports (paths ending in /keys) get the larger import limit. A Content-Length over the
    limit is refused at once; a chunked body is counted as it streams.

    The time a body may take is the HTTP protocol's (gateway/server.py: 408 past
    FLASHGATE_BODY_TIMEOUT_S): timing every read here cost ~5 us per request.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_import_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_import_bytes = max_import_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_import_bytes if scope["path"].endswith("/keys") else self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send, limit)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # the rest is not read: close (lingering, server.py)
                    err = PayloadTooLarge(f"body over {limit} bytes")
                    err.headers = {"Connection": "close"}
                    raise err
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        err = PayloadTooLarge(f"body over {limit} bytes")
        body = Problem(
            type=f"https://flashgate.dev/problems/{err.code}",
            title=err.title,
            status=err.status,
            code=err.code,
            detail=err.detail,
            instance=scope["path"],
        )
        response = ProblemResponse(body, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


UNMATCHED = "unmatched"
NO_STORE = (b"cache-control", b"no-store")


class HttpMetrics:
    """Requests by route template, method and status class, and their latency.

    The route is the template Starlette matched (`/v1/sales/{sale_id}/purchase`), never the raw
    path; requests that matched no route share the label `unmatched`. The duration runs to the
    last body chunk sent. Outermost of our middleware, so a 413 from BodyLimit is counted too.

    Each request gets the server's own id, returned as X-Request-Id and put in the log context
    (core.logging) for every line logged while it runs; a caller's X-Request-Id is kept apart,
    sanitized, as the client request id (never the id audit rows are filed under: #11.9).

    Every /v1 answer says `Cache-Control: no-store` unless it sets its own: order reads carry
    card keys, channel creation its API key and webhook secret, and nothing under /v1 is
    meant to be cached (errors and 413s included), so no route can forget it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        request_id = fglog.new_request_id()
        token = fglog.REQUEST_ID.set(request_id)
        client_token = fglog.CLIENT_REQUEST_ID.set(fglog.client_request_id_from(scope["headers"]))
        header = (b"x-request-id", request_id.encode())
        no_store = scope["path"].startswith("/v1/")

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), header]
                if no_store:  # a loop: any() over a generator cost twice as much (~0.9 us)
                    for name, _ in headers:
                        if name == b"cache-control":
                            break
                    else:
                        headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            fglog.REQUEST_ID.reset(token)
            fglog.CLIENT_REQUEST_ID.reset(client_token)
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in _METHODS else metrics.OTHER
            counted, timed = _children(template, method, status)
            counted.inc()
            timed.observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _children(template: str, method: str, status: int) -> tuple[Any, Any]:
    """The labelled counter and histogram of a request (labels() costs more than inc())."""
    key = (template, method, status)
    hit = _CHILDREN.get(key)
    if hit is None:  # bounded: routes x methods x statuses
        hit = _CHILDREN[key] = (
            metrics.HTTP_REQUESTS.labels(template, method, metrics.status_class(status)),
            metrics.HTTP_DURATION.labels(template, method),
        )
    return hit
