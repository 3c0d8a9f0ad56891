"""The docs' examples, run as written against a real `flashgate up` (tests/docs_runner.py has the
convention: ```sh blocks, `<!-- docs-test: skip (why) -->`, `# →` answers).

`up` runs as a person starts it, in a directory of its own (where the examples run, so
`.run/flashgate.env` is there, and `.venv` links to this venv, as in the repository root), with
two differences that keep the test fast and out of other
people's way: the harness's Redis and PostgreSQL (a scratch database and a key prefix of its
own) instead of embedded ones, and `--port 0` (8000 may be taken on a shared machine; the
examples read the URL from the env file, as they do after `make up`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.embedded import ServiceURLs, stop_process
from tests import docs_runner
from tests.conftest import scratch_database

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the venv's: `flashgate`, `python3`


@pytest.fixture(scope="module")
async def docs_database(service_urls: ServiceURLs) -> AsyncIterator[str]:
    async with scratch_database(service_urls.database_url, "flashgate_docs_") as url:
        yield url


@pytest.fixture(scope="module")
def stack_dir(
    service_urls: ServiceURLs, docs_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A directory in which `flashgate up` runs (stopped by PID at the end)."""
    where = tmp_path_factory.mktemp("docs")
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):
        (where / ".venv").symlink_to(venv)  # the repository root has .run/ beside .venv/
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHGATE_")}
    env.update(
        FLASHGATE_REDIS_URL=service_urls.redis_url,
        FLASHGATE_DATABASE_URL=docs_database,
        FLASHGATE_KEY_PREFIX="fgdoc" + secrets.token_hex(4),
        FLASHGATE_WORKER_BLOCK_MS="100",
    )
    proc = subprocess.Popen(
        [str(BIN / "flashgate"), "up", "--port", "0", "--workers", "1"],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if not line or line.startswith("pids "):
                break
        assert (where / ".run" / "flashgate.env").exists(), "".join(seen)
        yield where
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(proc, timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _shell_env(home: Path) -> dict[str, str]:
    """A newcomer's shell: nothing of Flashgate set, no venv on PATH (`source
    .run/flashgate.env` or `.venv/bin/activate` puts it there, as the docs say)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


@pytest.mark.timeout(150)
def test_docs_examples_run_as_written(stack_dir: Path, tmp_path: Path) -> None:
    failures: list[str] = []
    ran = 0
    for doc in DOCS:
        for i, session in enumerate(docs_runner.sessions(doc)):
            found, log = docs_runner.run_session(
                session, stack_dir, _shell_env(stack_dir), tmp_path / f"{doc.stem}-{i}"
            )
            ran += sum(len(b.steps) for b in session)
            failures += [
                f"{f}\n--- session log (tail) ---\n{log[-2500:]}" if n == 0 else str(f)
                for n, f in enumerate(found)
            ]
    assert not failures, "\n\n".join(failures)
    assert ran >= 20, f"only {ran} documented steps ran: are the examples skipped?"


def test_the_newcomer_docs_are_runnable() -> None:
    """The example session, the CLI tour and the runbook are run, not skipped."""
    runnable = {
        (b.path.name, b.section) for doc in DOCS for s in docs_runner.sessions(doc) for b in s
    }
    for where in [
        ("README.md", "API"),
        ("README.md", "Commands"),
        ("OPERATIONS.md", "Sale-day checklist"),
        ("OPERATIONS.md", "Deploy and rollback"),
        ("OPERATIONS.md", "Redis persistence and reconciliation"),
    ]:
        assert where in runnable, where
    for doc in DOCS:
        for block in docs_runner.blocks(doc):
            assert block.skip is None or block.skip.strip(), f"{doc}:{block.line}: no reason"


def test_every_curl_with_a_body_names_its_content_type() -> None:
    bad = [line for doc in DOCS for line in docs_runner.curls_without_content_type(doc)]
    assert not bad, "curl with a body needs -H 'Content-Type: …':\n" + "\n".join(bad)


# -- the runner itself ---------------------------------------------------------------------
def test_answers_match_status_keys_and_wildcards() -> None:
    check = docs_runner.check
    body = '{"order_id":"s.01J","status":"reserved","expires_at":"2026-12-01T12:05:00Z"}'
    assert (
        check('201 {"order_id":"s.…","status":"reserved","expires_at":"…"}', body, ["201"]) is None
    )
    assert check('{"order_id":"s.…",…}', body, []) is None
    assert "expected HTTP 201, got 409" in (check("201 {…}", body, ["409"]) or "")
    assert "keys not in the docs" in (check('{"order_id":"…"}', body, []) or "")
    assert "missing" in (check('{"order_id":"…","x":1,…}', body, []) or "")
    assert "expected 'confirmed'" in (check('{"status":"confirmed",…}', body, []) or "")
    assert "does not match" in (check('{"order_id":"t.…",…}', body, []) or "")
    assert check('{"a": …, "b": […], "c": ["k-…"]}', '{"a":[1],"b":[1,2],"c":["k-1"]}', []) is None
    assert "expected 1 items" in (check('{"c":["…"]}', '{"c":[]}', []) or "")
    # The last JSON document printed; text after the documented JSON is a comment.
    assert check('{"n": 2} (the second)', '{"n": 1}{"n": 2}\n', []) is None
    assert check("alive: …", "no\nalive: vm-1, vm-2\n", []) is None
    assert check("exit 1", "exit 0\n", []) is not None
    assert "no curl ran" in (check("200", "", []) or "")


def test_blocks_steps_and_skips(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text(
        '## One\n```sh\necho \'{"a": 1}\'\n# → {"a": 1}\necho x\n```\n'
        "<!-- docs-test: skip (needs a cluster) -->\n```sh\nkubectl get pods\n```\n"
        "```json\n## not a heading\n```\n## Two\n```sh\nfalse\n```\n"
    )
    found = docs_runner.blocks(doc)
    assert [(b.section, b.skip) for b in found] == [
        ("One", None),
        ("One", "needs a cluster"),
        ("Two", None),
    ]
    assert [(s.line, s.expect) for s in found[0].steps] == [(3, '{"a": 1}'), (5, None)]
    sessions = docs_runner.sessions(doc)
    assert len(sessions) == 2
    failures, _log = docs_runner.run_session(
        sessions[0], tmp_path, _shell_env(tmp_path), tmp_path / "w1"
    )
    assert failures == []
    failures, _log = docs_runner.run_session(
        sessions[1], tmp_path, _shell_env(tmp_path), tmp_path / "w2"
    )
    assert len(failures) == 1 and "d.md:16" in failures[0].why
    doc.write_text(
        "```sh\ncurl -X POST http://x -d '{}'\ncurl -X POST http://x \\\n"
        "  -H 'Content-Type: application/json' -d '{}'\n```\n"
    )
    assert docs_runner.curls_without_content_type(doc) == ["d.md:2: curl -X POST http://x -d '{}'"]
