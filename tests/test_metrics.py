"""Prometheus metrics (core/metrics.py) through the gateway's metrics app (its private port's
application, in process), and the JSON logs. tests/test_probes.py checks the two ports of a real
gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import logging as fglog
from core import metrics
from core.runtime import Runtime
from gateway.routes.metrics import metrics_app
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale, purchase_body
from workers.sweeper import Sweeper


@pytest.fixture
async def metrics_client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """The metrics port's app, reading Redis on every scrape (refresh interval 0)."""
    transport = httpx.ASGITransport(app=metrics_app(runtime, 0.0))
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics.test") as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_purchases_http_and_stock_are_exported(
    client: httpx.AsyncClient, metrics_client: httpx.AsyncClient, runtime: Runtime
) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=2)
    before = await scrape(metrics_client)
    route = "/v1/sales/{sale_id}/purchase"
    statuses = []
    for i in range(3):
        r = await client.post(
            f"/v1/sales/{sale_id}/purchase",
            json=purchase_body(f"metrics-user-{i}"),
            headers=channel_headers(ch, uuid.uuid4().hex),
        )
        statuses.append(r.status_code)
    assert statuses == [201, 201, 409]
    bad = await client.post(
        f"/v1/sales/{sale_id}/purchase", content=b"{", headers=channel_headers(ch, uuid.uuid4().hex)
    )
    assert bad.status_code == 400
    after = await scrape(metrics_client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("flashgate_purchases_total", result="reserved") == 2
    assert delta("flashgate_purchases_total", result="sold_out") == 1
    assert delta("flashgate_purchases_total", result="invalid") == 1
    assert (
        delta("flashgate_http_requests_total", route=route, method="POST", status_class="2xx") == 2
    )
    assert (
        delta("flashgate_http_requests_total", route=route, method="POST", status_class="4xx") == 2
    )
    assert delta("flashgate_http_request_duration_seconds_count", route=route, method="POST") == 4
    # The 50 ms SLA threshold is a bucket edge.
    assert (
        "flashgate_http_request_duration_seconds_bucket",
        (("le", "0.05"), ("method", "POST"), ("route", route)),
    ) in after

    # Stock and stream gauges of the sale, read from the Redis ledger on scrape.
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="total") == 2
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="reserved") == 2
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="available") == 0
    assert value(after, "flashgate_sale_ledger_drift_units", sale=sale_id) == 0
    assert value(after, "flashgate_stream_length_entries", sale=sale_id) == 2
    assert value(after, "flashgate_dead_letters_entries", sale=sale_id) == 0
    assert value(after, "flashgate_ledger_scrape_success") == 1


async def test_labels_are_bounded(
    client: httpx.AsyncClient, metrics_client: httpx.AsyncClient
) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=1)
    user = "user-" + uuid.uuid4().hex
    r = await client.post(
        f"/v1/sales/{sale_id}/purchase",
        json=purchase_body(user),
        headers=channel_headers(ch, uuid.uuid4().hex),
    )
    assert r.status_code == 201
    order_id = r.json()["order_id"]
    await client.get(f"/v1/orders/{order_id}", headers=channel_headers(ch))
    stray = uuid.uuid4().hex
    await client.get("/no/such/path/" + stray)
    text = (await metrics_client.get("/metrics")).text
    for secret in (user, order_id, ch["api_key"], ch["channel_id"], "203.0.113.7"):
        assert secret not in text
    samples = await scrape(metrics_client)
    routes = {
        dict(labels).get("route")
        for (name, labels) in samples
        if name == "flashgate_http_requests_total"
    }
    assert "/v1/orders/{order_id}" in routes and "unmatched" in routes
    for route in routes:  # templates, never a raw path (other apps of the suite add theirs)
        assert sale_id not in route and stray not in route and order_id not in route


def test_risk_counts_mirror_into_counters() -> None:
    counts = metrics.RiskCounts()
    fired = metrics.RISK_RULES.labels("device_many_users", "fired")
    shadow = metrics.RISK_RULES.labels("user_holds", "shadow")
    deny = metrics.RISK_DECISIONS.labels("deny")
    before = (fired._value.get(), shadow._value.get(), deny._value.get())
    counts["rule:device_many_users:fired"] += 1
    counts["rule:device_many_users:fired"] += 1
    counts["rule:user_holds:shadow"] += 1
    counts["verdict:deny"] += 1
    counts["rule:Not A Rule; id=42:fired"] += 1  # unbounded text never becomes a label
    assert counts["rule:device_many_users:fired"] == 2  # still the admin API's plain counts
    assert (fired._value.get(), shadow._value.get(), deny._value.get()) == (
        before[0] + 2,
        before[1] + 1,
        before[2] + 1,
    )
    assert metrics.RISK_RULES.labels("other", "fired")._value.get() >= 1


