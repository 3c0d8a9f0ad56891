"""Admin API (bearer FLASHGATE_ADMIN_TOKEN): channels, sales, key imports and their jobs, sale
state."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import errors, webhook_secrets
from core.card_keys import (
    ImportResult,
    ParseError,
    import_job,
    parse_body,
    parse_normalize,
    run_import,
    start_import,
)
from core.crypto import hash_api_key, new_api_key, new_webhook_secret, seal, show_webhook_secret
from core.egress import AllowList, url_problem
from core.ids import is_sale_id, new_channel_id, ulid
from core.ledger import Ledger
from core.logging import CLIENT_REQUEST_ID, REQUEST_ID
from core.runtime import Runtime
from gateway.auth import require_admin
from gateway.models import (
    ChannelBody,
    ChannelOut,
    ImportJobOut,
    ImportOut,
    KeysBody,
    RotatedSecretOut,
    RotateSecretBody,
    SaleBody,
    SaleOut,
    StockOut,
)
from gateway.responses import JSONResponse
from gateway.sale_guard import refuse_if_paused
from gateway.state import decode, is_json, path_id, state

log = logging.getLogger("flashgate.admin")

_SALE_COLUMNS = (
    "sale_id, sku, name, starts_at, ends_at, per_user_limit, reservation_ttl_s, stock_buckets"
)


_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _sale_id(request: Request) -> str:
    return path_id(request, "sale_id", is_sale_id, "sale")


async def create_channel(request: Request) -> Response:
    gw = state(request)
    await require_admin(request, gw.runtime)
    body = await decode(request, ChannelBody)
    rt = gw.runtime
    if body.webhook_url is not None and (
        problem := url_problem(body.webhook_url, AllowList.from_settings(rt.settings))
    ):
        raise errors.InvalidRequest(f"webhook_url {problem}")
    channel_id, api_key = new_channel_id(), new_api_key()
    webhook_secret = new_webhook_secret()
    async with rt.pool.acquire() as conn, conn.transaction():
        dek_id, dek = await rt.keyring.new_dek(conn, "webhook")
        nonce, sealed = seal(dek, webhook_secret, channel_id.encode())
        await conn.execute(
            "INSERT INTO channels (channel_id, name, api_key_hash, webhook_url,"
            " webhook_secret, webhook_dek_id, webhook_secret_form)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'whsec')",
            channel_id,
            body.name,
            hash_api_key(api_key),
            body.webhook_url,
            nonce + sealed,
            dek_id,
        )
    # Only now can the key authenticate: the hot path reads this Redis hash, never PostgreSQL.
    await rt.redis.hset(rt.keys.channels(), hash_api_key(api_key).hex(), channel_id)
    out = ChannelOut(
        channel_id=channel_id,
        name=body.name,
        api_key=api_key,
        webhook_url=body.webhook_url,
        webhook_secret=show_webhook_secret(webhook_secret),
    )
    return JSONResponse(out, status_code=201, headers={"Cache-Control": "no-store"})


def _is_channel_id(value: str) -> bool:
    return value.startswith("ch_") and len(value) <= 64 and value[3:].isalnum() and value.isascii()


async def rotate_webhook_secret(request: Request) -> Response:
    """A new webhook secret, shown once; the old one signs beside it for the overlap."""
    gw = state(request)
    await require_admin(request, gw.runtime)
    channel_id = path_id(request, "channel_id", _is_channel_id, "channel")
    body = await decode(request, RotateSecretBody) if await request.body() else RotateSecretBody()
    rt = gw.runtime
    overlap_s = rt.settings.webhook_secret_overlap_s if body.overlap_s is None else body.overlap_s
    async with rt.pool.acquire() as conn:
        rotated = await webhook_secrets.rotate(conn, rt.keyring, channel_id, overlap_s)
    if rotated is None:
        raise errors.NotFound("no such channel")
    out = RotatedSecretOut(
        channel_id=channel_id,
        webhook_secret=rotated.webhook_secret,
        previous_valid_until=rotated.previous_valid_until,
    )
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


async def _sale_out(ledger: Ledger, row: asyncpg.Record) -> SaleOut:
    """The sale with its Redis ledger: summed over its stock buckets, and each one's if several."""
    sale_id, n = row["sale_id"], row["stock_buckets"]
    stock = await ledger.stock(sale_id)
    per_bucket = await ledger.bucket_stock(sale_id) if n > 1 and stock is not None else None
    if stock is not None and per_bucket:
        stock = {**stock, "transit": sum(b["transit"] for b in per_bucket)}
    return SaleOut(
        sale_id=sale_id,
        sku=row["sku"],
        name=row["name"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
        per_user_limit=row["per_user_limit"],
        reservation_ttl_s=row["reservation_ttl_s"],
        stock=StockOut(**stock) if stock is not None else None,
        stock_buckets=n,
        buckets=[StockOut(**b) for b in per_bucket] if per_bucket else None,
    )


async def create_sale(request: Request) -> Response:
    gw = state(request)
    await require_admin(request, gw.runtime)
    body = await decode(request, SaleBody)
    if body.starts_at.tzinfo is None or body.ends_at.tzinfo is None:
        raise errors.InvalidRequest("starts_at and ends_at need a time zone (RFC 3339)")
    if body.ends_at <= body.starts_at:
        raise errors.InvalidRequest("ends_at must be after starts_at")
    if not _EARLIEST <= body.starts_at < body.ends_at <= _LATEST:
        # Beyond these, PostgreSQL or the UTC conversion overflows (year 1 at +23:59).
        raise errors.InvalidRequest("starts_at and ends_at must lie in 1970..9998 (UTC)")
    rt = gw.runtime
    sale_id = body.sale_id or "s-" + ulid().lower()
    values = (
        sale_id,
        body.sku,
        body.name,
        body.starts_at,
        body.ends_at,
        body.per_user_limit,
        body.reservation_ttl_s,
        body.stock_buckets,
    )
    async with rt.pool.acquire() as conn:
        row = await conn.fetchrow(
            f"INSERT INTO sales ({_SALE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            f" ON CONFLICT (sale_id) DO NOTHING RETURNING {_SALE_COLUMNS}",
            *values,
        )
        if row is None:
            # Creating the same sale twice is a retry, not an error; a different one is.
            row = await conn.fetchrow(
                f"SELECT {_SALE_COLUMNS} FROM sales WHERE sale_id = $1", sale_id
            )
            if row is None or tuple(row.values()) != values:
                raise errors.SaleExists()
            # A retry may re-create a ledger that failed to start, never one Redis lost
            # (its stock and orders are in PostgreSQL): that is `flashgate reconcile`'s job.
            await refuse_if_paused(rt, sale_id, cached=False)
    await rt.ledger.init_sale(
        sale_id,
        _ms(body.starts_at),
        _ms(body.ends_at),
        body.per_user_limit,
        body.reservation_ttl_s * 1000,
        body.stock_buckets,
    )
    return JSONResponse(await _sale_out(rt.ledger, row), status_code=201)


async def get_sale(request: Request) -> Response:
    gw = state(request)
    await require_admin(request, gw.runtime)
    sale_id = _sale_id(request)
    row = await gw.runtime.pool.fetchrow(
        f"SELECT {_SALE_COLUMNS} FROM sales WHERE sale_id = $1", sale_id
    )
    if row is None:
        raise errors.NotFound("no such sale")
    return JSONResponse(await _sale_out(gw.runtime.ledger, row))


_keys_decoder = msgspec.json.Decoder(KeysBody)
_jobs: set[asyncio.Task[ImportResult]] = set()  # running import jobs, referenced until done


def _decode_keys(raw: bytes) -> list[str]:
    try:
        return _keys_decoder.decode(raw).keys
    except msgspec.ValidationError as exc:
        raise errors.InvalidRequest(str(exc)) from None
    except msgspec.DecodeError:
        raise errors.MalformedRequest("the body is not valid JSON") from None


async def _import_lines(request: Request) -> tuple[list[str], bool, int]:
    """The codes to import, whether blank entries are padding (text) or errors, and the
    body's size. Parsed in a worker thread: a large body never stalls the event loop."""
    header = request.headers.get("content-type")
    # none, application/json or +json: the rule of every JSON body (gateway/state.py)
    content_type = (
        "application/json" if is_json(header) else (header or "").split(";")[0].strip().lower()
    )
    if content_type not in ("application/json", "text/plain", "text/csv"):
        raise errors.UnsupportedMediaType("send text/plain, text/csv or application/json")
    raw = await request.body()
    if content_type == "application/json":
        return await asyncio.to_thread(_decode_keys, raw), False, len(raw)
    try:
        lines = await asyncio.to_thread(parse_body, raw, content_type)
    except ParseError as exc:
        raise errors.InvalidRequest(str(exc)) from None
    return lines, content_type == "text/plain", len(raw)


def _import_options(request: Request) -> tuple[tuple[str, ...], bool | None]:
    """?normalize=none|ignore_case[,ignore_separators] and ?async=true|false (absent: by
    the body's size)."""
    try:
        rules = parse_normalize(request.query_params.get("normalize", ""))
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc)) from None
    raw = request.query_params.get("async", "").strip().lower()
    if raw not in ("", "true", "false"):
        raise errors.InvalidRequest("async: true or false")
    return rules, None if raw == "" else raw == "true"


