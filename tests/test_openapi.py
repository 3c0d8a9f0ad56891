"""The OpenAPI document: every route of the app described, every error code a real one."""

from __future__ import annotations

import dataclasses

import httpx
from starlette.routing import Route

from core import errors
from core.settings import Settings
from gateway.app import create_app
from gateway.openapi import OPERATIONS, document, operations


def _codes() -> set[str]:
    found, todo = set(), [errors.FlashgateError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo += cls.__subclasses__()
    return found


def test_every_route_of_the_app_is_described(settings: Settings) -> None:
    # Bench routes too: whatever the app can serve is in the document.
    app = create_app(dataclasses.replace(settings, bench_endpoints=True))
    served = operations(app.routes)
    missing = [op for op in served if op not in OPERATIONS]
    assert not missing, f"add an Op to gateway/openapi.py OPERATIONS for: {missing}"
    assert not set(OPERATIONS) - set(served), "an Op describes no route"
    doc = document(app.routes)
    described = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert described == set(served)


def test_a_route_without_spec_fails() -> None:
    async def resend() -> None: ...

    routes = [Route("/v1/orders/{order_id}/resend", resend, methods=["POST"])]
    assert operations(routes) == [("POST", "/v1/orders/{order_id}/resend")]
    try:
        document(routes)
    except KeyError:
        return
    raise AssertionError("a route without an Op was documented")


async def test_served_document_is_openapi_31(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    codes = _codes()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                content = response.get("content", {})
                if int(status) >= 400 and "application/problem+json" in content:
                    schema = content["application/problem+json"]["schema"]
                    assert set(schema["properties"]["code"]["enum"]) <= codes, (method, path)
                    assert schema["properties"]["status"]["const"] == int(status)
    # Patterns are ECMA-262 (the models' Python \Z is written as $).
    assert "\\Z" not in r.text
    purchase = doc["paths"]["/v1/sales/{sale_id}/purchase"]["post"]["responses"]
    assert purchase["409"]["content"]["application/problem+json"]["schema"]["properties"][
        "code"]["enum"] == ["insufficient_stock", "purchase_limit_exceeded", "sale_not_active",
                            "sold_out"]
