"""What `make loadtest` prints while Locust runs: the locustfile appends a JSON snapshot to
FG_PROGRESS every few seconds; `Follower` reads the lines written since its last call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def describe(snap: dict[str, Any]) -> str:
    """One line a person can follow: time, users, load, purchase p99 so far, failures."""
    return (
        f"loadtest: {snap.get('t_s', 0):>5.0f} s  {snap.get('users', 0):>5} users  "
        f"{snap.get('rps', 0):>7.1f} req/s  {snap.get('requests', 0):>7} requests "
        f"({snap.get('purchases', 0)} purchases, p99 so far "
        f"{snap.get('purchase_p99_ms', 0):.0f} ms)  {snap.get('failures', 0)} failed"
    )


class Follower:
    """Reads a JSON-lines file as it grows; a partly written last line waits for next time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
