"""Client helper: solve a challenge from a 428 `challenge_required` answer.

    r = post(purchase)                       # 428
    header = solve(r.json()["challenge"])    # a few ms to a second of SHA-256
    post(purchase, headers={SOLUTION_HEADER: header})

The challenge is ALTCHA v2 JSON, so browsers can use the ALTCHA widget instead.
"""

from __future__ import annotations

from typing import Any

import altcha

SOLUTION_HEADER = "Flashgate-Challenge-Solution"


class Unsolvable(Exception):
    pass


def solve(challenge: dict[str, Any], timeout_s: float = 30.0) -> str:
    """The value of the solution header for a challenge (base64 ALTCHA payload)."""
    parsed = altcha.Challenge.from_dict(challenge)
    solution = altcha.solve_challenge(parsed, timeout=timeout_s, counter_mode="uint32")
    if solution is None:
        raise Unsolvable("no solution found in time")
    return str(altcha.Payload(parsed, solution).to_base64())
