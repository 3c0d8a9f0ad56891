"""The OpenAPI 3.1 document of the gateway, served at GET /openapi.json.

Built from the app's route table and one small `Op` per (method, path) in `OPERATIONS`: body
and response schemas come from the msgspec Structs (`msgspec.json.schema_components`), errors
from the `core.errors` classes each operation can raise. A route without an entry here fails
tests/test_openapi.py, so a new endpoint is one `Route` in its module plus one `Op` below.

Written for code generators (openapi-python-client, openapi-typescript; both are run on it by
tests/test_generated_clients.py):
- every error is `#/components/schemas/Problem`, whose `code` is one named enum (`ProblemCode`)
  of every code `core.errors` defines; each response names its own codes in `x-problem-codes`
  (generators drop per-status enums written with `allOf`);
- a response field the server omits is optional, never `default: null` (openapi-typescript
  makes a field with a default always present); a field always sent is required;
- a titled inline schema (`models.OrderStatus`) becomes a named component.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from core import errors
from core.ids import ORDER_ID_PATTERN, SALE_ID_PATTERN
from core.webhook_events import OrderDelivered, OrderRefundedHook
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
BODY = (
    errors.MalformedRequest,
    errors.InvalidRequest,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.RequestTimeout,
)
PAUSED = (errors.SaleNotReady,)  # the sale's ledger was lost with Redis's data (sale_guard.py)
PURCHASE = (
    errors.NotFound,
    errors.IdempotencyMismatch,
    errors.SoldOut,
    errors.InsufficientStock,
    errors.PurchaseLimitExceeded,
    errors.SaleNotActive,
    errors.RiskDenied,
    errors.ChallengeRequired,
    errors.RateLimited,
    *PAUSED,
)

# Served but not part of the API: Prometheus scrapes /metrics (moving to its own port).
UNDOCUMENTED = frozenset({("GET", "/metrics")})


@dataclass(frozen=True)
class Op:
    """One operation: what it takes, what it answers, which errors it may raise."""

    summary: str
    tag: str
    ok: int = 200
    out: Any = None  # a Struct, another type msgspec can describe, or a
    out_schema: dict[str, Any] | None = None  # ready JSON Schema (non-JSON bodies)
    body: Any = None  # a Struct (application/json), or None
    body_types: tuple[str, ...] = ()  # other accepted request media types (text bodies)
    security: str | None = None  # "channel" | "admin"; None: public
    errors: tuple[Err, ...] = ()
    headers: tuple[dict[str, Any], ...] = ()
    out_headers: dict[str, Any] = field(default_factory=dict)
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)  # non-problem responses
    example_in: Any = None  # the request body's example (a Struct or JSON)
    example_out: Any = None  # the success answer's example


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Retry with the same key: the same request gets the same answer.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[\\x20-\\x7e]+$"},
}
_SOLUTION = {
    "name": "Flashgate-Challenge-Solution",
    "in": "header",
    "required": False,
    "description": "The solved proof-of-work challenge of a 428 answer.",
    "schema": {"type": "string", "maxLength": 4096},
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "Present (`true`) on a replayed answer",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_RISK_CONFIG = {
    "type": "object",
    "required": ["effective", "override"],
    "properties": {
        "effective": {"$ref": _REF.format(name="RiskConfig")},
        "override": {"type": "object"},
    },
}
_READY = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_STATUS_OK = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}

# -- examples (Structs, so a renamed field fails here, not in a reader's client) -----------
_SALE, _ORDER = "summer-cards", "summer-cards.01JDQ3KX7Y2M4N5P6Q7R8S9T0V"
_PURCHASE_IN = models.PurchaseBody(user_id="u-42", client_ip="203.0.113.7", device_id="d-9")
_STOCK = models.StockOut(
    total=1000, available=998, reserved=1, confirmed=0, delivered=1, cancelled=0, expired=0
)
_SALE_OUT = models.SaleOut(
    sale_id=_SALE,
    sku="GC-100",
    name="Gift card 100",
    starts_at=datetime(2026, 12, 1, 12, tzinfo=UTC),
    ends_at=datetime(2026, 12, 1, 13, tzinfo=UTC),
    per_user_limit=1,
    reservation_ttl_s=300,
    stock=_STOCK,
)
_LIST = {"action": "block", "kind": "ip"}
_RISK_EXAMPLE = {"effective": RiskConfig(version=1, rules={}), "override": {}}
_TEXT_EXAMPLES = {
    "text/plain": "GC100-7QX2-K9LM-44TZ\nGC100-8RT3-N2PQ-51WA\n",
    "text/csv": "code\nGC100-7QX2-K9LM-44TZ\nGC100-8RT3-N2PQ-51WA\n",
}
_ORDER_STATUS = models.OrderStatusOut(order_id=_ORDER, status="confirmed")
_NORMALIZE = {
    "name": "normalize",
    "in": "query",
    "required": False,
    "description": "What duplicates ignore (the key delivered is the code as given).",
    "schema": {
        "type": "string",
        "enum": ["none", "ignore_case", "ignore_separators", "ignore_case,ignore_separators"],
    },
}
_ASYNC = {
    "name": "async",
    "in": "query",
    "required": False,
    "description": "true: answer 202 at once; false: answer when done; absent: by size.",
    "schema": {"type": "string", "enum": ["true", "false"]},
}
_IMPORT_ACCEPTED = {
    "description": "Accepted: the import runs as a job",
    "content": {JSON: {"schema": {"$ref": _REF.format(name="ImportJobOut")}}},
    "headers": {
        "Location": {
            "description": "The job: GET /v1/admin/imports/{import_id}",
            "schema": {"type": "string"},
        }
    },
}

OPERATIONS: dict[tuple[str, str], Op] = {
    # -- storefront (channel API key) ----------------------------------------------------
    ("POST", "/v1/sales/{sale_id}/purchase"): Op(
        "Reserve units (or buy them, with payment_ref)",
        "storefront",
        201,
        models.PurchaseOut,
        body=models.PurchaseBody,
        security="channel",
        errors=(*CHANNEL, *BODY, *PURCHASE),
        headers=(_IDEMPOTENCY_KEY, _SOLUTION),
        out_headers=_REPLAYED,
        example_in=_PURCHASE_IN,
        example_out=models.PurchaseOut(_ORDER, "reserved", "2026-12-01T12:05:00.123Z"),
    ),
    ("POST", "/v1/orders/{order_id}/confirm"): Op(
        "Confirm a reservation (payment received)",
        "storefront",
        202,
        models.OrderStatusOut,
        body=models.ConfirmBody,
        security="channel",
        errors=(
            *CHANNEL,
            *BODY,
            *PAUSED,
            errors.NotFound,
            errors.ReservationExpired,
            errors.OrderCancelled,
            errors.OrderRefunded,
        ),
        example_in=models.ConfirmBody("pay-77"),
        example_out=_ORDER_STATUS,
    ),
    ("POST", "/v1/orders/{order_id}/cancel"): Op(
        "Cancel a reservation; its stock comes back",
        "storefront",
        200,
        models.OrderStatusOut,
        security="channel",
        errors=(
            *CHANNEL,
            *PAUSED,
            errors.NotFound,
            errors.OrderNotCancellable,
            errors.OrderRefunded,
        ),
        example_out=models.OrderStatusOut(_ORDER, "cancelled"),
    ),
    ("POST", "/v1/orders/{order_id}/refund"): Op(
        "Refund an order: before delivery its stock comes back, after it its keys are voided "
        "(idempotent: a repeat answers the same)",
        "storefront",
        200,
        models.OrderStatusOut,
        security="channel",
        errors=(*CHANNEL, *PAUSED, errors.NotFound, errors.OrderNotRefundable),
        example_out=models.OrderStatusOut(_ORDER, "refunded"),
    ),
    ("GET", "/v1/orders/{order_id}"): Op(
        "An order, with its card keys once delivered",
        "storefront",
        200,
        models.OrderOut,
        security="channel",
        errors=(*CHANNEL, errors.NotFound),
        example_out=models.OrderOut(
            _ORDER, _SALE, "u-42", 1, "delivered", card_keys=["GC100-7QX2-K9LM-44TZ"]
        ),
    ),
    # -- admin (bearer FLASHGATE_ADMIN_TOKEN) -------------------------------------------
    ("POST", "/v1/admin/channels"): Op(
        "Create a channel (API key and webhook secret shown once)",
        "admin",
        201,
        models.ChannelOut,
        body=models.ChannelBody,
        security="admin",
        errors=(*ADMIN, *BODY),
        example_in=models.ChannelBody("shop-1", "https://shop.example/hooks"),
        example_out=models.ChannelOut(
            "ch_01jdq3kx7y2m4n5p6q7r8s9t0v",
            "shop-1",
            "fgk_…",
            "whsec_…",
            "https://shop.example/hooks",
        ),
    ),
    ("POST", "/v1/admin/channels/{channel_id}/webhook-secret/rotate"): Op(
        "Rotate a channel's webhook secret (the new one shown once; the old one keeps signing "
        "beside it for overlap_s, body optional)",
        "admin",
        200,
        models.RotatedSecretOut,
        body=models.RotateSecretBody,
        security="admin",
        errors=(*ADMIN, *BODY, errors.NotFound),
        example_in=models.RotateSecretBody(overlap_s=3600),
        example_out=models.RotatedSecretOut(
            "ch_01jdq3kx7y2m4n5p6q7r8s9t0v", "whsec_…", _SALE_OUT.starts_at
        ),
    ),
    ("POST", "/v1/admin/sales"): Op(
        "Create a sale (the same body again is a retry)",
        "admin",
        201,
        models.SaleOut,
        body=models.SaleBody,
        security="admin",
        errors=(*ADMIN, *BODY, *PAUSED, errors.SaleExists),
        example_in=models.SaleBody(
            "GC-100", "Gift card 100", _SALE_OUT.starts_at, _SALE_OUT.ends_at, sale_id=_SALE
        ),
        example_out=_SALE_OUT,
    ),
    ("GET", "/v1/admin/sales/{sale_id}"): Op(
        "A sale and its ledger",
        "admin",
        200,
        models.SaleOut,
        security="admin",
        errors=(*ADMIN, errors.NotFound),
        example_out=_SALE_OUT,
    ),
    ("POST", "/v1/admin/sales/{sale_id}/keys"): Op(
        "Import card keys: JSON {keys}, text/plain (one a line) or text/csv (`code` column); "
        "a large body (or ?async=true) runs as a job: 202 and its Location",
        "admin",
        200,
        models.ImportOut,
        body=models.KeysBody,
        body_types=("text/plain", "text/csv"),
        security="admin",
        errors=(*ADMIN, *BODY, *PAUSED, errors.NotFound),
        headers=(_NORMALIZE, _ASYNC),
        extra={202: _IMPORT_ACCEPTED},
        example_in=models.KeysBody(["GC100-7QX2-K9LM-44TZ", "GC100-8RT3-N2PQ-51WA"]),
        example_out=models.ImportOut(1, 2, 0, 0, 2),
    ),
    ("GET", "/v1/admin/imports/{import_id}"): Op(
        "A key import job: status and progress",
        "admin",
        200,
        models.ImportJobOut,
        security="admin",
        errors=(*ADMIN, errors.NotFound),
        example_out=models.ImportJobOut(
            import_id=7,
            sale_id=_SALE,
            status="done",
            normalize="none",
            total_lines=600000,
            read_lines=600000,
            imported=600000,
            duplicates=0,
            rejected=0,
            created_at=_SALE_OUT.starts_at,
            stock_total=600000,
            finished_at=_SALE_OUT.starts_at,
        ),
    ),
    # -- admin: risk -------------------------------------------------------------------
    ("GET", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "The entries of a block/allow list",
        "risk admin",
        200,
        models.ListEntriesOut,
        security="admin",
        errors=(*ADMIN, errors.NotFound),
        example_out={**_LIST, "entries": ["198.51.100.23"]},
    ),
    ("POST", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "Add entries to a list",
        "risk admin",
        200,
        models.ListChangeOut,
        body=models.ListEntriesBody,
        security="admin",
        errors=(*ADMIN, *BODY, errors.NotFound),
        example_in={"entries": ["198.51.100.23"]},
        example_out={**_LIST, "changed": 1},
    ),
    ("DELETE", "/v1/admin/risk/lists/{action}/{kind}"): Op(
        "Remove entries from a list",
        "risk admin",
        200,
        models.ListChangeOut,
        body=models.ListEntriesBody,
        security="admin",
        errors=(*ADMIN, *BODY, errors.NotFound),
        example_in={"entries": ["198.51.100.23"]},
        example_out={**_LIST, "changed": 1},
    ),
    ("GET", "/v1/admin/sales/{sale_id}/risk"): Op(
        "A sale's effective risk config and its override",
        "risk admin",
        200,
        out_schema=_RISK_CONFIG,
        security="admin",
        errors=(*ADMIN, errors.NotFound),
        example_out=_RISK_EXAMPLE,
    ),
    ("PUT", "/v1/admin/sales/{sale_id}/risk"): Op(
        "Set a sale's risk override (a partial config; {} removes it)",
        "risk admin",
        200,
        out_schema=_RISK_CONFIG,
        body=dict[str, Any],
        security="admin",
        errors=(*ADMIN, *BODY, errors.NotFound),
        example_in={},
        example_out=_RISK_EXAMPLE,
    ),
    ("GET", "/v1/admin/risk/stats"): Op(
        "Risk decisions of this process, by verdict and rule",
        "risk admin",
        200,
        dict[str, int],
        security="admin",
        errors=(*ADMIN, errors.NotFound),
        example_out={"allow": 120, "challenge": 3, "deny": 1},
    ),
    # -- operations (public) -------------------------------------------------------------
    ("GET", "/healthz"): Op(
        "Liveness", "health", 200, out_schema=_STATUS_OK, example_out={"status": "ok"}
    ),
    # Ready = Redis and its scripts; PostgreSQL and migrations are reported, not required.
    # (Prometheus metrics are on the private metrics port, not in this API.)
    ("GET", "/readyz"): Op(
        "Readiness: Redis and scripts (PostgreSQL, migrations reported)",
        "health",
        200,
        out_schema=_READY,
        extra={503: {"description": "Not ready", "content": {JSON: {"schema": _READY}}}},
        example_out={"status": "ready", "checks": {"redis": "ok"}},
    ),
    ("GET", "/openapi.json"): Op(
        "This document",
        "health",
        200,
        out_schema={"type": "object"},
        example_out={"openapi": "3.1.0"},
    ),
    # -- benchmark-only (FLASHGATE_BENCH_ENDPOINTS) --------------------------------------
    ("GET", "/v1/bench/ping"): Op(
        "Benchmark: a trivial endpoint",
        "bench",
        200,
        out_schema={"type": "object"},
        example_out={"ok": True},
    ),
    ("POST", "/v1/bench/naive/{sale_id}/purchase"): Op(
        "Benchmark: the purchase on PostgreSQL only",
        "bench",
        201,
        models.PurchaseOut,
        body=models.PurchaseBody,
        security="channel",
        errors=(
            *CHANNEL,
            *BODY,
            errors.NotFound,
            errors.SoldOut,
            errors.IdempotencyMismatch,
            errors.PurchaseLimitExceeded,
        ),
        headers=(_IDEMPOTENCY_KEY,),
        example_in=_PURCHASE_IN,
        example_out=models.PurchaseOut(_ORDER, "confirmed", "2026-12-01T12:05:00.123Z"),
    ),
}

# Path parameters, by name. A malformed id is answered 404 like an unknown one.
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "sale_id": {"type": "string", "pattern": SALE_ID_PATTERN},
    "order_id": {"type": "string", "pattern": ORDER_ID_PATTERN},
    "channel_id": {"type": "string", "pattern": "^ch_[0-9a-z]{26}$"},
    "import_id": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    "action": {"type": "string", "enum": list(ACTIONS)},
    "kind": {"type": "string", "enum": list(KINDS)},
}

# -- webhooks: what a channel's webhook_url receives ------------------------------------------
_SIGNATURE = {
    "name": "Flashgate-Signature",
    "in": "header",
    "required": True,
    "description": '`t=<unix s>,v1=<hex HMAC-SHA256(webhook_secret, "<t>." + body)>`; '
    "verify in constant time within 300 s (core.crypto.verify_webhook)",
    "schema": {"type": "string", "pattern": "^t=[0-9]+,v1=[0-9a-f]{64}$"},
}
_STANDARD_WEBHOOKS = tuple(
    {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": f"Standard Webhooks: {text}",
    }
    for name, text in (
        ("webhook-id", "the message id (the same on every retry)"),
        ("webhook-timestamp", "unix seconds of this attempt"),
        ("webhook-signature", "`v1,<base64 HMAC-SHA256>` (space-separated list)"),
    )
)
WEBHOOKS: dict[str, tuple[str, type[msgspec.Struct], Any]] = {
    "order.delivered": (
        "An order's card keys were delivered (reveal them with "
        "GET /v1/orders/{order_id}; the body never carries them)",
        OrderDelivered,
        OrderDelivered(_ORDER, _SALE, "u-42", 1, _SALE_OUT.ends_at),
    ),
    "order.refunded": (
        "An order was refunded (its keys, if delivered, are void)",
        OrderRefundedHook,
        OrderRefundedHook(_ORDER, _SALE, "u-42", 1, _SALE_OUT.ends_at, 1),
    ),
}


def operations(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path) of every documented operation the routes serve (HEAD goes with GET)."""
    found = []
    for route in routes:
        if isinstance(route, Route):
            found += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return [op for op in found if op not in UNDOCUMENTED]


