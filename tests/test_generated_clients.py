"""Clients generated from the served /openapi.json by real generators drive the storefront flow.

- Python: openapi-python-client (dev extra) generates a package; its code creates a channel and
  a sale, imports keys, buys, replays, confirms and reads the delivered order against the
  in-process gateway (a worker burst delivers). The generator keeps one body type per operation:
  the key import's JSON form (the text/plain and text/csv alternatives are the ones it drops,
  and only those: any other generator warning fails the test).
- TypeScript: openapi-typescript types and an openapi-fetch client (tests/clients/ts: flow.ts,
  package.json, package-lock.json; `npm ci` into the venv), compiled with `tsc --strict`, run by
  node against a real uvicorn gateway (tests/live_gateway.py).

Generated code is cached under the venv, keyed by the sha256 of the document and of the inputs,
so a repeat run only drives the flows. Without node/npm the TypeScript test skips, or fails
under `make test` (FLASHGATE_REQUIRE_TOOLS=1).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from core.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, new_sale_id
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401 - the fixture
from workers.runner import Worker

TS_DIR = Path(__file__).parent / "clients" / "ts"
CACHE = Path(sys.prefix) / "generated-clients"  # in the venv: ignored by git, kept between runs
PACKAGE = "flashgate_client"
# What openapi-python-client may drop, and nothing else: the import's text bodies.
DROPPED = re.compile(r"^Unsupported content type text/(plain|csv)$")


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _build(target: Path, build: Any) -> Path:
    """`build(tmp)` fills a fresh folder that becomes `target` at once (a failed or concurrent
    build never leaves a half-made cache entry)."""
    if target.exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run(
    argv: list[str], cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> str:
    """The command's stdout and stderr, in one text; a failure shows both."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, f"{argv[:3]} failed:\n{proc.stdout}"
    return proc.stdout


# -- Python: openapi-python-client -------------------------------------------------------------
async def _document(client: httpx.AsyncClient) -> bytes:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    return r.content


def _python_client(doc: bytes) -> Path:
    import openapi_python_client

    version = openapi_python_client.__version__.encode()

    def generate(tmp: Path) -> None:
        (tmp / "openapi.json").write_bytes(doc)
        (tmp / "config.yaml").write_text("post_hooks: []\n")  # no ruff run: faster
        out = _run(
            [
                sys.executable,
                "-m",
                "openapi_python_client",
                "generate",
                "--path",
                "openapi.json",
                "--config",
                "config.yaml",
                "--meta",
                "none",
                "--output-path",
                PACKAGE,
            ],
            cwd=tmp,
        )
        (tmp / "generator.log").write_text(out)

    return _build(CACHE / f"py-{_digest(doc, version)}", generate)


async def _load_python_client(client: httpx.AsyncClient) -> tuple[Path, ModuleType]:
    where = _python_client(await _document(client))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # another document's package, from an earlier test
    sys.path.insert(0, str(where))
    try:
        return where, importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))


