"""The OpenAPI 3.1 document of the gateway, served at GET /openapi.json.

Built from the app's route table and one small `Op` per (method, path) in `OPERATIONS`: body
and response schemas come from the msgspec Structs (`msgspec.json.schema_components`), errors
from the `core.errors` classes each operation can raise, grouped by status with their `code`s
as an enum. A route without an entry here fails tests/test_openapi.py, so a new endpoint is one
`Route` in its module plus one `Op` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from core import errors
from core.ids import ORDER_ID_PATTERN, SALE_ID_PATTERN
from gateway import models
from risk.config import RiskConfig
from risk.lists import ACTIONS, KINDS

Err = type[errors.FlashgateError]
PROBLEM = "application/problem+json"
JSON = "application/json"
_REF = "#/components/schemas/{name}"

# Errors that whole kinds of operation share.
CHANNEL = (errors.Unauthorized, errors.ServiceUnavailable)
ADMIN = (errors.Unauthorized, errors.ServiceUnavailable, errors.RateLimited)  # 429: lockout
BODY = (errors.MalformedRequest, errors.InvalidRequest, errors.PayloadTooLarge,
        errors.UnsupportedMediaType, errors.RequestTimeout)
PURCHASE = (errors.NotFound, errors.IdempotencyMismatch, errors.SoldOut,
            errors.InsufficientStock, errors.PurchaseLimitExceeded, errors.SaleNotActive,
            errors.RiskDenied, errors.ChallengeRequired, errors.RateLimited)


@dataclass(frozen=True)
class Op:
    """One operation: what it takes, what it answers, which errors it may raise."""

    summary: str
    tag: str
    ok: int = 200
    out: Any = None                       # a Struct, another type msgspec can describe, or a
    out_schema: dict[str, Any] | None = None  # ready JSON Schema (non-JSON bodies)
    out_type: str = JSON
    body: Any = None                      # a Struct (application/json), or None
    body_types: tuple[str, ...] = ()      # other accepted request media types (text bodies)
    security: str | None = None           # "channel" | "admin"
    errors: tuple[Err, ...] = ()
    headers: tuple[dict[str, Any], ...] = ()
    out_headers: dict[str, Any] = field(default_factory=dict)
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)  # non-problem responses


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": True,
    "description": "Retry with the same key: the same request gets the same answer.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x20-\\x7e]+$"},
}
_SOLUTION = {
    "name": "Flashgate-Challenge-Solution", "in": "header", "required": False,
    "description": "The solved proof-of-work challenge of a 428 answer.",
    "schema": {"type": "string", "maxLength": 4096},
}
_REPLAYED = {"Idempotent-Replayed": {"description": "Present (`true`) on a replayed answer",
                                     "schema": {"type": "string", "enum": ["true"]}}}
_RISK_CONFIG = {"type": "object", "required": ["effective", "override"], "properties": {
    "effective": {"$ref": _REF.format(name="RiskConfig")},
    "override": {"type": "object"}}}
_READY = {"type": "object", "required": ["status", "checks"], "properties": {
    "status": {"enum": ["ready", "not_ready"]},
    "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}
_STATUS_OK = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}

_NORMALIZE = {
    "name": "normalize", "in": "query", "required": False,
    "description": "What duplicates ignore (the key delivered is the code as given).",
    "schema": {"type": "string", "enum": ["none", "ignore_case", "ignore_separators",
                                          "ignore_case,ignore_separators"]}}
_ASYNC = {
    "name": "async", "in": "query", "required": False,
    "description": "true: answer 202 at once; false: answer when done; absent: by size.",
    "schema": {"type": "string", "enum": ["true", "false"]}}
_IMPORT_ACCEPTED = {
    "description": "Accepted: the import runs as a job", "content": {JSON: {"schema": {
        "$ref": _REF.format(name="ImportJobOut")}}},
    "headers": {"Location": {"description": "The job: GET /v1/admin/imports/{import_id}",
                             "schema": {"type": "string"}}}}

OPERATIONS: dict[tuple[str, str], Op] = {
    # -- storefront (channel API key) ----------------------------------------------------
    ("POST", "/v1/sales/{sale_id}/purchase"): Op(
        "Reserve units (or buy them, with payment_ref)", "storefront", 201,
        models.PurchaseOut, body=models.PurchaseBody, security="channel",
        errors=(*CHANNEL, *BODY, *PURCHASE), headers=(_IDEMPOTENCY_KEY, _SOLUTION),
        out_headers=_REPLAYED),
    ("POST", "/v1/orders/{order_id}/confirm"): Op(
        "Confirm a reservation (payment received)", "storefront", 202, models.OrderStatusOut,
        body=models.ConfirmBody, security="channel",
        errors=(*CHANNEL, *BODY, errors.NotFound, errors.ReservationExpired,
                errors.OrderCancelled, errors.OrderRefunded)),
    ("POST", "/v1/orders/{order_id}/cancel"): Op(
        "Cancel a reservation; its stock comes back", "storefront", 200, models.OrderStatusOut,
        security="channel", errors=(*CHANNEL, errors.NotFound, errors.OrderNotCancellable,
                                    errors.OrderRefunded)),
    ("POST", "/v1/orders/{order_id}/refund"): Op(
        "Refund an order: before delivery its stock comes back, after it its keys are voided "
        "(idempotent: a repeat answers the same)", "storefront", 200, models.OrderStatusOut,
        security="channel", errors=(*CHANNEL, errors.NotFound, errors.OrderNotRefundable)),
    ("GET", "/v1/orders/{order_id}"): Op(
        "An order, with its card keys once delivered", "storefront", 200, models.OrderOut,
        security="channel", errors=(*CHANNEL, errors.NotFound)),
    # -- admin (bearer FLASHGATE_ADMIN_TOKEN) -------------------------------------------
    ("POST", "/v1/admin/channels"): Op(
        "Create a channel (API key and webhook secret shown once)", "admin", 201,
        models.ChannelOut, body=models.ChannelBody, security="admin", errors=(*ADMIN, *BODY)),
    ("POST", "/v1/admin/sales"): Op(
        "Create a sale (the same body again is a retry)", "admin", 201, models.SaleOut,
        body=models.SaleBody, security="admin", errors=(*ADMIN, *BODY, errors.SaleExists)),
    ("GET", "/v1/admin/sales/{sale_id}"): Op(
        "A sale and its ledger", "admin", 200, models.SaleOut, security="admin",
        errors=(*ADMIN, errors.NotFound)),
    ("POST", "/v1/admin/sales/{sale_id}/keys"): Op(
        "Import card keys: JSON {keys}, text/plain (one a line) or text/csv (`code` column); "
        "a large body (or ?async=true) runs as a job: 202 and its Location",
        "admin", 200, models.ImportOut, body=models.KeysBody, body_types=("text/plain",
                                                                         "text/csv"),
        security="admin", errors=(*ADMIN, *BODY, errors.NotFound),
        headers=(_NORMALIZE, _ASYNC), extra={202: _IMPORT_ACCEPTED}),
    ("GET", "/v1/admin/imports/{import_id}"): Op(
        "A key import job: status and progress", "admin", 200, models.ImportJobOut,
        security="admin", errors=(*ADMIN, errors.NotFound)),
    # -- admin: risk -------------------------------------------------------------------
    ("GET", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "The entries of a block/allow list", "risk admin", 200, models.ListEntriesOut,
        security="admin", errors=(*ADMIN, errors.NotFound)),
    ("POST", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "Add entries to a list", "risk admin", 200, models.ListChangeOut,
        body=models.ListEntriesBody, security="admin", errors=(*ADMIN, *BODY, errors.NotFound)),
    ("DELETE", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "Remove entries from a list", "risk admin", 200, models.ListChangeOut,
        body=models.ListEntriesBody, security="admin", errors=(*ADMIN, *BODY, errors.NotFound)),
    ("GET", "/v1/admin/sales/{sale_id}/risk"): Op(
        "A sale's effective risk config and its override", "risk admin", 200,
        out_schema=_RISK_CONFIG, security="admin", errors=(*ADMIN, errors.NotFound)),
    ("PUT", "/v1/admin/sales/{sale_id}/risk"): Op(
        "Set a sale's risk override (a partial config; {} removes it)", "risk admin", 200,
        out_schema=_RISK_CONFIG, body=dict[str, Any], security="admin",
        errors=(*ADMIN, *BODY, errors.NotFound)),
    ("GET", "/v1/admin/risk/stats"): Op(
        "Risk decisions of this process, by verdict and rule", "risk admin", 200,
        dict[str, int], security="admin", errors=(*ADMIN, errors.NotFound)),
    # -- operations ----------------------------------------------------------------------
    ("GET", "/healthz"): Op("Liveness", "health", 200, out_schema=_STATUS_OK),
    ("GET", "/readyz"): Op("Readiness: Redis, scripts, PostgreSQL, migrations", "health", 200,
                           out_schema=_READY,
                           extra={503: {"description": "Not ready",
                                        "content": {JSON: {"schema": _READY}}}}),
    ("GET", "/metrics"): Op("Prometheus metrics", "health", 200,
                            out_schema={"type": "string"}, out_type="text/plain"),
    ("GET", "/openapi.json"): Op("This document", "health", 200,
                                 out_schema={"type": "object"}),
    # -- benchmark-only (FLASHGATE_BENCH_ENDPOINTS) --------------------------------------
    ("GET", "/v1/bench/ping"): Op("Benchmark: a trivial endpoint", "bench", 200,
                                  out_schema={"type": "object"}),
    ("POST", "/v1/bench/naive/{sale_id}/purchase"): Op(
        "Benchmark: the purchase on PostgreSQL only", "bench", 201, models.PurchaseOut,
        body=models.PurchaseBody, security="channel",
        errors=(*CHANNEL, *BODY, errors.NotFound, errors.SoldOut, errors.IdempotencyMismatch,
                errors.PurchaseLimitExceeded), headers=(_IDEMPOTENCY_KEY,)),
}

# Path parameters, by name. A malformed id is answered 404 like an unknown one.
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "sale_id": {"type": "string", "pattern": SALE_ID_PATTERN},
    "order_id": {"type": "string", "pattern": ORDER_ID_PATTERN},
    "import_id": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    "action": {"type": "string", "enum": list(ACTIONS)},
    "kind": {"type": "string", "enum": list(KINDS)},
}


def operations(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path) of every operation the routes serve (HEAD goes with GET)."""
    found = []
    for route in routes:
        if isinstance(route, Route):
            found += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return found


