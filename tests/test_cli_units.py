"""The CLI's pure parts: argument parsing, key files, the demo's plan and its audit."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.admin import key_import_request, parse_time
from cli.audit import Delivery, audit, percentile
from cli.load import DOUBLE, FIRST, RETRY, SECOND, Attempt, make_plan
from cli.main import build_parser
from cli.stack import redact


def test_parse_time_relative_and_rfc3339() -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_time("now", now) == "2030-01-01T12:00:00.000Z"
    assert parse_time("+90s", now) == "2030-01-01T12:01:30.000Z"
    assert parse_time("+2h", now) == "2030-01-01T14:00:00.000Z"
    assert parse_time("2030-02-01T00:00:00Z") == "2030-02-01T00:00:00Z"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("tomorrow")


def test_key_files(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text(json.dumps(["A", "B"]))
    assert key_import_request(tmp_path / "k.json") == {"json": {"keys": ["A", "B"]}}
    (tmp_path / "k.txt").write_text("A\nB\n")
    req = key_import_request(tmp_path / "k.txt")
    assert req["content"] == b"A\nB\n" and req["headers"]["Content-Type"].startswith("text/plain")
    (tmp_path / "k.csv").write_text("sku,code\nx,A\n")
    assert key_import_request(tmp_path / "k.csv")["headers"]["Content-Type"] == "text/csv"
    (tmp_path / "bad.csv").write_text("sku,serial\nx,A\n")
    with pytest.raises(Exception, match="code"):
        key_import_request(tmp_path / "bad.csv")


def test_parser_knows_every_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["sale", "create", "--sku", "S", "--name", "N", "--starts-at",
                              "now", "--ends-at", "+1h", "--per-user-limit", "2"])
    assert (args.command, args.action, args.per_user_limit) == ("sale", "create", 2)
    args = parser.parse_args(["demo"])
    assert (args.keys, args.buyers, args.attempts) == (1000, 5000, 20000)
    for argv in (["up"], ["worker"], ["gateway", "--port", "9"], ["migrate"],
                 ["channel", "create", "shop"], ["sale", "show", "s"],
                 ["keys", "import", "s", "f"]):
        assert parser.parse_args(argv).handler


def test_plan_has_exact_attempts_and_every_kind() -> None:
    plan = make_plan(500, 2003, seed=1, double_click=0.1)
    assert plan.attempts == 2003
    assert len({user for user, _, _ in plan.buyers}) == 500
    kinds = {kind for _, _, steps in plan.buyers for step in steps for _, kind in step}
    assert kinds == {FIRST, RETRY, SECOND, DOUBLE}
    assert sum(len(p) for p in plan.partitions(3)) == 500
    with pytest.raises(ValueError):
        make_plan(10, 5)


def _attempt(user: str, key: str, kind: str, status: int, order: str = "", code: str = "",
             ) -> Attempt:
    return Attempt(user, key, kind, status, code, order, 5.0, 1000.0)


def _delivered(order: str, *keys: str) -> Delivery:
    return Delivery(order, confirm_sent_at=1.0, confirmed_at=1.1, delivered_at=1.2,
                    delivered_seen_at=1.3, card_keys=list(keys))


def _run(attempts: list[Attempt], deliveries: list[Delivery], stock: int = 2,
         ledger: dict[str, int] | None = None):  # type: ignore[no-untyped-def]
    ledger = ledger or {"total": stock, "available": 0, "reserved": 0, "confirmed": 0,
                        "delivered": len(deliveries)}
    return audit(stock_total=stock, imported={"K1", "K2"}, buyers=3, per_user_limit=1,
                 attempts=attempts, deliveries={d.order_id: d for d in deliveries},
                 sale={"stock": ledger}, opens_at=999.0, imported_count=stock, load_procs=1,
                 concurrency=4)


def test_audit_passes_a_clean_sale() -> None:
    result = _run([_attempt("u1", "a", FIRST, 201, "o1"), _attempt("u1", "a", RETRY, 201, "o1"),
                   _attempt("u2", "b", FIRST, 201, "o2"),
                   _attempt("u2", "c", SECOND, 409, code="purchase_limit_exceeded"),
                   _attempt("u3", "d", FIRST, 409, code="sold_out")],
                  [_delivered("o1", "K1"), _delivered("o2", "K2")])
    assert result.ok, result.failures
    summary = result.summary()
    assert (summary["reserved"], summary["delivered"], summary["oversold"]) == (2, 2, 0)
    assert summary["delivery_p99_ms"] == pytest.approx(200.0)


def test_audit_catches_oversell_duplicates_and_broken_idempotency() -> None:
    result = _run([_attempt("u1", "a", FIRST, 201, "o1"), _attempt("u1", "a", RETRY, 201, "oX"),
                   _attempt("u2", "b", FIRST, 201, "o2"), _attempt("u3", "d", FIRST, 201, "o3")],
                  [_delivered("o1", "K1"), _delivered("oX", "K1"), _delivered("o2", "K2"),
                   _delivered("o3", "FOREIGN")])
    assert not result.ok
    assert result.oversold == 2  # four orders on a stock of two
    assert result.idempotency_violations == 1 and result.limit_violations == 1
    assert result.duplicate_keys == 1 and result.lost_orders == 1


def test_audit_catches_a_ledger_that_does_not_add_up() -> None:
    result = _run([_attempt("u1", "a", FIRST, 201, "o1"), _attempt("u2", "b", FIRST, 201, "o2")],
                  [_delivered("o1", "K1"), _delivered("o2", "K2")],
                  ledger={"total": 2, "available": -1, "reserved": 0, "confirmed": 0,
                          "delivered": 2})
    assert result.oversold == 1 and not result.ok


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0


def test_printed_urls_hide_passwords() -> None:
    assert redact("postgresql://app:s3cret@db:5432/fg") == "postgresql://app:*****@db:5432/fg"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
