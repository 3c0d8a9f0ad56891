"""Key imports as jobs (#11.10) and per-import normalization ("also seen" in #11): 202 and a
progress endpoint, failure and abandonment, dedup by the normalized form, the CLI options."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest

from cli.admin import import_params
from cli.main import build_parser
from core.card_keys import import_job, run_import, start_import
from core.crypto import open_sealed
from core.runtime import Runtime
from tests.conftest import ADMIN, create_sale, until
from tests.live_gateway import LiveGateway, live_gateway  # noqa: F401 - the fixture


async def _import(
    client: httpx.AsyncClient, sale_id: str, body: str, **params: str
) -> httpx.Response:
    return await client.post(
        f"/v1/admin/sales/{sale_id}/keys",
        content=body,
        params=params,
        headers={**ADMIN, "Content-Type": "text/plain"},
    )


def _counts(r: httpx.Response) -> tuple[int, int, int]:
    assert r.status_code == 200, r.text
    return r.json()["imported"], r.json()["duplicates"], r.json()["rejected"]


async def _stored_codes(rt: Runtime, sale_id: str) -> list[str]:
    out = []
    async with rt.pool.acquire() as conn:
        for row in await conn.fetch(
            "SELECT dek_id, nonce, ciphertext FROM card_keys WHERE sale_id = $1 ORDER BY key_id",
            sale_id,
        ):
            dek = await rt.keyring.dek(conn, row["dek_id"])
            out.append(open_sealed(dek, row["nonce"], row["ciphertext"], sale_id.encode()).decode())
    return out


async def test_normalization_is_a_per_import_choice(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    tag = secrets.token_hex(3)
    forms = f"abcd-{tag}-1234\nABCD-{tag.upper()}-1234\nABCD{tag.upper()}1234\n"
    exact, _ = await create_sale(client)
    assert _counts(await _import(client, exact, forms)) == (3, 0, 0)  # exact by default

    tag = secrets.token_hex(3)
    forms = f"abcd-{tag}-1234\nABCD-{tag.upper()}-1234\nABCD{tag.upper()}1234\n"
    caseless, _ = await create_sale(client)
    assert _counts(await _import(client, caseless, forms, normalize="ignore_case")) == (2, 1, 0)
    # The key stored, and delivered, is the code as given: its first occurrence.
    assert await _stored_codes(runtime, caseless) == [f"abcd-{tag}-1234", f"ABCD{tag.upper()}1234"]
    # A later import with the rule finds the earlier keys (even in another sale).
    other, _ = await create_sale(client)
    r = await _import(client, other, f"Abcd-{tag}-1234\nABCD_{tag}_1234\n", normalize="ignore_case")
    assert _counts(r) == (1, 1, 0)

    tag = secrets.token_hex(3)
    both, _ = await create_sale(client)
    r = await _import(
        client,
        both,
        f"abcd-{tag}-1234\nABCD {tag.upper()} 1234\n- _ .\n",
        normalize="ignore_separators,ignore_case",
    )
    assert _counts(r) == (1, 1, 1) and r.json()["rejected_lines"] == [3]  # only separators

    for params in ({"normalize": "upper"}, {"normalize": "ignore_case,shout"}, {"async": "maybe"}):
        r = await _import(client, both, "X-1\n", **params)
        assert (r.status_code, r.json()["code"]) == (422, "invalid_request"), params


async def test_async_import_answers_202_and_a_progress_endpoint(client: httpx.AsyncClient) -> None:
    sale_id, _ = await create_sale(client)
    tag = secrets.token_hex(4)
    body = "".join(f"JOB-{tag}-{i}\n" for i in range(12_000)) + f"JOB-{tag}-0\n\x07bad\n"
    r = await _import(client, sale_id, body, **{"async": "true"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/admin/imports/{job['import_id']}"
    assert (job["sale_id"], job["total_lines"], job["normalize"]) == (sale_id, 12_002, "none")
    assert job["status"] in ("running", "done")
    for _ in range(500):
        job = (await client.get(r.headers["location"], headers=ADMIN)).json()
        if job["status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert job["status"] == "done", job
    assert (job["imported"], job["duplicates"], job["rejected"]) == (12_000, 1, 1)
    assert (job["rejected_lines"], job["read_lines"], job["stock_total"]) == (
        [12_002],
        12_002,
        12_000,
    )
    assert job["finished_at"] and "error" not in job
    # the same import run synchronously is a plain 200 with the counts
    r = await _import(client, sale_id, f"JOB-{tag}-0\nJOB-{tag}-X\n", **{"async": "false"})
    assert _counts(r) == (1, 1, 0)

    for path, status in (
        ("/v1/admin/imports/999999999", 404),
        ("/v1/admin/imports/x1", 404),
        ("/v1/admin/imports/" + "9" * 40, 404),
    ):
        r = await client.get(path, headers=ADMIN)
        assert (r.status_code, r.json()["code"]) == (status, "not_found")
    r = await client.get(f"/v1/admin/imports/{job['import_id']}")
    assert r.status_code == 401


async def test_a_cancelled_import_lands_nothing_and_reads_failed(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    sale_id, _ = await create_sale(client)
    lines = [f"CANCEL-{secrets.token_hex(6)}" for _ in range(60_000)]
    import_id = await start_import(runtime.pool, sale_id, (), len(lines))
    job = asyncio.create_task(
        run_import(runtime.pool, runtime.keyring, runtime.ledger, import_id, sale_id, lines)
    )
    await asyncio.sleep(0.2)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    row = await import_job(runtime.pool, import_id, 60)
    assert row is not None and (row["status"], row["error"]) == ("failed", "cancelled")
    assert (
        await runtime.pool.fetchval(
            "SELECT count(*) FROM card_keys WHERE import_id = $1", import_id
        )
        == 0
    )
    stock = (await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)).json()["stock"]
    assert stock["total"] == 0


async def test_an_abandoned_job_reads_failed_and_is_never_restocked(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    sale_id, _ = await create_sale(client)
    # A gateway died mid-import: its row says running, counts unknown, never moves again.
    import_id = await runtime.pool.fetchval(
        "INSERT INTO key_imports (sale_id, imported, duplicates, rejected, status,"
        " updated_at) VALUES ($1, 7, 0, 0, 'running', now() - interval '1 hour')"
        " RETURNING import_id",
        sale_id,
    )
    assert _counts(await _import(client, sale_id, "LIVE-" + secrets.token_hex(6))) == (1, 0, 0)
    r = await client.get(f"/v1/admin/sales/{sale_id}", headers=ADMIN)
    assert r.json()["stock"]["total"] == 1  # restock_pending skipped the running job
    r = await client.get(f"/v1/admin/imports/{import_id}", headers=ADMIN)
    assert (r.json()["status"], r.json()["error"]) == ("failed", "abandoned")


def test_cli_import_options() -> None:
    args = build_parser().parse_args(
        ["keys", "import", "s", "f.txt", "--normalize", "ignore_case", "--async", "--no-wait"]
    )
    assert (args.normalize, args.run_async, args.no_wait) == ("ignore_case", True, True)
    args = build_parser().parse_args(["keys", "import", "s", "f.txt"])
    assert (args.normalize, args.run_async, args.no_wait) == (None, None, False)
    assert build_parser().parse_args(["keys", "import-status", "7"]).import_id == 7
    assert import_params(None, None) == {}
    assert import_params("ignore_case", False) == {"normalize": "ignore_case", "async": "false"}


async def test_cli_imports_as_a_job_and_waits(
    live_gateway: LiveGateway,
    tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.admin import run

    async with httpx.AsyncClient(base_url=live_gateway.url) as c:
        r = await c.post(
            "/v1/admin/sales",
            headers=live_gateway.admin,
            json={
                "sku": "SKU-C",
                "name": "CLI job",
                "starts_at": "2030-01-01T00:00:00Z",
                "ends_at": "2030-01-02T00:00:00Z",
            },
        )
        sale_id = r.json()["sale_id"]
    tag = secrets.token_hex(4)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"cli-{tag}-a\nCLI-{tag}-A\ncli-{tag}-b\n")
    monkeypatch.setenv("FLASHGATE_ADMIN_TOKEN", live_gateway.admin["Authorization"][7:])
    args = build_parser().parse_args(
        [
            "keys",
            "import",
            sale_id,
            str(keys),
            "--url",
            live_gateway.url,
            "--async",
            "--normalize",
            "ignore_case",
        ]
    )
    assert await asyncio.to_thread(run, args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["status"], out["imported"], out["duplicates"]) == ("done", 2, 1)
    assert out["normalize"] == "ignore_case"


async def test_running_imports_are_capped_per_process(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    running_max = max(1, runtime.settings.db_pool_max // 3)
    sale_id, _ = await create_sale(client)
    accepted = []
    for n in range(running_max):
        body = "".join(f"CAP-{n}-{secrets.token_hex(6)}\n" for _ in range(40_000))
        r = await _import(client, sale_id, body, **{"async": "true"})
        assert r.status_code == 202, r.text
        accepted.append(r.headers["location"])
    r = await _import(client, sale_id, "CAP-ONE-MORE\n")
    assert (r.status_code, r.json()["code"]) == (429, "rate_limited")
    assert r.headers["retry-after"] == "5"
    for location in accepted:  # wait for them: the app is shared with the next tests

        async def done(location: str = location) -> bool:
            r = await client.get(location, headers=ADMIN)
            return bool(r.json()["status"] != "running")

        await until(done, timeout_s=60)
    assert _counts(await _import(client, sale_id, "CAP-ONE-MORE\n")) == (1, 0, 0)
