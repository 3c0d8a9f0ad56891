"""The env file of a running `flashgate up`: everything a shell or the CLI needs to reach it.

`up` writes `<run dir>/flashgate.env` (mode 0600: it holds the admin token and the master key)
and points `.run/flashgate.env`, in the directory it was started from, at it (a symlink). Both
go when `up` stops. `source .run/flashgate.env` exports the variables into a shell, and puts
the venv's `flashgate` first on its PATH; the CLI reads the file by itself when nothing names a
gateway or servers (`discover`).

The file is shell: one `export NAME=value` a line, values quoted with `shlex.quote`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

FILE_NAME = "flashgate.env"
RUN_ROOT = Path(".run")
POINTER = RUN_ROOT / FILE_NAME  # relative to the directory `up` was started from
# What `up` writes, in this order. The last three say which `up` wrote it (discover, and `up`
# itself ignoring the variables of a previous one that a shell sourced).
VARIABLES = (
    "FLASHGATE_URL",
    "FLASHGATE_ADMIN_TOKEN",
    "FLASHGATE_MASTER_KEY",
    "FLASHGATE_REDIS_URL",
    "FLASHGATE_DATABASE_URL",
    "FLASHGATE_KEY_PREFIX",
    "FLASHGATE_METRICS_URL",
    "FLASHGATE_WORKER_METRICS_URLS",
    "FLASHGATE_RUN_DIR",
    "FLASHGATE_UP_PID",
    "FLASHGATE_ENV_FILE",
)
SERVER_VARIABLES = ("FLASHGATE_URL", "FLASHGATE_REDIS_URL", "FLASHGATE_DATABASE_URL")


def render(values: Mapping[str, str], bin_dir: Path | None = None) -> str:
    """The file's text; `bin_dir` (the venv's bin, where `flashgate` is) goes first on PATH."""
    lines = [
        "# flashgate up: `source` this file to reach the running stack. It holds secrets",
        "# (admin token, master key) and is deleted when `up` stops.",
    ]
    lines += [f"export {name}={shlex.quote(values[name])}" for name in VARIABLES if name in values]
    if bin_dir is not None:
        lines.append(f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"')
    pid = values.get("FLASHGATE_UP_PID", "")
    if pid.isdigit():  # `up` was killed before it could delete this file: say so
        lines.append(
            f"kill -0 {pid} 2>/dev/null || echo 'flashgate.env: its flashgate up (pid "
            f"{pid}) is not running: stale values' >&2"
        )
    return "\n".join(lines) + "\n"


def cli_bin_dir() -> Path | None:
    """The directory of the `flashgate` command that runs us, if it is a venv's."""
    bin_dir = Path(sys.executable).parent
    in_venv = sys.prefix != sys.base_prefix
    return bin_dir if in_venv and (bin_dir / "flashgate").exists() else None


def write(
    run_dir: Path,
    values: Mapping[str, str],
    pointer: Path | None = POINTER,
    bin_dir: Path | None = None,
) -> Path:
    """Write `<run_dir>/flashgate.env` (0600 from its creation) and point `pointer` at it."""
    path = (run_dir / FILE_NAME).resolve()
    values = {**values, "FLASHGATE_ENV_FILE": str(path)}
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(values, bin_dir))
    if pointer is not None:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(path)
        tmp.replace(pointer)  # atomic: a reader sees the old link or the new one
    return path


def remove(path: Path, pointer: Path | None = POINTER) -> None:
    """Delete the env file, and the pointer if it still points at it (a newer `up` may have
    taken the pointer over)."""
    if pointer is not None and pointer.is_symlink():
        with contextlib.suppress(OSError):
            if Path(os.readlink(pointer)) == path:
                pointer.unlink()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read(path: Path) -> dict[str, str]:
    """The variables of an env file (its `export NAME=value` lines of VARIABLES; PATH and
    comments ignored)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            if name in VARIABLES:
                values[name] = value
    return values


def _alive(pid_text: str | None) -> bool:
    try:
        pid = int(pid_text or "")
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def discover(cwd: Path | None = None) -> tuple[Path, dict[str, str]] | None:
    """The env file of a live `flashgate up` started in `cwd`: `.run/flashgate.env`, else the
    newest `.run/*/flashgate.env`. A file whose `up` is gone (killed before it could delete
    it) is skipped."""
    root = (cwd or Path.cwd()) / RUN_ROOT
    candidates = [root / FILE_NAME]
    with contextlib.suppress(OSError):
        candidates += sorted(root.glob(f"*/{FILE_NAME}"), key=_mtime, reverse=True)
    for path in candidates:
        try:
            values = read(path)
        except OSError:
            continue
        if _alive(values.get("FLASHGATE_UP_PID")):
            return path, values
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def sourced_from_previous_up(env: Mapping[str, str]) -> list[str]:
    """The variables in `env` that a shell got by sourcing an `up`'s env file: FLASHGATE_ENV_FILE
    marks it. A new `up` ignores them (that stack's servers and secrets are not its own)."""
    if not env.get("FLASHGATE_ENV_FILE"):
        return []
    return [name for name in VARIABLES if name in env]
