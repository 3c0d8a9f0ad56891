"""Where load may go: this machine's loopback only (a deployment is reached through a tunnel
to it, e.g. `kubectl port-forward`). One rule for loadtest/run.py and the locustfile, which
must not import each other (the locustfile's gevent patching stays out of run.py)."""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_loopback(url: str, what: str) -> None:
    """ValueError, naming `what` (the option), unless `url` points at a loopback address."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError(f"{what} must be a loopback address ({', '.join(LOOPBACK)}), got {url!r}")