def test_every_metric_name_follows_the_conventions() -> None:
    names = metrics.metric_names()
    assert "flashgate_purchases_total" in names and "flashgate_sale_stock_units" in names
    units = (
        "_total",
        "_seconds",
        "_units",
        "_entries",
        "_bucket",
        "_count",
        "_sum",
        "_created",
        "_in_flight",
        "_active",
        "_upcoming",
        "_success",
        "_violations",
    )
    for name in names:
        assert name.endswith(units), name


def test_json_logs_carry_the_request_id_and_never_a_secret() -> None:
    record = logging.LogRecord(
        "flashgate.test",
        logging.INFO,
        __file__,
        1,
        "channel key fgk_abcDEF123 with Authorization: Bearer s3cr3t "
        "master_key=AAAA webhook_secret: zzz",
        None,
        None,
    )
    record.sale_id = "launch"
    token = fglog.REQUEST_ID.set("req-1")
    try:
        line = json.loads(fglog.JsonFormatter().format(record))
    finally:
        fglog.REQUEST_ID.reset(token)
    assert line["request_id"] == "req-1" and line["sale_id"] == "launch"
    assert line["level"] == "info" and line["logger"] == "flashgate.test"
    for secret in ("fgk_abcDEF123", "s3cr3t", "AAAA", "zzz"):
        assert secret not in line["msg"]


async def test_request_id_is_the_servers_own(client: httpx.AsyncClient) -> None:
    # A caller's X-Request-Id is kept apart (client_request_id), never echoed as ours (#11.9)
    r = await client.get("/healthz", headers={"X-Request-Id": "trace-abc.1"})
    assert r.headers["x-request-id"] != "trace-abc.1" and len(r.headers["x-request-id"]) == 16
    r = await client.get("/healthz", headers={"X-Request-Id": "bad id\n with spaces"})
    assert r.headers["x-request-id"] != "bad id\n with spaces" and len(r.headers["x-request-id"])
    r = await client.get("/v1/admin/sales/nope", headers=ADMIN)
    assert len(r.headers["x-request-id"]) == 16


async def test_the_public_app_has_no_metrics_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 404 and "flashgate_" not in r.text


async def test_a_sale_not_open_yet_is_counted_never_named(
    client: httpx.AsyncClient, metrics_client: httpx.AsyncClient
) -> None:
    # an id that sorts first: the suite leaves hundreds of active sales, and the metrics read
    # the windows of the first MAX_SALES_SCANNED by name
    secret_sale, _ = await create_sale(
        client, keys=3, starts_in_s=14 * 86400, sale_id="a-upcoming-" + secrets.token_hex(6)
    )
    open_sale, _ = await create_sale(client, keys=1)
    text = (await metrics_client.get("/metrics")).text
    assert secret_sale not in text  # no stock, stream or settled series names it
    assert f'sale="{open_sale}"' in text
    samples = await scrape(metrics_client)
    assert value(samples, "flashgate_sales_upcoming") >= 1


async def test_reservations_that_end_expired_or_confirmed_are_counted_per_sale(
    client: httpx.AsyncClient, metrics_client: httpx.AsyncClient, runtime: Runtime
) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=4, ttl_s=60)
    orders = []
    for i in range(3):
        r = await client.post(
            f"/v1/sales/{sale_id}/purchase",
            json=purchase_body(f"hoarder-{i}-{uuid.uuid4().hex[:6]}"),
            headers=channel_headers(ch, uuid.uuid4().hex),
        )
        assert r.status_code == 201, r.text
        orders.append(r.json()["order_id"])
    r = await client.post(
        f"/v1/orders/{orders[0]}/confirm",
        headers=channel_headers(ch),
        json={"payment_ref": "pay-1"},
    )
    assert r.status_code == 202, r.text
    held = await scrape(metrics_client)
    assert value(held, "flashgate_sale_stock_units", sale=sale_id, state="reserved") == 2
    # The other two reservations run out (the sweeper's clock an hour ahead).
    later = int(time.time() * 1000) + 3_600_000
    assert await Sweeper(runtime.ledger).sweep([sale_id], now=later) == 2
    after = await scrape(metrics_client)
    settled = "flashgate_sale_settled_units_total"
    assert value(after, settled, sale=sale_id, outcome="expired") == 2
    assert value(after, settled, sale=sale_id, outcome="confirmed") == 1
    assert value(after, settled, sale=sale_id, outcome="cancelled") == 0
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="reserved") == 0


async def test_a_scrape_storm_costs_one_redis_read_per_interval(runtime: Runtime) -> None:
    transport = httpx.ASGITransport(app=metrics_app(runtime, 60.0))
    metrics.LEDGER._tried = float("-inf")  # noqa: SLF001 - start from a stale reading
    before = metrics.LEDGER.reads
    async with httpx.AsyncClient(transport=transport, base_url="http://metrics.test") as c:
        answers = await asyncio.gather(*(c.get("/metrics") for _ in range(50)))
        assert {r.status_code for r in answers} == {200}
        assert metrics.LEDGER.reads - before == 1
        assert (await c.get("/metrics")).status_code == 200
    assert metrics.LEDGER.reads - before == 1  # still within the 60 s interval