def error_classes() -> list[Err]:
    """Every error class `core.errors` (and any module adding one) defines, base included."""
    found, todo = [], [errors.FlashgateError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def problem_codes() -> list[str]:
    return sorted({cls.code for cls in error_classes()})


def _problem(status: int, codes: Sequence[str]) -> dict[str, Any]:
    codes = sorted(set(codes))
    response: dict[str, Any] = {
        "description": " / ".join(f"`{c}`" for c in codes),
        "x-problem-codes": codes,
        "content": {PROBLEM: {"schema": {"$ref": _REF.format(name="Problem")}}},
    }
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def _json(example: Any) -> Any:
    return msgspec.to_builtins(example)


def _operation(method: str, path: str, op: Op, refs: dict[Any, Any]) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
        for name in PATH_PARAMS
        if "{" + name + "}" in path
    ]
    doc: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{method.lower()}_{path.strip('/')}".replace("/", "_")
        .replace("{", "")
        .replace("}", ""),
    }
    if params or op.headers:
        doc["parameters"] = [*params, *op.headers]
    if op.body is not None:
        # JSON first: generators that know one body type per operation (openapi-python-client)
        # keep it; the text forms are alternatives for curl and the TypeScript client.
        content: dict[str, Any] = {JSON: {"schema": refs[op.body]}}
        if op.example_in is not None:
            content[JSON]["example"] = _json(op.example_in)
        content.update(
            {t: {"schema": {"type": "string"}, "example": _TEXT_EXAMPLES[t]} for t in op.body_types}
        )
        doc["requestBody"] = {"required": True, "content": content}
    schema = op.out_schema if op.out_schema is not None else refs[op.out]
    ok: dict[str, Any] = {"description": "OK", "content": {JSON: {"schema": schema}}}
    if op.example_out is not None:
        ok["content"][JSON]["example"] = _json(op.example_out)
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
    doc["security"] = [{op.security: []}] if op.security else []
    return doc