def _problem(status: int, codes: Sequence[str]) -> dict[str, Any]:
    schema = {"allOf": [{"$ref": _REF.format(name="Problem")}], "properties": {
        "status": {"const": status}, "code": {"enum": sorted(set(codes))}}}
    return {"description": " / ".join(sorted(set(codes))),
            "content": {PROBLEM: {"schema": schema}}}


def _operation(method: str, path: str, op: Op, refs: dict[Any, Any]) -> dict[str, Any]:
    params = [{"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
              for name in PATH_PARAMS if "{" + name + "}" in path]
    doc: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                           "operationId": f"{method.lower()}_{path.strip('/')}".replace(
                               "/", "_").replace("{", "").replace("}", "")}
    if params or op.headers:
        doc["parameters"] = [*params, *op.headers]
    if op.body is not None:
        content = {JSON: {"schema": refs[op.body]}}
        content.update({t: {"schema": {"type": "string"}} for t in op.body_types})
        doc["requestBody"] = {"required": True, "content": content}
    schema = op.out_schema if op.out_schema is not None else refs[op.out]
    ok: dict[str, Any] = {"description": "OK", "content": {op.out_type: {"schema": schema}}}
    if op.out_headers:
        ok["headers"] = op.out_headers
    responses: dict[str, Any] = {str(op.ok): ok}
    by_status: dict[int, list[str]] = {}
    for err in op.errors:
        by_status.setdefault(err.status, []).append(err.code)
    for status in sorted(by_status):
        responses[str(status)] = _problem(status, by_status[status])
    for status, response in op.extra.items():
        responses[str(status)] = response
    doc["responses"] = responses
    if op.security:
        doc["security"] = [{op.security: []}]
    return doc


def _ecma(node: Any) -> Any:
    """JSON Schema patterns are ECMA-262 regexes: the models' Python `\\Z` is `$` there."""
    if isinstance(node, dict):
        return {k: (v.removesuffix("\\Z") + "$" if k == "pattern" and isinstance(v, str)
                    and v.endswith("\\Z") else _ecma(v)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_ecma(v) for v in node)
    return node


def document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document of the given routes; KeyError names a route without an `Op`."""
    ops = [(m, p, OPERATIONS[(m, p)]) for m, p in operations(routes)]
    types = [models.Problem, RiskConfig, *{t: None for _, _, op in ops
                                           for t in (op.body, op.out) if t is not None}]
    schemas, components = _ecma(msgspec.json.schema_components(types, ref_template=_REF))
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op in ops:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Flashgate", "version": "1",
                 "description": "Flash-sale issuance gateway. Every error is "
                                "application/problem+json (RFC 9457) with a stable `code`."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "channel": {"type": "http", "scheme": "bearer",
                        "description": "A channel's API key (fgk_…)"},
            "admin": {"type": "http", "scheme": "bearer",
                      "description": "FLASHGATE_ADMIN_TOKEN"}}},
    }
