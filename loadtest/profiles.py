"""Load shapes as plain schedules (no Locust import, so tests can check them without gevent).

A schedule maps seconds since the test started to (users, spawn rate), or None when the test
is over. `loadtest/locustfile.py` wraps the one chosen by FG_SHAPE in a `LoadTestShape`.
"""

from __future__ import annotations

from dataclasses import dataclass

Tick = tuple[int, float] | None


@dataclass(frozen=True)
class Spike:
    """A flash sale: a few idle users before the opening, all `peak` users within `ramp_s`
    of it (they wait for the opening second themselves), then a tail of `tail_share` of them
    until `duration_s`."""

    peak: int = 2000
    opens_at_s: float = 5.0  # the sale opens this long after the test starts
    ramp_s: float = 2.0  # from idle to `peak` users
    hold_s: float = 10.0  # at peak after the opening
    tail_share: float = 0.2
    duration_s: float = 30.0
    idle_users: int = 10

    def tick(self, t: float) -> Tick:
        if t >= self.duration_s:
            return None
        start_ramp = max(0.0, self.opens_at_s - self.ramp_s)
        if t < start_ramp:
            return self.idle_users, float(self.idle_users)
        rate = max(1.0, self.peak / self.ramp_s)
        if t < self.opens_at_s + self.hold_s:
            return self.peak, rate
        return max(1, int(self.peak * self.tail_share)), rate


@dataclass(frozen=True)
class Steady:
    """A constant population after a linear ramp: the shape for SLA checks at a known load."""

    users: int = 200
    ramp_s: float = 5.0
    duration_s: float = 60.0

    def tick(self, t: float) -> Tick:
        if t >= self.duration_s:
            return None
        return self.users, max(1.0, self.users / max(self.ramp_s, 0.001))


def schedule(name: str, *, users: int, opens_at_s: float, duration_s: float) -> Spike | Steady:
    if name == "spike":
        return Spike(
            peak=users,
            opens_at_s=opens_at_s,
            duration_s=duration_s,
            idle_users=max(1, min(10, users // 100)),
        )
    if name == "steady":
        return Steady(users=users, duration_s=duration_s)
    raise ValueError(f"unknown shape {name!r}: spike or steady")
