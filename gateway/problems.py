"""Every error leaves the gateway as application/problem+json (RFC 9457) with a stable `code`.

One handler per base class: domain errors carry their status and code; Starlette's HTTP errors
(unknown route, wrong method) are mapped; backing-service failures become 503; anything else is
a 500 whose body says nothing about internals.
"""

from __future__ import annotations

import logging

import asyncpg
import redis.exceptions
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from core import errors, metrics
from gateway.models import Problem
from gateway.responses import ProblemResponse

log = logging.getLogger("flashgate.gateway")

_HTTP_CODES = {
    400: errors.MalformedRequest,
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
    422: errors.InvalidRequest,
}


def problem(exc: errors.FlashgateError, request: Request) -> Response:
    body = Problem(
        type=f"https://flashgate.dev/problems/{exc.code}",
        title=exc.title,
        status=exc.status,
        code=exc.code,
        detail=exc.detail if exc.detail != exc.title else None,
        instance=request.url.path,
        errors=exc.extra.get("errors"),
        reasons=exc.extra.get("reasons"),
        challenge=exc.extra.get("challenge"),
        starts_at=exc.extra.get("starts_at"),
        ends_at=exc.extra.get("ends_at"),
        limit=exc.extra.get("limit"),
    )
    route = request.scope.get("route")
    if getattr(route, "path", None) == metrics.PURCHASE_ROUTE:
        metrics.count_purchase(metrics.purchase_result(exc.code))
    return ProblemResponse(body, status_code=exc.status, headers=exc.headers or None)


async def on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.FlashgateError)
    return problem(exc, request)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    cls = _HTTP_CODES.get(exc.status_code, errors.InvalidRequest)
    err = cls()
    response = problem(err, request)
    response.status_code = exc.status_code
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def on_backend_error(request: Request, exc: Exception) -> Response:
    # Which backend and what kind of failure, never the message (it may quote data).
    log.warning("backend unavailable on %s: %s", request.url.path, type(exc).__name__)
    err = errors.ServiceUnavailable()
    err.headers = {"Retry-After": "1"}
    return problem(err, request)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    # The client left, or gateway/server.py answered for the request (a 400 on a broken
    # body, a 408) and logged that once: nobody reads this answer, it is not the server's
    # failure, and a line per request at info would let anyone flood the log.
    log.debug("client gone during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error(
        "unexpected error on %s %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc_info=exc,
    )
    return problem(errors.FlashgateError(), request)


BACKEND_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.QueryCanceledError,
    OSError,
    TimeoutError,
)


def exception_handlers() -> dict[type[Exception] | int, object]:
    handlers: dict[type[Exception] | int, object] = {
        errors.FlashgateError: on_domain_error,
        HTTPException: on_http_error,
        ClientDisconnect: on_client_gone,
        Exception: on_unexpected,
    }
    for cls in BACKEND_ERRORS:
        handlers[cls] = on_backend_error
    return handlers
