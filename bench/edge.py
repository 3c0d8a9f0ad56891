"""What the HTTP edge's checks cost a purchase request, in process (no server, no Redis).

    .venv/bin/python -m bench.edge [--rounds 15]

- the duplicate-key check (gateway/duplicate_keys.py) on a usual purchase body, against its
  msgspec decode, and its slow path (the standard library's json with a hook on every object);
- the media-type rule (gateway/state.is_json) on `application/json; charset=utf-8`.
Each figure is the median over the rounds of the best of 3 timings of 20,000 calls (the
machine is shared: the best of 3 drops most of the other processes' noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit

import msgspec

from gateway.duplicate_keys import refuse_duplicate_keys, repeated_key
from gateway.models import PurchaseBody
from gateway.state import is_json

BODY = json.dumps(
    {
        "user_id": "u-123456",
        "client_ip": "203.0.113.7",
        "device_id": "dev-u-123456",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
    }
).encode()
CASES = {
    "msgspec decode": "decoder.decode(BODY)",
    "duplicate-key check (pre-check passes)": "refuse_duplicate_keys(BODY, PurchaseBody)",
    "duplicate-key slow path (json.loads + hook)": "repeated_key(BODY)",
    "media-type rule": "is_json('application/json; charset=utf-8')",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    env = {
        "decoder": msgspec.json.Decoder(PurchaseBody),
        "BODY": BODY,
        "refuse_duplicate_keys": refuse_duplicate_keys,
        "repeated_key": repeated_key,
        "PurchaseBody": PurchaseBody,
        "is_json": is_json,
    }
    refuse_duplicate_keys(BODY, PurchaseBody)  # builds the type's field names once
    times: dict[str, list[float]] = {name: [] for name in CASES}
    n = 20_000
    for _ in range(args.rounds):
        for name, stmt in CASES.items():
            best = min(timeit.repeat(stmt, number=n, repeat=3, globals=env))
            times[name].append(best / n * 1e9)
    print(f"purchase body of {len(BODY)} bytes, {args.rounds} rounds")
    for name, values in times.items():
        print(
            f"  {name}: median {statistics.median(values):,.0f} ns "
            f"(min {min(values):,.0f}, max {max(values):,.0f})"
        )


if __name__ == "__main__":
    main()
