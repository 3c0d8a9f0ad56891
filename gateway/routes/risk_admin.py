"""Admin API of the risk engine: block/allow lists, per-sale config overrides, decision counts.

GET    /v1/admin/risk/lists/{action}/{kind}      action: allow|block
POST   /v1/admin/risk/lists/{action}/{kind}      kind: user|device|ip|cidr
DELETE /v1/admin/risk/lists/{action}/{kind}      body {"entries": [...]}
GET    /v1/admin/sales/{sale_id}/risk            {"effective": {...}, "override": {...}}
PUT    /v1/admin/sales/{sale_id}/risk            body: the override (partial config)
GET    /v1/admin/risk/stats                      decisions by verdict and rule (this process)
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import errors
from core.ids import is_sale_id
from gateway.auth import require_admin
from gateway.models import ListChangeOut, ListEntriesBody, ListEntriesOut
from gateway.responses import JSONResponse
from gateway.state import decode, path_id, state
from risk import durable
from risk.config import ConfigInvalid, with_override
from risk.lists import ACTIONS, KINDS, ListEntryInvalid, normalize
from risk.scoring import ScoringEngine


async def _engine(request: Request) -> ScoringEngine:
    gw = state(request)
    await require_admin(request, gw.runtime)
    if not isinstance(gw.risk, ScoringEngine):
        raise errors.NotFound("the risk engine is switched off (FLASHGATE_RISK_ENABLED)")
    return gw.risk


def _list_path(request: Request) -> tuple[str, str]:
    action, kind = request.path_params["action"], request.path_params["kind"]
    if action not in ACTIONS or kind not in KINDS:
        raise errors.NotFound(
            f"no such list (action: {'|'.join(ACTIONS)}, kind: {'|'.join(KINDS)})"
        )
    return action, kind


async def get_list(request: Request) -> Response:
    engine = await _engine(request)
    action, kind = _list_path(request)
    return JSONResponse(ListEntriesOut(action, kind, await engine.lists.entries(action, kind)))


async def change_list(request: Request) -> Response:
    engine = await _engine(request)
    action, kind = _list_path(request)
    body = await decode(request, ListEntriesBody)
    add = request.method == "POST"
    try:
        entries = [normalize(kind, v) for v in body.entries]
    except ListEntryInvalid as exc:
        raise errors.InvalidRequest(str(exc)) from None
    # PostgreSQL first: it is what `flashgate reconcile` restores Redis from (risk/durable.py).
    await durable.save_list_change(state(request).runtime.pool, action, kind, entries, add=add)
    changed = await engine.lists.apply(action, kind, entries, add=add)
    return JSONResponse(ListChangeOut(action, kind, changed))


def _sale(request: Request) -> str:
    return path_id(request, "sale_id", is_sale_id, "sale")


async def _config_out(engine: ScoringEngine, sale_id: str) -> dict[str, Any]:
    return {
        "effective": msgspec.to_builtins(await engine.configs.get(sale_id)),
        "override": await engine.configs.override(sale_id),
    }


_MAX_DEPTH = 8  # a RiskConfig is 3 levels deep


def _depth(value: Any, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level  # stop early: deeper is as wrong
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


async def get_sale_risk(request: Request) -> Response:
    engine = await _engine(request)
    return JSONResponse(await _config_out(engine, _sale(request)))


async def put_sale_risk(request: Request) -> Response:
    engine = await _engine(request)
    sale_id = _sale(request)
    override = await decode(request, dict[str, Any])
    if _depth(override) > _MAX_DEPTH:  # merging would recurse as deep (RecursionError, a 500)
        raise errors.InvalidRequest(f"the override is nested deeper than {_MAX_DEPTH} levels")
    try:
        with_override(engine.configs.base, override)  # validated before anything is stored
    except ConfigInvalid as exc:
        raise errors.InvalidRequest(str(exc)) from None
    await durable.save_override(state(request).runtime.pool, sale_id, override)
    await engine.configs.store_override(sale_id, override)
    return JSONResponse(await _config_out(engine, sale_id))


async def stats(request: Request) -> Response:
    engine = await _engine(request)
    return JSONResponse(dict(sorted(engine.counts.items())))


routes = [
    Route("/v1/admin/risk/lists/{action}/{kind}", get_list, methods=["GET"]),
    Route("/v1/admin/risk/lists/{action}/{kind}", change_list, methods=["POST", "DELETE"]),
    Route("/v1/admin/sales/{sale_id}/risk", get_sale_risk, methods=["GET"]),
    Route("/v1/admin/sales/{sale_id}/risk", put_sale_risk, methods=["PUT"]),
    Route("/v1/admin/risk/stats", stats, methods=["GET"]),
]
