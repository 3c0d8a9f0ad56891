"""The OpenAPI document: every route of the app described, every error code a real one."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from core import errors
from core.reconcile import STATUSES
from core.settings import Settings
from gateway import models
from gateway.app import create_app
from gateway.openapi import OPERATIONS, document, operations
from gateway.routes import admin, health, openapi, risk_admin, storefront
from risk.challenge import Challenges
from risk.signals import Signals

ROUTES = [*health.routes, *openapi.routes, *storefront.routes, *admin.routes, *risk_admin.routes]


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
    assert "/metrics" not in doc["paths"]  # Prometheus's, not the API's


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
    validate(doc)  # openapi-spec-validator: the OpenAPI 3.1 schema, refs resolved
    codes = _codes()
    schemas = doc["components"]["schemas"]
    assert set(schemas["ProblemCode"]["enum"]) == codes
    assert schemas["Problem"]["properties"]["code"] == {"$ref": "#/components/schemas/ProblemCode"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                content = response.get("content", {})
                if int(status) >= 400 and "application/problem+json" in content:
                    assert content["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }, (method, path)
                    assert set(response["x-problem-codes"]) <= codes, (method, path)
                    assert {
                        c.status for c in _classes() if c.code in response["x-problem-codes"]
                    } == {int(status)}, (method, path)
                if status in ("429", "503") and "x-problem-codes" in response:
                    assert "Retry-After" in response["headers"], (method, path, status)
    # Patterns are ECMA-262 (the models' Python \Z is written as $).
    assert "\\Z" not in r.text
    purchase = doc["paths"]["/v1/sales/{sale_id}/purchase"]["post"]["responses"]
    assert purchase["409"]["x-problem-codes"] == [
        "insufficient_stock",
        "purchase_limit_exceeded",
        "sale_not_active",
        "sold_out",
    ]


def _classes() -> list[type[errors.FlashgateError]]:
    found, todo = [], [errors.FlashgateError]
    while todo:
        found.append(todo.pop())
        todo += found[-1].__subclasses__()
    return found


def test_a_new_error_code_is_in_the_document() -> None:
    class Tarpitted(errors.FlashgateError):
        status, code = 429, "tarpitted_for_test"

    assert "tarpitted_for_test" in document(ROUTES)["components"]["schemas"]["ProblemCode"]["enum"]
    del Tarpitted
    gc.collect()
    assert "tarpitted_for_test" not in _codes()


def test_a_paused_sale_is_documented_where_it_answers_503() -> None:
    doc = document(ROUTES)
    for method, path in [
        ("post", "/v1/sales/{sale_id}/purchase"),
        ("post", "/v1/orders/{order_id}/confirm"),
        ("post", "/v1/orders/{order_id}/cancel"),
        ("post", "/v1/orders/{order_id}/refund"),
        ("post", "/v1/admin/sales"),
        ("post", "/v1/admin/sales/{sale_id}/keys"),
    ]:
        assert (
            "sale_not_ready" in doc["paths"][path][method]["responses"]["503"]["x-problem-codes"]
        ), (method, path)


def test_order_status_is_one_named_enum() -> None:
    schemas = document(ROUTES)["components"]["schemas"]
    assert schemas["OrderStatus"]["enum"] == list(STATUSES) == list(models.ORDER_STATUSES)
    for name in ("PurchaseOut", "OrderStatusOut", "OrderOut"):
        assert schemas[name]["properties"]["status"] == {"$ref": "#/components/schemas/OrderStatus"}


def _walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_optional_fields_are_optional_not_null() -> None:
    """openapi-typescript makes a field with a `default` required (requests) or always present
    (answers); the server omits unset answer fields, it never sends null."""
    schemas = document(ROUTES)["components"]["schemas"]
    assert not [
        n
        for n in _walk(schemas)
        if isinstance(n, dict) and "default" in n and isinstance(n.get("type"), str | list)
    ]
    order = schemas["OrderOut"]
    assert order["properties"]["expires_at"] == {"type": "string", "format": "date-time"}
    assert order["properties"]["card_keys"] == {"type": "array", "items": {"type": "string"}}
    assert "card_keys" not in order["required"]
    assert "quantity" not in schemas["PurchaseBody"]["required"]
    assert schemas["PurchaseBody"]["properties"]["quantity"]["description"] == "Default: 1."
    # An answer struct without omit_defaults always sends every field: all required.
    assert schemas["RiskConfig"]["required"] == list(schemas["RiskConfig"]["properties"])
    assert schemas["PurchaseOut"]["properties"]["expires_at"]["format"] == "date-time"
    assert schemas["SaleOut"]["properties"]["starts_at"]["format"] == "date-time"
    assert schemas["Problem"]["properties"]["challenge"] == {
        "$ref": "#/components/schemas/Challenge"
    }


def _check(doc: dict[str, Any], schema: dict[str, Any], example: Any) -> None:
    root = {**schema, "components": doc["components"]}
    jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(example)


def test_every_operation_has_examples_that_fit_its_schemas() -> None:
    doc = document(ROUTES)
    for path, item in [*doc["paths"].items(), *doc["webhooks"].items()]:
        for method, op in item.items():
            examples = 0
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                assert "example" in body, (method, path)
                _check(doc, body["schema"], body["example"])
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    if "example" in media:
                        _check(doc, media["schema"], media["example"])
                        examples += 1
            assert examples or path in doc["webhooks"], (method, path)


def test_public_endpoints_say_so_and_the_rest_name_their_scheme() -> None:
    doc = document(ROUTES)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            public = path in ("/healthz", "/readyz", "/openapi.json")
            assert op["security"] == (
                [] if public else [{"admin": []}] if "/admin/" in path else [{"channel": []}]
            ), (method, path)
    assert doc["servers"][0]["url"] == "/"


@pytest.mark.parametrize("event", ["order.delivered", "order.refunded"])
def test_webhooks_are_described(event: str) -> None:
    doc = document(ROUTES)
    post = doc["webhooks"][event]["post"]
    headers = {p["name"]: p for p in post["parameters"]}
    assert headers["Flashgate-Signature"]["required"] is True
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["properties"]["event"] == {"type": "string", "const": event}
    assert set(body["required"]) == set(body["properties"])  # the worker sends every field


def test_a_real_challenge_fits_the_challenge_schema() -> None:
    """A 428's `challenge` is the dict risk/challenge.py issues (ALTCHA v2): typed, not `{}`."""
    sig = Signals(
        sale_id="s-1",
        channel_id="ch",
        user_id="u-42",
        device_id="d-9",
        ip="203.0.113.7",
        subnet="203.0.113.0/24",
        address=None,
        user_agent=None,
    )
    issued = Challenges(b"k" * 32).issue(sig, work=1000, ttl_s=60, now_s=time.time())
    doc = document(ROUTES)
    _check(doc, {"$ref": "#/components/schemas/Challenge"}, issued)
    problem = msgspec.json.decode(
        msgspec.json.encode(
            models.Problem(
                type="t", title="t", status=428, code="challenge_required", challenge=issued
            )
        )
    )
    _check(doc, {"$ref": "#/components/schemas/Problem"}, problem)
    params = doc["components"]["schemas"]["ChallengeParameters"]
    assert set(params["required"]) <= set(issued["parameters"])
