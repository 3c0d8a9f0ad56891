"""The gateway under granian instead of uvicorn, for the bench's server comparison (issue #4).

The same app (`gateway.app:create_app`, a factory, its lifespan run by granian's ASGI
interface), the same host and port, one worker process on uvloop, access log off: only the
server differs from `cli.stack.gateway_argv`. Granian runs a supervisor process that starts
the worker; SIGTERM to the supervisor's PID stops the worker (lifespan shutdown included), so
it is stopped by PID like every other gateway.
"""

from __future__ import annotations

import sys

# The best of what was tried on this machine (docs/PERFORMANCE.md, notes): HTTP/1 only (the
# clients here speak HTTP/1.1) on a single-threaded Rust runtime (for ASGI granian picks the
# multi-threaded one; `st` served the trivial endpoint ~15% faster and purchases no slower).
# `python -m bench.run --granian-options '...'` overrides it to re-check.
OPTIONS: tuple[str, ...] = ("--http", "1", "--runtime-mode", "st")
# Past this the supervisor kills a worker stuck in shutdown itself: our SIGKILL, after
# GATEWAY_STOP_GRACE_S, reaches only the supervisor's PID.
KILL_TIMEOUT_S = 5


def granian_argv(
    host: str,
    port: int,
    options: tuple[str, ...] = OPTIONS,
    factory: str = "gateway.app:create_app",
) -> list[str]:
    """`factory`: another app factory (a test wraps the gateway's to watch its lifespan)."""
    return [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--workers-kill-timeout",
        str(KILL_TIMEOUT_S),
        *options,
        factory,
    ]
