"""Probes and the metrics port on real servers.

- A real gateway (uvicorn child process) whose Redis and PostgreSQL connections go through TCP
  proxies: /metrics answers 404 on the API port and is served on the metrics port; /readyz
  fails within a second when Redis stalls, and stays ready (saying so in its body) when
  PostgreSQL is gone; /healthz answers all along.
- A real worker (`Worker.run()`, its metrics port): a Redis outage does not make /healthz fail;
  a loop stuck in an iteration does.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from cli.stack import gateway_argv, spawn, stop_children, wait_healthy
from core.embedded import ServiceURLs, free_port
from core.runtime import Runtime
from core.settings import Settings
from tests.conftest import scratch_database
from tests.faults.support import TcpProxy
from workers import metrics as worker_metrics
from workers.runner import Worker


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 0)


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return parts._replace(netloc=netloc).geturl()


@dataclasses.dataclass
class ProxiedGateway:
    url: str
    metrics_url: str
    redis: TcpProxy
    postgres: TcpProxy


@pytest.fixture
async def proxied_gateway(
    service_urls: ServiceURLs,
    tmp_path: Path,
) -> AsyncIterator[ProxiedGateway]:
    redis, postgres = (
        TcpProxy(*_hostport(service_urls.redis_url)),
        TcpProxy(*_hostport(service_urls.database_url)),
    )
    await redis.start()
    await postgres.start()
    async with scratch_database(service_urls.database_url, "flashgate_probe_") as db_url:
        port, metrics_port = free_port(), free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLASHGATE_")},
            "FLASHGATE_REDIS_URL": _via(service_urls.redis_url, redis.port),
            "FLASHGATE_DATABASE_URL": _via(db_url, postgres.port),
            "FLASHGATE_ADMIN_TOKEN": "probe-" + secrets.token_urlsafe(32),
            "FLASHGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "FLASHGATE_KEY_PREFIX": "fgp" + secrets.token_hex(4),
            "FLASHGATE_REDIS_MIN_CONNECTIONS": "2",
            "FLASHGATE_METRICS_PORT": str(metrics_port),
            "FLASHGATE_METRICS_HOST": "127.0.0.1",
            "FLASHGATE_METRICS_REFRESH_S": "0",
        }  # each scrape reads Redis
        child = spawn("gateway", gateway_argv("127.0.0.1", port), env, tmp_path)
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_healthy, child, url)
            yield ProxiedGateway(url, f"http://127.0.0.1:{metrics_port}/metrics", redis, postgres)
        finally:
            await asyncio.to_thread(stop_children, [child], 10)
            await redis.close()
            await postgres.close()


async def _timed(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await client.get(url)
    return r, time.monotonic() - started


async def test_metrics_only_on_the_metrics_port_and_readiness_needs_only_redis(
    proxied_gateway: ProxiedGateway,
) -> None:
    gw = proxied_gateway
    async with httpx.AsyncClient(timeout=5) as client:
        public = await client.get(gw.url + "/metrics")
        assert public.status_code == 404 and "flashgate_" not in public.text
        private = await client.get(gw.metrics_url)
        assert private.status_code == 200
        assert "flashgate_ledger_scrape_success 1.0" in private.text
        assert (
            await client.get(gw.metrics_url.replace("/metrics", "/readyz"))
        ).status_code == 404  # the metrics port serves metrics only

        r = await client.get(gw.url + "/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {
            "redis": "ok",
            "scripts": "ok",
            "postgres": "ok",
            "migrations": "ok",
        }

        # PostgreSQL gone (its port closed, connections cut): still ready, and it says so.
        await gw.postgres.close()
        r, took = await _timed(client, gw.url + "/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["postgres"] != "ok" and took < 1.5, (r.text, took)

        # Redis stalled: not ready, within the 0.8 s deadline; alive all the same.
        gw.redis.pause()
        try:
            r, took = await _timed(client, gw.url + "/readyz")
            assert r.status_code == 503, r.text
            assert r.json()["checks"]["redis"] == "TimeoutError" and took < 1.5, took
            alive, took = await _timed(client, gw.url + "/healthz")
            assert alive.status_code == 200 and took < 1.0
            scraped = await client.get(gw.metrics_url)  # last good values, success 0
            assert scraped.status_code == 200
            assert "flashgate_ledger_scrape_success 0.0" in scraped.text
        finally:
            gw.redis.resume()
        r = await client.get(gw.url + "/readyz")
        assert r.status_code == 200 and r.json()["checks"]["redis"] == "ok", r.text


STALL_S = 2.0


async def test_worker_liveness_survives_a_redis_outage_but_not_a_stuck_loop(
    settings: Settings, service_urls: ServiceURLs
) -> None:
    proxy = TcpProxy(*_hostport(service_urls.redis_url))
    await proxy.start()
    rt = await Runtime.open(
        dataclasses.replace(
            settings,
            redis_url=_via(service_urls.redis_url, proxy.port),
            redis_timeout_s=0.3,
            redis_min_connections=2,
            redis_pipeline_connections=0,
            worker_stall_s=STALL_S,
            sweep_interval_s=0.1,
        )
    )
    worker = Worker(rt, name="probe-" + secrets.token_hex(3), sale_ids=[])
    server = await worker_metrics.serve(worker, free_port(), "127.0.0.1")
    assert server is not None
    running = asyncio.create_task(worker.run())
    stuck = asyncio.Event()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", timeout=1.0
        ) as client:
            await asyncio.sleep(0.5)
            r = await client.get("/healthz")
            assert r.status_code == 200 and r.json()["loops"] >= 4, r.text

            proxy.pause()  # Redis unreachable for 2 x the stall limit
            answers = []
            for _ in range(8):
                await asyncio.sleep(STALL_S / 4)
                answers.append((await client.get("/healthz")).status_code)
            proxy.resume()
            assert answers == [200] * 8

            async def wedged(_sales: object, now: int | None = None) -> int:
                await stuck.wait()  # an await that never returns: a wedged loop
                return 0

            worker.sweeper.sweep = wedged  # type: ignore[method-assign,assignment]
            await asyncio.sleep(STALL_S + 1.0)
            r = await client.get("/healthz")
            assert r.status_code == 503 and r.json()["stalled"] == ["sweeper"], r.text
    finally:
        stuck.set()
        worker.request_stop()
        await asyncio.wait_for(running, 30)
        await server.stop()
        await rt.close()
        await proxy.close()


def test_up_serves_gateway_and_worker_metrics_on_private_ports(tmp_path: Path) -> None:
    """`flashgate up`'s stack: the gateway's metrics port and one per worker, chosen free, on
    the Stack for the banner; the API port has no /metrics."""
    from cli.stack import running_stack

    with (
        running_stack(run_dir=tmp_path / "run", workers=1) as stack,
        httpx.Client(timeout=5) as client,
    ):
        assert stack.gateway_url and stack.metrics_url and len(stack.worker_metrics_urls) == 1
        assert client.get(stack.gateway_url + "/metrics").status_code == 404
        r = client.get(stack.metrics_url)
        assert r.status_code == 200 and "flashgate_http_requests_total" in r.text
        worker_url = stack.worker_metrics_urls[0]
        deadline = time.monotonic() + 20
        while True:  # the worker starts its port after its clients are open
            try:
                r = client.get(worker_url)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "worker metrics port never answered"
                time.sleep(0.1)
        assert r.status_code == 200 and "flashgate_worker_last_loop_timestamp_seconds" in r.text
        alive = client.get(worker_url.removesuffix("/metrics") + "/healthz")
        assert alive.status_code == 200 and alive.json()["status"] == "ok"


def test_gateway_command_takes_a_metrics_port() -> None:
    from cli.main import build_parser

    args = build_parser().parse_args(["gateway", "--host", "0.0.0.0", "--metrics-port", "9100"])
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 8000, 9100)
    assert build_parser().parse_args(["gateway"]).metrics_port is None  # the setting decides