def _refuse_if_busy(rt: Runtime) -> None:
    """Each running import holds a PostgreSQL connection: a third of the pool at most, so
    reveals and the rest of the admin API keep theirs (429, retry in a few seconds)."""
    running_max = max(1, rt.settings.db_pool_max // 3)
    if len(_jobs) >= running_max:
        raise errors.RateLimited(
            5, f"{running_max} key imports are already running in this gateway process"
        )


async def import_sale_keys(request: Request) -> Response:
    """200 with the counts once the keys landed; 202 and a Location to poll for a large body
    (over FLASHGATE_IMPORT_ASYNC_BYTES) or `?async=true`. Both run the same job."""
    gw = state(request)
    await require_admin(request, gw.runtime)
    sale_id = _sale_id(request)
    rules, run_async = _import_options(request)
    rt = gw.runtime
    if await rt.pool.fetchval("SELECT 1 FROM sales WHERE sale_id = $1", sale_id) is None:
        raise errors.NotFound("no such sale")
    # Stock added to a lost ledger would be lost again.
    await refuse_if_paused(rt, sale_id, cached=False)
    _refuse_if_busy(rt)
    lines, skip_blank, size = await _import_lines(request)
    _refuse_if_busy(rt)  # others may have started while this body was parsed
    import_id = await start_import(rt.pool, sale_id, rules, len(lines))
    job = asyncio.create_task(
        run_import(
            rt.pool,
            rt.keyring,
            rt.ledger,
            import_id,
            sale_id,
            lines,
            skip_blank=skip_blank,
            rules=rules,
            actor="admin",
            request_id=REQUEST_ID.get() or None,
            client_request_id=CLIENT_REQUEST_ID.get() or None,
        )
    )
    _jobs.add(job)
    job.add_done_callback(_job_done)
    if run_async or (run_async is None and size > rt.settings.import_async_bytes):
        return JSONResponse(
            await _job_out(rt, import_id),
            status_code=202,
            headers={"Location": f"/v1/admin/imports/{import_id}"},
        )
    # Shielded: a client that hangs up doesn't cancel an import it may already have landed.
    result = await asyncio.shield(job)
    return JSONResponse(
        ImportOut(
            import_id=result.import_id,
            imported=result.imported,
            duplicates=result.duplicates,
            rejected=result.rejected,
            stock_total=result.stock_total,
            rejected_lines=result.rejected_lines,
        )
    )


def _job_done(job: asyncio.Task[ImportResult]) -> None:
    _jobs.discard(job)
    if not job.cancelled() and job.exception() is not None:
        log.error("key import failed", exc_info=job.exception())


async def _job_out(rt: Runtime, import_id: int) -> ImportJobOut:
    stale_after_s = max(60.0, 2 * rt.settings.db_timeout_s)
    row = await import_job(rt.pool, import_id, stale_after_s)
    if row is None:
        raise errors.NotFound("no such import")
    stock = await rt.ledger.stock(row["sale_id"]) if row["status"] == "done" else None
    return ImportJobOut(
        import_id=import_id,
        sale_id=row["sale_id"],
        status=row["status"],
        normalize=row["normalize"],
        total_lines=row["total_lines"],
        read_lines=row["read_lines"],
        imported=row["imported"],
        duplicates=row["duplicates"],
        rejected=row["rejected"],
        created_at=row["created_at"],
        rejected_lines=list(row["rejected_lines"]),
        stock_total=stock["total"] if stock is not None else None,
        error=row["error"],
        finished_at=row["finished_at"],
    )


async def get_import(request: Request) -> Response:
    gw = state(request)
    await require_admin(request, gw.runtime)
    raw = request.path_params["import_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise errors.NotFound("no such import")
    return JSONResponse(await _job_out(gw.runtime, int(raw)))


routes = [
    Route("/v1/admin/channels", create_channel, methods=["POST"]),
    Route(
        "/v1/admin/channels/{channel_id}/webhook-secret/rotate",
        rotate_webhook_secret,
        methods=["POST"],
    ),
    Route("/v1/admin/sales", create_sale, methods=["POST"]),
    Route("/v1/admin/sales/{sale_id}", get_sale, methods=["GET"]),
    Route("/v1/admin/sales/{sale_id}/keys", import_sale_keys, methods=["POST"]),
    Route("/v1/admin/imports/{import_id}", get_import, methods=["GET"]),
]