def _webhook(event: str, summary: str, body: Any, example: Any) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": "webhook_" + event.replace(".", "_"),
            "tags": ["webhooks"],
            "parameters": [_SIGNATURE, *_STANDARD_WEBHOOKS],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {"$ref": _REF.format(name=body.__name__)},
                        "example": _json(example),
                    }
                },
            },
            "responses": {
                "2XX": {"description": "Received; any other answer is retried with backoff"}
            },
        }
    }


# -- schema shaping for generators ------------------------------------------------------------
def _ecma(node: Any) -> Any:
    """JSON Schema patterns are ECMA-262 regexes: the models' Python `\\Z` is `$` there."""
    if isinstance(node, dict):
        return {
            k: (
                v.removesuffix("\\Z") + "$"
                if k == "pattern" and isinstance(v, str) and v.endswith("\\Z")
                else _ecma(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list | tuple):
        return type(node)(_ecma(v) for v in node)
    return node


def _structs(types: Iterable[Any]) -> Iterator[type[msgspec.Struct]]:
    """Every Struct class the types mention, nested ones included."""
    seen: set[type] = set()
    todo: list[msgspec.inspect.Type] = list(msgspec.inspect.multi_type_info(list(types)))
    while todo:
        info = todo.pop()
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                continue
            seen.add(info.cls)
            yield info.cls
            todo += [f.type for f in info.fields]
        else:  # list, dict, union, metadata…: look inside
            values = [getattr(info, name) for name in info.__struct_fields__]
            todo += [v for v in values if isinstance(v, msgspec.inspect.Type)]
            todo += [
                t
                for v in values
                if isinstance(v, tuple)
                for t in v
                if isinstance(t, msgspec.inspect.Type)
            ]


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    branches = [b for b in prop.get("anyOf", ()) if b != {"type": "null"}]
    if "anyOf" not in prop or len(branches) == len(prop["anyOf"]):
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**branches[0], **rest} if len(branches) == 1 else {**rest, "anyOf": branches}


def _is_datetime(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.Metadata):
        return _is_datetime(t.type)
    if isinstance(t, msgspec.inspect.UnionType):
        return any(_is_datetime(u) for u in t.types)
    return isinstance(t, msgspec.inspect.DateTimeType)


def _describe(prop: dict[str, Any], text: str) -> None:
    prop["description"] = f"{prop['description']} {text}" if "description" in prop else text


def _shape(schema: dict[str, Any], cls: type[msgspec.Struct]) -> None:
    """Times are `format: date-time` (msgspec says so only of tz=True ones; the server sends
    RFC 3339). No `default`s: in requests they are said in words (null stays accepted); in
    answers what the server always sends is required, what it omits (omit_defaults) optional
    and never null."""
    props: dict[str, Any] = schema.get("properties", {})
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        if _is_datetime(f.type):
            for branch in props[f.encode_name].get("anyOf", [props[f.encode_name]]):
                if branch.get("type") == "string":
                    branch["format"] = "date-time"
    request = issubclass(cls, models.Body)
    omits = cls.__struct_config__.omit_defaults
    required: list[str] = list(schema.get("required", []))
    for name, prop in list(props.items()):
        if "default" not in prop:
            continue
        default = prop.pop("default")
        if request:  # a default makes openapi-typescript require the field: say it in words
            if default is not None:
                _describe(prop, f"Default: {msgspec.json.encode(default).decode()}.")
            continue
        if not omits:
            required.append(name)
            continue
        prop = _without_null(prop)
        if default is not None:
            _describe(prop, f"Omitted when it is {msgspec.json.encode(default).decode()}.")
        props[name] = prop
    if required:
        schema["required"] = required


def _hoist(node: Any, components: dict[str, Any], top: bool = True) -> Any:
    """A titled schema inside a component (`Meta(title=...)`) becomes a component of its own."""
    if isinstance(node, dict):
        if not top and isinstance(node.get("title"), str) and "$ref" not in node:
            components[node["title"]] = node
            return {"$ref": _REF.format(name=node["title"])}
        return {k: _hoist(v, components, top=False) for k, v in node.items()}
    if isinstance(node, list):
        return [_hoist(v, components, top=False) for v in node]
    return node


def _components(types: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    for cls in _structs(types):
        if cls.__name__ in components:
            _shape(components[cls.__name__], cls)
    hoisted: dict[str, Any] = {}
    components = {name: _hoist(s, hoisted) for name, s in components.items()}
    components.update(hoisted)
    components["ProblemCode"] = {
        "title": "ProblemCode",
        "type": "string",
        "enum": problem_codes(),
        "description": "Every error `code` (core/errors.py)",
    }
    components["Problem"]["properties"]["code"] = {"$ref": _REF.format(name="ProblemCode")}
    return list(schemas), _ecma(components)


def document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document of the given routes; KeyError names a route without an `Op`."""
    ops = [(m, p, OPERATIONS[(m, p)]) for m, p in operations(routes)]
    hooks = [body for _, body, _ in WEBHOOKS.values()]
    types = [
        models.Problem,
        RiskConfig,
        *hooks,
        *{t: None for _, _, op in ops for t in (op.body, op.out) if t is not None},
    ]
    schemas, components = _components(types)
    for event, (_, body, _) in WEBHOOKS.items():
        components[body.__name__]["properties"]["event"] = {"type": "string", "const": event}
    refs = dict(zip(types, _ecma(schemas), strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op in ops:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Flashgate",
            "version": "1",
            "description": "Flash-sale issuance gateway. Every error is "
            "application/problem+json (RFC 9457) with a stable `code`.",
        },
        "servers": [
            {"url": "/", "description": "The gateway serving this document"},
            {
                "url": "http://127.0.0.1:8000",
                "description": "`flashgate up` / `make demo` on this machine",
            },
        ],
        "paths": paths,
        "webhooks": {
            event: _webhook(event, summary, body, example)
            for event, (summary, body, example) in WEBHOOKS.items()
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "channel": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A channel's API key (fgk_…)",
                },
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "FLASHGATE_ADMIN_TOKEN",
                },
            },
        },
    }
