"""GET /openapi.json: the OpenAPI 3.1 document of this app's routes (gateway/openapi.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.openapi import document
from gateway.responses import JSONResponse


async def openapi_json(request: Request) -> Response:
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:  # built once per app, from the routes it really serves
        doc = request.app.state.openapi = document(request.app.routes)
    return JSONResponse(doc)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
