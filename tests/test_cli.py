"""The CLI end to end, as a person runs it: `flashgate up` starts and stops cleanly (no process
left behind), the admin commands work against it, and a small `flashgate demo` passes its audit.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from core.embedded import ServiceURLs, stop_process
from tests.conftest import scratch_database

CLI = [sys.executable, "-m", "cli.main"]
SERVICE_VARS = ("FLASHGATE_REDIS_URL", "FLASHGATE_DATABASE_URL")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _processes_in(run_dir: Path) -> list[int]:
    """Processes whose working directory or command line is under run_dir (the embedded
    servers: valkey chdirs into its --dir, postgres into its data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd.startswith(str(run_dir)) or str(run_dir) in cmdline) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float) -> tuple[str, str]:
    """Read stdout until a line starts with prefix; returns (that line, everything read)."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line, "".join(seen)
    raise AssertionError(f"no {prefix!r} line from flashgate up:\n{''.join(seen)}")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_and_stops_everything(tmp_path: Path, stop_signal: signal.Signals) -> None:
    # Embedded servers on purpose: this is the path a fresh machine takes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHGATE_")}
    master_key = base64.b64encode(secrets.token_bytes(32)).decode()
    given_token = "given-admin-token-" + secrets.token_urlsafe(24)
    if stop_signal == signal.SIGINT:
        env["FLASHGATE_MASTER_KEY"] = master_key  # given: used, never printed
    else:
        env["FLASHGATE_ADMIN_TOKEN"] = given_token  # given: used, never printed
    run_dir = tmp_path / "run"
    # --port 0: 8000 (the default when free) may be another person's on a shared machine.
    proc = subprocess.Popen(
        [*CLI, "up", "--workers", "1", "--port", "0", "--run-dir", str(run_dir)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        pids_line, out = _wait_for_line(proc, "pids ", 90)
        pids = {k: int(v) for k, v in (p.split("=") for p in pids_line.split()[1:])}
        assert set(pids) == {"gateway", "worker-1"}
        url = next(
            w
            for line in out.splitlines()
            if line.strip().startswith("gateway")
            for w in line.split()
            if w.startswith("http://")
        )
        token_line = next(
            line for line in out.splitlines() if line.strip().startswith("admin token")
        )
        assert httpx.get(url + "/healthz").status_code == 200
        servers = _processes_in(run_dir)
        assert servers, "the embedded servers should run under the run dir"
        assert master_key not in out and "master" not in out.lower()
        env_file = _env_file_of_up(tmp_path, run_dir, url, out)
        if stop_signal == signal.SIGINT:
            token = token_line.split()[-1]  # generated: printed
            assert env_file["FLASHGATE_ADMIN_TOKEN"] == token
            assert env_file["FLASHGATE_MASTER_KEY"] == master_key
            _admin_commands_work(url, token, env, tmp_path)
        else:
            assert given_token not in out and "(from FLASHGATE_ADMIN_TOKEN)" in token_line
            assert env_file["FLASHGATE_ADMIN_TOKEN"] == given_token
            _commands_find_the_running_up(tmp_path, env)

        proc.send_signal(stop_signal)
        assert proc.wait(60) == 0
        assert not (tmp_path / ".run" / "flashgate.env").is_symlink()
        assert not (run_dir / "flashgate.env").exists()
    finally:
        if proc.poll() is None:  # a failed assertion: still let `up` stop what it started
            stop_process(proc, timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    assert not [p for p in pids.values() if _alive(p)]
    assert not [p for p in servers if _alive(p)]
    assert _processes_in(run_dir) == []


def _env_file_of_up(cwd: Path, run_dir: Path, url: str, out: str) -> dict[str, str]:
    """`up` wrote its env file (0600) in the run dir, linked from .run/flashgate.env, and the
    worker metrics it lists answer."""
    from cli import envfile

    path = run_dir / "flashgate.env"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (cwd / ".run" / "flashgate.env").resolve() == path.resolve()
    values = envfile.read(path)
    assert values["FLASHGATE_URL"] == url
    assert values["FLASHGATE_METRICS_URL"] in out
    worker_urls = values["FLASHGATE_WORKER_METRICS_URLS"].split()
    assert len(worker_urls) == 1 and worker_urls[0] in out  # listed in the banner
    r = httpx.get(worker_urls[0])
    assert r.status_code == 200 and "flashgate_worker_last_loop_timestamp_seconds" in r.text
    return values


def _commands_find_the_running_up(cwd: Path, env: dict[str, str]) -> None:
    """Nothing set: the CLI reads .run/flashgate.env of the directory (admin commands and the
    ones that read the servers), instead of "cannot reach 127.0.0.1:8000"."""
    bare = {k: v for k, v in env.items() if not k.startswith("FLASHGATE_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], env=bare, cwd=cwd, capture_output=True, text=True, timeout=30
        )

    r = cli(
        "sale",
        "create",
        "--sale-id",
        "found",
        "--sku",
        "S",
        "--name",
        "N",
        "--starts-at",
        "now",
        "--ends-at",
        "+1h",
    )
    assert r.returncode == 0, r.stderr
    assert "flashgate.env" in r.stderr  # it says which stack it used
    r = cli("reconcile", "found", "--check")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    r = cli("worker-check", "--any")
    assert r.returncode == 0, r.stdout + r.stderr


def _admin_commands_work(url: str, token: str, env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FLASHGATE_URL": url, "FLASHGATE_ADMIN_TOKEN": token}
    r = _cli("channel", "create", "shop", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["api_key"]
    sale_id = "cli-" + uuid.uuid4().hex[:8]
    r = _cli(
        "sale",
        "create",
        "--sale-id",
        sale_id,
        "--sku",
        "SKU",
        "--name",
        "CLI sale",
        "--starts-at",
        "now",
        "--ends-at",
        "+1h",
        "--per-user-limit",
        "2",
        "--reservation-ttl-s",
        "60",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["per_user_limit"] == 2
    (tmp_path / "k.txt").write_text("T1\nT2\nT2\n")
    (tmp_path / "k.csv").write_text("code,note\nC1,a\nC2,b\n")
    (tmp_path / "k.json").write_text(json.dumps({"keys": ["J1"]}))
    imported = []
    for name in ("k.txt", "k.csv", "k.json"):
        r = _cli("keys", "import", sale_id, str(tmp_path / name), env=env)
        assert r.returncode == 0, r.stderr
        imported.append(json.loads(r.stdout)["imported"])
    assert imported == [2, 2, 1]
    r = _cli("sale", "show", sale_id, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["stock"]["total"] == 5
    # Errors: the problem+json on stderr, exit 1.
    r = _cli("sale", "show", "no-such-sale", env=env)
    assert r.returncode == 1 and json.loads(r.stderr)["code"] == "not_found"
    r = _cli("sale", "show", sale_id, env={**env, "FLASHGATE_ADMIN_TOKEN": "wrong"})
    assert r.returncode == 1 and json.loads(r.stderr)["code"] == "unauthorized"


@pytest.fixture
async def demo_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    """A database of its own on the session's PostgreSQL (given or embedded)."""
    async with scratch_database(service_urls.database_url, "flashgate_demo_") as url:
        yield url


