"""Prometheus metrics (core/metrics.py) through the in-process gateway, and the JSON logs."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core import logging as fglog
from core import metrics
from core.runtime import Runtime
from tests.conftest import ADMIN, channel_headers, create_channel, create_sale, purchase_body


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


async def test_purchases_http_and_stock_are_exported(client: httpx.AsyncClient,
                                                     runtime: Runtime) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=2)
    before = await scrape(client)
    route = "/v1/sales/{sale_id}/purchase"
    statuses = []
    for i in range(3):
        r = await client.post(f"/v1/sales/{sale_id}/purchase",
                              json=purchase_body(f"metrics-user-{i}"),
                              headers=channel_headers(ch, uuid.uuid4().hex))
        statuses.append(r.status_code)
    assert statuses == [201, 201, 409]
    bad = await client.post(f"/v1/sales/{sale_id}/purchase", content=b"{",
                            headers=channel_headers(ch, uuid.uuid4().hex))
    assert bad.status_code == 400
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("flashgate_purchases_total", result="reserved") == 2
    assert delta("flashgate_purchases_total", result="sold_out") == 1
    assert delta("flashgate_purchases_total", result="invalid") == 1
    assert delta("flashgate_http_requests_total", route=route, method="POST",
                 status_class="2xx") == 2
    assert delta("flashgate_http_requests_total", route=route, method="POST",
                 status_class="4xx") == 2
    assert delta("flashgate_http_request_duration_seconds_count", route=route,
                 method="POST") == 4
    # The 50 ms SLA threshold is a bucket edge.
    assert ("flashgate_http_request_duration_seconds_bucket",
            (("le", "0.05"), ("method", "POST"), ("route", route))) in after

    # Stock and stream gauges of the sale, read from the Redis ledger on scrape.
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="total") == 2
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="reserved") == 2
    assert value(after, "flashgate_sale_stock_units", sale=sale_id, state="available") == 0
    assert value(after, "flashgate_sale_ledger_drift_units", sale=sale_id) == 0
    assert value(after, "flashgate_stream_length_entries", sale=sale_id) == 2
    assert value(after, "flashgate_dead_letters_entries", sale=sale_id) == 0
    assert value(after, "flashgate_ledger_scrape_success") == 1


async def test_labels_are_bounded(client: httpx.AsyncClient) -> None:
    ch = await create_channel(client)
    sale_id, _ = await create_sale(client, keys=1)
    user = "user-" + uuid.uuid4().hex
    r = await client.post(f"/v1/sales/{sale_id}/purchase", json=purchase_body(user),
                          headers=channel_headers(ch, uuid.uuid4().hex))
    assert r.status_code == 201
    order_id = r.json()["order_id"]
    await client.get(f"/v1/orders/{order_id}", headers=channel_headers(ch))
    stray = uuid.uuid4().hex
    await client.get("/no/such/path/" + stray)
    text = (await client.get("/metrics")).text
    for secret in (user, order_id, ch["api_key"], ch["channel_id"], "203.0.113.7"):
        assert secret not in text
    samples = await scrape(client)
    routes = {dict(labels).get("route") for (name, labels) in samples
              if name == "flashgate_http_requests_total"}
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
        before[0] + 2, before[1] + 1, before[2] + 1)
    assert metrics.RISK_RULES.labels("other", "fired")._value.get() >= 1


def test_every_metric_name_follows_the_conventions() -> None:
    names = metrics.metric_names()
    assert "flashgate_purchases_total" in names and "flashgate_sale_stock_units" in names
    units = ("_total", "_seconds", "_units", "_entries", "_bucket", "_count", "_sum",
             "_created", "_in_flight", "_active", "_success", "_violations")
    for name in names:
        assert name.endswith(units), name


def test_json_logs_carry_the_request_id_and_never_a_secret() -> None:
    record = logging.LogRecord("flashgate.test", logging.INFO, __file__, 1,
                               "channel key fgk_abcDEF123 with Authorization: Bearer s3cr3t "
                               "master_key=AAAA webhook_secret: zzz", None, None)
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