def _api(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{name}")


async def test_openapi_python_client_drops_only_the_text_import_bodies(
    client: httpx.AsyncClient,
) -> None:
    where, _ = await _load_python_client(client)
    log = (where / "generator.log").read_text()
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert warnings and all("POST /v1/admin/sales/{sale_id}/keys" in w for w in warnings), log
    dropped = [line for line in log.splitlines() if line.startswith("Unsupported")]
    assert len(dropped) == 2 and all(DROPPED.match(line) for line in dropped), log
    keys = where / PACKAGE / "api" / "admin" / "post_v1_admin_sales_sale_id_keys.py"
    assert "body: KeysBody," in keys.read_text()  # the JSON form kept, required


async def test_openapi_python_client_drives_the_flow(
    client: httpx.AsyncClient, app: Any, runtime: Runtime
) -> None:
    where, pkg = await _load_python_client(client)
    sys.path.insert(0, str(where))
    try:
        models = importlib.import_module(f"{PACKAGE}.models")
        types = importlib.import_module(f"{PACKAGE}.types")
        channels, sales, keys = (
            _api(pkg, f"admin.{n}")
            for n in (
                "post_v1_admin_channels",
                "post_v1_admin_sales",
                "post_v1_admin_sales_sale_id_keys",
            )
        )
        purchase, confirm, read = (
            _api(pkg, f"storefront.{n}")
            for n in (
                "post_v1_sales_sale_id_purchase",
                "post_v1_orders_order_id_confirm",
                "get_v1_orders_order_id",
            )
        )
    finally:
        sys.path.remove(str(where))
    transport = httpx.ASGITransport(app=app)
    base = "http://flashgate.test"
    admin = pkg.AuthenticatedClient(
        base_url=base, token=ADMIN_TOKEN, httpx_args={"transport": transport}
    )

    channel = await channels.asyncio(client=admin, body=models.ChannelBody(name="gen-py"))
    assert isinstance(channel, models.ChannelOut), channel
    assert channel.webhook_url is types.UNSET  # omitted by the server: Unset, not None
    now = datetime.now(UTC)
    sale_id = new_sale_id()
    sale = await sales.asyncio(
        client=admin,
        body=models.SaleBody(  # the minimal body
            sku="GC-100",
            name="Gift card 100",
            starts_at=now - timedelta(seconds=1),
            ends_at=now + timedelta(hours=1),
            sale_id=sale_id,
        ),
    )
    assert isinstance(sale, models.SaleOut), sale
    assert sale.per_user_limit == 1 and isinstance(sale.starts_at, datetime)
    codes = [f"{sale_id}-PY-{i}" for i in range(2)]
    imported = await keys.asyncio(sale_id, client=admin, body=models.KeysBody(keys=codes))
    assert isinstance(imported, models.ImportOut) and imported.imported == 2, imported
    assert imported.rejected_lines is types.UNSET or imported.rejected_lines == []

    shop = pkg.AuthenticatedClient(
        base_url=base, token=channel.api_key, httpx_args={"transport": transport}
    )
    body = models.PurchaseBody(user_id="u-42", client_ip="203.0.113.7", device_id="d-9")
    bought = await purchase.asyncio_detailed(
        sale_id, client=shop, body=body, idempotency_key="py-1"
    )
    assert bought.status_code == 201, bought.content
    out = bought.parsed
    assert out.status is models.OrderStatus.RESERVED and isinstance(out.expires_at, datetime)
    again = await purchase.asyncio_detailed(sale_id, client=shop, body=body, idempotency_key="py-1")
    assert again.parsed.order_id == out.order_id
    assert again.headers["Idempotent-Replayed"] == "true"
    other = models.PurchaseBody(
        user_id="u-42", client_ip="203.0.113.7", device_id="d-9", quantity=2
    )
    mismatch = await purchase.asyncio_detailed(
        sale_id, client=shop, body=other, idempotency_key="py-1"
    )
    assert mismatch.status_code == 422
    assert mismatch.parsed.code is models.ProblemCode.IDEMPOTENCY_MISMATCH

    confirmed = await confirm.asyncio_detailed(
        out.order_id, client=shop, body=models.ConfirmBody(payment_ref="pay-1")
    )
    assert confirmed.status_code == 202
    assert confirmed.parsed.status is models.OrderStatus.CONFIRMED
    await Worker(runtime, sale_ids=[sale_id]).run_burst()
    order = await read.asyncio(out.order_id, client=shop)
    assert isinstance(order, models.OrderOut), order
    assert order.status is models.OrderStatus.DELIVERED
    assert order.card_keys in ([codes[0]], [codes[1]])
    assert order.expires_at is types.UNSET
    missing = await read.asyncio(f"{sale_id}.01JDQ3KX7Y2M4N5P6Q7R8S9T0V", client=shop)
    assert missing.code is models.ProblemCode.NOT_FOUND and missing.status == 404


# -- TypeScript: openapi-typescript + openapi-fetch, tsc --strict ----------------------------
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("FLASHGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(
                f"{name} not found: install Node.js 20+ with npm "
                "(tests/test_generated_clients.py generates a TypeScript client)"
            )
        pytest.skip(f"{name} not installed (Node.js 20+)")
    return path


def _node_modules(npm: str) -> Path:
    lock = (TS_DIR / "package-lock.json").read_bytes()
    manifest = (TS_DIR / "package.json").read_bytes()

    def install(tmp: Path) -> None:
        shutil.copy(TS_DIR / "package.json", tmp)
        shutil.copy(TS_DIR / "package-lock.json", tmp)
        _run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=tmp, timeout=300)

    return _build(CACHE / f"npm-{_digest(manifest, lock)}", install) / "node_modules"


def _typescript_client(doc: bytes, node: str, npm: str) -> Path:
    modules = _node_modules(npm)
    inputs = [
        (TS_DIR / n).read_bytes()
        for n in ("flow.ts", "tsconfig.json", "package.json", "package-lock.json")
    ]

    def generate(tmp: Path) -> None:
        for name in ("flow.ts", "tsconfig.json", "package.json"):
            shutil.copy(TS_DIR / name, tmp)
        (tmp / "node_modules").symlink_to(modules)
        (tmp / "openapi.json").write_bytes(doc)
        _run(
            [
                node,
                str(modules / "openapi-typescript" / "bin" / "cli.js"),
                "openapi.json",
                "-o",
                "schema.ts",
            ],
            cwd=tmp,
        )
        _run(
            [node, str(modules / "typescript" / "bin" / "tsc"), "-p", "tsconfig.json", "--strict"],
            cwd=tmp,
        )

    return _build(CACHE / f"ts-{_digest(doc, *inputs)}", generate)


async def test_openapi_typescript_client_compiles_strict_and_drives_the_flow(
    live_gateway: LiveGateway,
) -> None:  # noqa: F811
    node, npm = _tool("node"), _tool("npm")
    async with httpx.AsyncClient(base_url=live_gateway.url) as c:
        doc = await _document(c)
    where = _typescript_client(doc, node, npm)
    sale_id = new_sale_id()
    env = {
        **os.environ,
        "FG_URL": live_gateway.url,
        "FG_SALE_ID": sale_id,
        "FG_ADMIN_TOKEN": live_gateway.admin["Authorization"].removeprefix("Bearer "),
    }
    out = _run([node, str(where / "out" / "flow.js")], cwd=where, timeout=60, env=env)
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {
        "imported": 2,
        "text_imported": 2,
        "purchase": "reserved",
        "purchase_status": 201,
        "expires_at": result["expires_at"],
        "mismatch": "idempotency_mismatch",
        "mismatch_status": 422,
        "confirm": "confirmed",
        "confirm_status": 202,
        "read": "confirmed",
        "settled": False,
        "card_keys": 0,  # no worker: not delivered
        "missing": "not_found",
        "missing_status": 404,
    }, out
    assert datetime.fromisoformat(result["expires_at"]) > datetime.now(UTC)