@pytest.mark.timeout(240)
def test_small_demo_passes_its_audit(service_urls: ServiceURLs, demo_database: str) -> None:
    env = {
        **os.environ,
        "FLASHGATE_REDIS_URL": service_urls.redis_url,
        "FLASHGATE_DATABASE_URL": demo_database,
        "FLASHGATE_KEY_PREFIX": "fgdemo" + secrets.token_hex(4),
    }
    r = subprocess.run(
        [
            *CLI,
            "demo",
            "--keys",
            "50",
            "--buyers",
            "300",
            "--attempts",
            "1000",
            "--opens-in-s",
            "2",
            "--delivery-timeout-s",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary["stock"] == 50 and summary["attempts"] == 1000 and summary["buyers"] == 300
    assert summary["reserved"] == summary["confirmed"] == summary["delivered"] == 50
    assert summary["oversold"] == summary["duplicate_keys"] == summary["lost_orders"] == 0
    for key in ("purchase_p50_ms", "purchase_p99_ms", "delivery_p99_ms", "elapsed_s"):
        assert summary[key] >= 0
    # The default bot farm (10% of the attempts): mostly refused by risk; the keys go to people.
    assert summary["bot_attempts"] == 100 and summary["honest_attempts"] == 900
    refused = summary["bot_denied"] + summary["bot_challenged"] + summary["bot_rate_limited"]
    assert refused >= 50, summary
    assert summary["honest_keys"] + summary["bot_keys"] == 50
    assert summary["honest_keys"] > summary["bot_keys"], summary
    assert summary["honest_denied"] == 0 and summary["errors"] == 0
    assert "RESULT: PASS" in r.stdout and "Risk: honest buyers vs the bot farm" in r.stdout
    pids_line = next(line for line in r.stdout.splitlines() if line.startswith("demo: pids "))
    pids = [int(p.split("=")[1]) for p in pids_line.split()[2:]]
    assert len(pids) == 3  # the gateway and two workers, all stopped again
    assert not [p for p in pids if _alive(p)]
