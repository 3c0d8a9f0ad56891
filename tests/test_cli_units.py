"""The CLI's pure parts: argument parsing, key files, the demo's plan and its audit."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli import admin as cli_admin
from cli import envfile
from cli import main as cli_main
from cli.admin import connection, key_import_request, parse_time, stack_env
from cli.audit import Delivery, audit, percentile, render
from cli.load import (
    DOUBLE,
    FIRST,
    NET_RETRY,
    RETRY,
    SECOND,
    SOLVED,
    Attempt,
    default_bots,
    make_plan,
    play,
)
from cli.main import build_parser
from cli.stack import Stack, redact
from cli.stack import stack_env as stack_env_of
from core.embedded import ServiceURLs
from risk.challenge import Challenges
from risk.engine import RiskContext
from risk.lists import load_datacenter_ranges
from risk.signals import Signals
from risk.solver import SOLUTION_HEADER


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
    args = parser.parse_args(
        [
            "sale",
            "create",
            "--sku",
            "S",
            "--name",
            "N",
            "--starts-at",
            "now",
            "--ends-at",
            "+1h",
            "--per-user-limit",
            "2",
        ]
    )
    assert (args.command, args.action, args.per_user_limit) == ("sale", "create", 2)
    args = parser.parse_args(["demo"])
    assert (args.keys, args.buyers, args.attempts, args.bots) == (1000, 5000, 20000, None)
    assert parser.parse_args(["demo", "--bots", "0"]).bots == 0
    for argv in (
        ["up"],
        ["worker"],
        ["gateway", "--port", "9"],
        ["migrate"],
        ["channel", "create", "shop"],
        ["sale", "show", "s"],
        ["keys", "import", "s", "f"],
    ):
        assert parser.parse_args(argv).handler


def test_version_and_connection_options_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("flashgate ")
    for argv in (
        ["--url", "http://h:1", "--token", "t", "sale", "show", "s"],
        ["sale", "show", "s", "--url", "http://h:1", "--token", "t"],
        ["--token", "t", "sale", "show", "--url", "http://h:1", "s"],
    ):
        args = parser.parse_args(argv)
        assert (args.url, args.token, args.sale_id) == ("http://h:1", "t", "s"), argv
    args = parser.parse_args(["sale", "show", "s"])
    assert (args.url, args.token) == (None, None)
    assert parser.parse_args(["up"]).port is None  # 8000 when free
    assert parser.parse_args(["up", "--port", "0"]).port == 0


def _up_values(pid: int, url: str = "http://127.0.0.1:8123") -> dict[str, str]:
    return {
        "FLASHGATE_URL": url,
        "FLASHGATE_ADMIN_TOKEN": "tok en'$x\"",
        "FLASHGATE_UP_PID": str(pid),
        "FLASHGATE_REDIS_URL": "redis://127.0.0.1:1/0",
        "FLASHGATE_DATABASE_URL": "postgresql://u:p@127.0.0.1:2/db",
    }


def test_env_file_is_private_sourceable_and_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / ".run" / "20300101-000000"
    run_dir.mkdir(parents=True)
    pointer = tmp_path / envfile.POINTER
    path = envfile.write(run_dir, _up_values(os.getpid()), pointer, bin_dir=tmp_path / "b in")
    assert path.stat().st_mode & 0o777 == 0o600
    assert pointer.resolve() == path
    values = envfile.read(pointer)
    assert values["FLASHGATE_ADMIN_TOKEN"] == "tok en'$x\""
    assert values["FLASHGATE_ENV_FILE"] == str(path)
    # bash reads it the same way (`source`), quotes and all
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'source {pointer} && printf %s "$FLASHGATE_ADMIN_TOKEN" && echo && printf %s "$PATH"',
        ],
        capture_output=True,
        text=True,
    )
    token, path_var = out.stdout.split("\n")
    assert token == "tok en'$x\""
    assert path_var.startswith(f"{tmp_path / 'b in'}:") and len(path_var) > len(str(tmp_path))
    assert "PATH" not in values
    envfile.remove(path, pointer)
    assert not path.exists() and not pointer.is_symlink()


def test_env_file_pointer_of_a_newer_up_is_left_alone(tmp_path: Path) -> None:
    pointer = tmp_path / envfile.POINTER
    old, new = tmp_path / "a", tmp_path / "b"
    old.mkdir()
    new.mkdir()
    old_file = envfile.write(old, _up_values(os.getpid()), pointer)
    new_file = envfile.write(new, _up_values(os.getpid()), pointer)
    envfile.remove(old_file, pointer)
    assert pointer.resolve() == new_file


def test_discover_finds_a_live_up_and_skips_a_dead_one(tmp_path: Path) -> None:
    assert envfile.discover(tmp_path) is None
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_dir = tmp_path / ".run" / "1"
    stale_dir.mkdir(parents=True)
    envfile.write(stale_dir, _up_values(dead.pid), tmp_path / envfile.POINTER)
    assert envfile.discover(tmp_path) is None  # its up was killed: not used
    sourced = subprocess.run(
        ["bash", "-c", f"source {tmp_path / envfile.POINTER}"], capture_output=True, text=True
    )
    assert sourced.returncode == 0 and "not running: stale values" in sourced.stderr
    live_dir = tmp_path / ".run" / "2"
    live_dir.mkdir()
    envfile.write(live_dir, _up_values(os.getpid(), "http://127.0.0.1:9"), pointer=None)
    found = envfile.discover(tmp_path)  # the pointer is stale: the newest live run dir
    assert found is not None and found[1]["FLASHGATE_URL"] == "http://127.0.0.1:9"


def test_admin_commands_find_the_running_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / ".run" / "x"
    run_dir.mkdir(parents=True)
    envfile.write(run_dir, _up_values(os.getpid()), tmp_path / envfile.POINTER)
    parser = build_parser()
    args = parser.parse_args(["sale", "show", "s"])
    assert connection(args, {}) == ("http://127.0.0.1:8123", "tok en'$x\"")
    # what is set wins: FLASHGATE_URL names another gateway, so the file is not read
    assert connection(args, {"FLASHGATE_URL": "http://other:1"}) == ("http://other:1", "")
    assert connection(args, {"FLASHGATE_ADMIN_TOKEN": "mine"}) == ("http://127.0.0.1:8123", "mine")
    # --url of the running up: its token
    args = parser.parse_args(["sale", "show", "s", "--url", "http://127.0.0.1:8123"])
    assert connection(args, {}) == ("http://127.0.0.1:8123", "tok en'$x\"")
    args = parser.parse_args(["--url", "http://127.0.0.1:7", "sale", "show", "s"])
    assert connection(args, {}) == ("http://127.0.0.1:7", "")
    # the database commands: the servers and secrets of the file, the environment first
    env = stack_env({"FLASHGATE_KEY_PREFIX": "p"}, tmp_path)
    assert env["FLASHGATE_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert env["FLASHGATE_KEY_PREFIX"] == "p"
    assert "FLASHGATE_DATABASE_URL" not in stack_env({"FLASHGATE_REDIS_URL": "redis://r"}, tmp_path)


def test_nothing_running_says_how_to_start_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("FLASHGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli_admin, "DEFAULT_URL", "http://127.0.0.1:1")
    args = build_parser().parse_args(["--token", "t", "sale", "show", "s"])
    assert cli_admin.run(args) == 1
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:1" in err and "make up" in err


def test_up_ignores_what_a_shell_sourced_from_an_earlier_up() -> None:
    assert envfile.sourced_from_previous_up({"FLASHGATE_REDIS_URL": "redis://r"}) == []
    sourced = {
        "FLASHGATE_ENV_FILE": "/x/flashgate.env",
        "FLASHGATE_REDIS_URL": "redis://r",
        "FLASHGATE_ADMIN_TOKEN": "t",
        "FLASHGATE_RISK_ENABLED": "0",
    }
    assert set(envfile.sourced_from_previous_up(sourced)) == {
        "FLASHGATE_ENV_FILE",
        "FLASHGATE_REDIS_URL",
        "FLASHGATE_ADMIN_TOKEN",
    }


def test_up_port_8000_when_free_else_a_free_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(cli_main, "UP_PORT", taken)
        assert cli_main.gateway_port(None) == 0
        assert f"port {taken} is in use" in capsys.readouterr().err
        assert cli_main.gateway_port(taken) is None  # asked for: refused, said why
        assert "--port 0" in capsys.readouterr().err
    assert cli_main.gateway_port(taken) == taken
    monkeypatch.setattr(cli_main, "UP_PORT", taken)
    assert cli_main.gateway_port(None) == taken
    assert cli_main.gateway_port(0) == 0


def test_up_banner_shows_a_generated_token_only(tmp_path: Path) -> None:
    env = stack_env_of(ServiceURLs("redis://r:1/0", "postgresql://u:pw@d/db"), {})
    assert len(env["FLASHGATE_ADMIN_TOKEN"]) >= 32
    stack = Stack(
        ServiceURLs("redis://r:1/0", "postgresql://u:pw@d/db"),
        env["FLASHGATE_ADMIN_TOKEN"],
        env,
        tmp_path,
        "http://127.0.0.1:8000",
        admin_token_generated=True,
        metrics_url="http://127.0.0.1:8000/metrics",
        worker_metrics_urls=["http://127.0.0.1:9101/metrics", "http://127.0.0.1:9102/metrics"],
    )
    text = cli_main.up_banner(stack, tmp_path, tmp_path / "flashgate.env", redact)
    assert env["FLASHGATE_ADMIN_TOKEN"] in text and "pw" not in text
    assert "9101/metrics" in text and "9102/metrics" in text
    assert env["FLASHGATE_MASTER_KEY"] not in text
    stack.admin_token_generated = False
    text = cli_main.up_banner(stack, tmp_path, tmp_path / "flashgate.env", redact)
    assert env["FLASHGATE_ADMIN_TOKEN"] not in text and "(from FLASHGATE_ADMIN_TOKEN)" in text
    values = cli_main.up_variables(stack, 42)
    assert values["FLASHGATE_WORKER_METRICS_URLS"].split() == stack.worker_metrics_urls
    assert values["FLASHGATE_MASTER_KEY"] == env["FLASHGATE_MASTER_KEY"]
    assert values["FLASHGATE_KEY_PREFIX"] == "fg"


def test_plan_has_exact_attempts_and_every_kind() -> None:
    plan = make_plan(500, 2003, seed=1, double_click=0.1)
    assert plan.attempts == 2003 and plan.farm is None and not plan.bot_users
    assert len({b.user_id for b in plan.buyers}) == 500
    kinds = {kind for b in plan.buyers for step in b.steps for _, kind in step}
    assert kinds == {FIRST, RETRY, SECOND, DOUBLE}
    assert sum(len(p) for p in plan.partitions(3)) == 500
    with pytest.raises(ValueError):
        make_plan(10, 5)
    with pytest.raises(ValueError):  # the farm's attempts come out of the total
        make_plan(10, 20, bots=11)


def _body(b: object) -> dict[str, str]:
    return json.loads(b.body)  # type: ignore[attr-defined, no-any-return]


def test_default_plan_meets_the_sale_size_with_a_bot_farm() -> None:
    attempts = 20000
    plan = make_plan(5000, attempts, bots=default_bots(attempts), seed=3)
    assert default_bots(attempts) == 2000  # 10% of the attempts
    assert plan.attempts == 20000 and plan.honest == 5000
    assert len({b.user_id for b in plan.buyers}) >= 5000 + 1000
    bots = [b for b in plan.buyers if b.bot]
    assert sum(len(s) for b in bots for s in b.steps) == 2000
    assert len(bots) == len(plan.bot_users) == plan.farm.users == 1000  # type: ignore[union-attr]


def test_bot_farm_is_a_few_devices_on_two_subnets_at_the_head_of_the_queue() -> None:
    plan = make_plan(300, 1200, bots=400, seed=5)
    assert plan.attempts == 1200 and plan.honest == 300
    farm = plan.farm
    assert farm is not None and farm.users == 200 and farm.devices == 2
    bots = [_body(b) for b in plan.buyers if b.bot]
    honest = [_body(b) for b in plan.buyers if not b.bot]
    # A farm: many user ids per device, every address inside the farm's /24s, none of them
    # datacenter ranges (the farm is caught by behaviour, not by a list).
    assert len({b["device_id"] for b in bots}) == 2
    assert len({b["user_id"] for b in bots}) == 200
    nets = [ipaddress.ip_network(s) for s in farm.subnets]
    assert len(nets) == 2 and all(n.prefixlen == 24 for n in nets)
    addresses = {ipaddress.ip_address(b["client_ip"]) for b in bots}
    assert all(any(a in n for n in nets) for a in addresses) and len(addresses) > 50
    datacenter = load_datacenter_ranges()
    assert not [a for a in addresses if a in datacenter]
    # Honest buyers: a device and a /24 each, none shared with the farm.
    assert len({b["device_id"] for b in honest}) == 300
    honest_nets = {ipaddress.ip_network(b["client_ip"] + "/24", strict=False) for b in honest}
    assert len(honest_nets) == 300 and not honest_nets & set(nets)
    # The farm fires at the opening: bots and honest buyers alternate at the head of the queue,
    # each device cycling through its users; bots never double-click.
    head = plan.buyers[:400]
    assert [b.bot for b in head] == [True, False] * 200
    assert [_body(b)["device_id"] for b in head[:4:2]] != [_body(head[0])["device_id"]] * 2
    assert {kind for b in plan.buyers if b.bot for s in b.steps for _, kind in s} == {FIRST, SECOND}


class _ChallengingGateway:
    """A loopback stand-in for the purchase endpoint that answers every purchase 428 with a real
    challenge, and 201 to a valid solution (keep-alive HTTP/1.1, just enough of it)."""

    def __init__(self) -> None:
        self.challenges = Challenges(b"s" * 32)
        self.solutions: list[str] = []

    def _signals(self, body: bytes) -> Signals:
        doc = json.loads(body)
        return Signals.of(
            RiskContext(
                "sale",
                "ch",
                doc["user_id"],
                doc["device_id"],
                doc["client_ip"],
                doc.get("user_agent"),
                1,
            )
        )

    def answer(self, head: dict[str, str], body: bytes) -> tuple[int, dict[str, object]]:
        if not body:
            return 200, {"status": "ok"}
        sig = self._signals(body)
        if (solution := head.get(SOLUTION_HEADER.lower())) is not None:
            self.solutions.append(solution)
            if self.challenges.verify(solution, sig, time.time()).challenge_id:
                return 201, {"order_id": "sale.o-" + sig.user_id, "status": "reserved"}
        return 428, {
            "code": "challenge_required",
            "reasons": ["subnet_burst"],
            "challenge": self.challenges.issue(sig, 2000, 60, time.time()),
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while raw := await reader.readuntil(b"\r\n\r\n"):
                lines = raw.decode().split("\r\n")
                head = {
                    k.lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(head.get("content-length", "0")))
                status, doc = self.answer(head, body)
                out = json.dumps(doc).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(out)}\r\n\r\n".encode() + out
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_honest_buyers_solve_challenges_and_bots_do_not() -> None:
    gateway = _ChallengingGateway()
    server = await asyncio.start_server(gateway.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    plan = make_plan(2, 2, bots=0, seed=1)
    farm = make_plan(1, 5, bots=4, seed=1)
    buyers = [*plan.buyers, *farm.buyers]
    bots = farm.bot_users
    try:
        out = await play(f"http://127.0.0.1:{port}", "sale", "key", buyers, time.time(), 2)
    finally:
        server.close()
        await server.wait_closed()
    honest = [a for a in out if a.user_id not in bots]
    assert sorted((a.kind, a.status) for a in honest) == sorted(
        [(FIRST, 428), (SOLVED, 201)] * 3
    )  # three honest buyers, one attempt each
    assert all(a.reasons == "subnet_burst" for a in honest if a.status == 428)
    assert sorted((a.kind, a.status) for a in out if a.user_id in bots) == sorted(
        [(FIRST, 428), (SECOND, 428)] * 2
    )  # never solved
    assert len(gateway.solutions) == 3


def _attempt(
    user: str, key: str, kind: str, status: int, order: str = "", code: str = "", reasons: str = ""
) -> Attempt:
    return Attempt(user, key, kind, status, code, order, 5.0, 1000.0, reasons)


def _delivered(order: str, *keys: str) -> Delivery:
    return Delivery(
        order,
        confirm_sent_at=1.0,
        confirmed_at=1.1,
        delivered_at=1.2,
        delivered_seen_at=1.3,
        card_keys=list(keys),
    )


def _run(
    attempts: list[Attempt],
    deliveries: list[Delivery],
    stock: int = 2,
    ledger: dict[str, int] | None = None,
    buyers: int = 3,
    bots: frozenset[str] = frozenset(),
):  # type: ignore[no-untyped-def]
    ledger = ledger or {
        "total": stock,
        "available": 0,
        "reserved": 0,
        "confirmed": 0,
        "delivered": len(deliveries),
    }
    return audit(
        stock_total=stock,
        imported={"K1", "K2", "K3"},
        buyers=buyers,
        per_user_limit=1,
        attempts=attempts,
        deliveries={d.order_id: d for d in deliveries},
        sale={"stock": ledger},
        opens_at=999.0,
        imported_count=stock,
        load_procs=1,
        concurrency=4,
        bots=bots,
        farm="2 user ids on 1 device(s) in 203.0.113.0/24",
    )


def test_audit_passes_a_clean_sale() -> None:
    result = _run(
        [
            _attempt("u1", "a", FIRST, 201, "o1"),
            _attempt("u1", "a", RETRY, 201, "o1"),
            _attempt("u2", "b", FIRST, 201, "o2"),
            _attempt("u2", "c", SECOND, 409, code="purchase_limit_exceeded"),
            _attempt("u3", "d", FIRST, 409, code="sold_out"),
        ],
        [_delivered("o1", "K1"), _delivered("o2", "K2")],
    )
    assert result.ok, result.failures
    summary = result.summary()
    assert (summary["reserved"], summary["delivered"], summary["oversold"]) == (2, 2, 0)
    assert summary["delivery_p99_ms"] == pytest.approx(200.0)


def test_audit_catches_oversell_duplicates_and_broken_idempotency() -> None:
    result = _run(
        [
            _attempt("u1", "a", FIRST, 201, "o1"),
            _attempt("u1", "a", RETRY, 201, "oX"),
            _attempt("u2", "b", FIRST, 201, "o2"),
            _attempt("u3", "d", FIRST, 201, "o3"),
        ],
        [
            _delivered("o1", "K1"),
            _delivered("oX", "K1"),
            _delivered("o2", "K2"),
            _delivered("o3", "FOREIGN"),
        ],
    )
    assert not result.ok
    assert result.oversold == 2  # four orders on a stock of two
    assert result.idempotency_violations == 1 and result.limit_violations == 1
    assert result.duplicate_keys == 1 and result.lost_orders == 1


def test_audit_catches_a_ledger_that_does_not_add_up() -> None:
    result = _run(
        [_attempt("u1", "a", FIRST, 201, "o1"), _attempt("u2", "b", FIRST, 201, "o2")],
        [_delivered("o1", "K1"), _delivered("o2", "K2")],
        ledger={"total": 2, "available": -1, "reserved": 0, "confirmed": 0, "delivered": 2},
    )
    assert result.oversold == 1 and not result.ok


def test_audit_classes_risk_answers_by_buyer_and_never_as_errors() -> None:
    bots = frozenset({"b1", "b2", "b3"})
    result = _run(
        [
            # honest: one plain purchase, one after a challenge (same key), one sold out
            _attempt("u1", "a", FIRST, 201, "o1"),
            _attempt("u2", "b", FIRST, 428, code="challenge_required", reasons="ip_burst"),
            _attempt("u2", "b", SOLVED, 201, "o2"),
            _attempt("u3", "c", FIRST, 409, code="sold_out"),
            # bots: one got a key before the farm was detected, the rest were refused
            _attempt("b1", "x", FIRST, 201, "o3"),
            _attempt(
                "b1", "y", SECOND, 403, code="risk_denied", reasons="device_many_users,subnet_burst"
            ),
            _attempt("b2", "z", FIRST, 428, code="challenge_required", reasons="device_many_users"),
            _attempt("b2", "z", RETRY, 428, code="challenge_required", reasons="device_many_users"),
            _attempt("b3", "w", FIRST, 429, code="rate_limited"),
            _attempt("b3", "v", SECOND, 0),  # no answer, then a refusal: not an error
            _attempt("b3", "v", NET_RETRY, 403, code="risk_denied", reasons="device_many_users"),
        ],
        [_delivered("o1", "K1"), _delivered("o2", "K2"), _delivered("o3", "K3")],
        stock=3,
        bots=bots,
    )
    assert result.ok, result.failures
    assert result.errors == 0 and result.idempotency_violations == 0
    s = result.summary()
    assert s["attempts"] == 9  # planned: the solved retry and the network retry are extra
    assert (
        s["honest_attempts"],
        s["honest_reserved"],
        s["honest_challenged"],
        s["honest_denied"],
        s["honest_keys"],
        s["honest_users_with_key"],
    ) == (3, 2, 1, 0, 2, 2)
    # Per planned attempt, its first answer (b3's key v: no answer, so neither).
    assert (
        s["bot_users"],
        s["bot_attempts"],
        s["bot_reserved"],
        s["bot_denied"],
        s["bot_challenged"],
        s["bot_rate_limited"],
        s["bot_keys"],
    ) == (3, 6, 1, 1, 2, 1, 1)
    assert result.classes["honest"].solved == 1
    assert result.classes["bot"].reasons["device_many_users"] == 3
    assert result.warnings == ["bots got 1 of 3 keys (over 10%)"]  # reported, not a failure
    report = render(result)
    assert "Risk: honest buyers vs the bot farm" in report and "RESULT: PASS" in report
    assert "4 of 6 (66.7%) denied, challenged or rate limited" in report
    assert "WARNING: bots got 1 of 3 keys" in report


def test_audit_demand_counts_only_buyers_the_ledger_answered() -> None:
    # Stock 3, but risk refused two of the four buyers outright: two reservations are right.
    attempts = [
        _attempt("u1", "a", FIRST, 201, "o1"),
        _attempt("u2", "b", FIRST, 201, "o2"),
        _attempt("b1", "x", FIRST, 403, code="risk_denied"),
        _attempt("b2", "y", FIRST, 428, code="challenge_required"),
    ]
    result = _run(
        attempts,
        [_delivered("o1", "K1"), _delivered("o2", "K2")],
        stock=3,
        ledger={"total": 3, "available": 1, "reserved": 0, "confirmed": 0, "delivered": 2},
        buyers=2,
        bots=frozenset({"b1", "b2"}),
    )
    assert result.ok, result.failures
    assert result.warnings == []
    # ... but a sale that stopped short while a buyer reached the ledger is a failure.
    short = _run(
        [*attempts, _attempt("u3", "c", FIRST, 409, code="sold_out")],
        [_delivered("o1", "K1"), _delivered("o2", "K2")],
        stock=3,
        ledger={"total": 3, "available": 1, "reserved": 0, "confirmed": 0, "delivered": 2},
        buyers=3,
        bots=frozenset({"b1", "b2"}),
    )
    assert not short.ok and "reserved 2, expected 3" in short.failures[0]


def test_audit_a_refusal_then_a_success_on_one_key_is_a_violation() -> None:
    result = _run(
        [
            _attempt("u1", "a", FIRST, 403, code="risk_denied"),
            _attempt("u1", "a", RETRY, 201, "o1"),
            _attempt("u2", "b", FIRST, 201, "o2"),
        ],
        [_delivered("o1", "K1"), _delivered("o2", "K2")],
    )
    assert result.idempotency_violations == 1 and not result.ok
    assert result.warnings == ["risk refused honest buyers: 1 denied, 0 rate limited"]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0


def test_printed_urls_hide_passwords() -> None:
    assert redact("postgresql://app:s3cret@db:5432/fg") == "postgresql://app:*****@db:5432/fg"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
