"""Admin commands: thin calls to the admin HTTP API of a running gateway.

Each prints the JSON answer on stdout. An error answer (application/problem+json) is printed
as it came, on stderr, and the command exits 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from cli import envfile

DEFAULT_URL = "http://127.0.0.1:8000"
_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AdminError(Exception):
    """The API answered with an error, or could not be reached; `body` is what to print."""

    def __init__(self, body: str) -> None:
        super().__init__(body)
        self.body = body


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str, now: datetime | None = None) -> str:
    """RFC 3339 passes through; `now` and `+30s` / `+10m` / `+2h` / `+1d` are relative to now."""
    now = now or datetime.now(UTC)
    if value == "now":
        return rfc3339(now)
    m = _RELATIVE.match(value)
    if m:
        return rfc3339(now + timedelta(seconds=float(m[1]) * _UNITS[m[2]]))
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected RFC 3339 (2030-01-01T12:00:00Z), 'now' or '+10m'"
        ) from exc
    return value


def stack_env(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """The environment, filled in from the env file of a `flashgate up` running from `cwd`
    when it names no gateway or server (FLASHGATE_URL, _REDIS_URL, _DATABASE_URL all unset).
    What the environment sets always wins; a note on stderr says which file was used."""
    env = dict(os.environ if environ is None else environ)
    if any(env.get(name) for name in envfile.SERVER_VARIABLES):
        return env
    found = envfile.discover(cwd)
    if found is None:
        return env
    path, values = found
    print(f"(using the flashgate up of {path}: {values.get('FLASHGATE_URL', '')})", file=sys.stderr)
    return {**values, **{k: v for k, v in env.items() if v}}


def connection(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The gateway and admin token: --url / --token, else FLASHGATE_URL /
    FLASHGATE_ADMIN_TOKEN, else those of a running `flashgate up` (its env file), else
    DEFAULT_URL and no token (an error that says so)."""
    env = dict(os.environ if environ is None else environ)
    url: str | None = getattr(args, "url", None)
    token: str | None = getattr(args, "token", None) or env.get("FLASHGATE_ADMIN_TOKEN")
    if url is None:
        env = stack_env(env)
        token = token or env.get("FLASHGATE_ADMIN_TOKEN")
    elif not token:  # --url of the running up: its token
        found = envfile.discover()
        if found is not None and found[1].get("FLASHGATE_URL") == url.rstrip("/"):
            token = found[1].get("FLASHGATE_ADMIN_TOKEN")
    return url or env.get("FLASHGATE_URL") or DEFAULT_URL, token or ""


def admin_client(url: str, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
    token = token if token is not None else os.environ.get("FLASHGATE_ADMIN_TOKEN", "")
    if not token:
        raise AdminError(
            "no admin token: set FLASHGATE_ADMIN_TOKEN (`source "
            ".run/flashgate.env` after `flashgate up`) or pass --token"
        )
    return httpx.Client(
        base_url=url.rstrip("/"), timeout=timeout, headers={"Authorization": f"Bearer {token}"}
    )


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach {client.base_url}: {exc}") from exc
    if r.status_code >= 400:
        raise AdminError(r.text or f"HTTP {r.status_code}")
    return r.json()


def key_import_request(path: Path) -> dict[str, Any]:
    """The request for a key file: .txt one code per line, .csv with a `code` column, .json
    either {"keys": [...]} or a bare list. Text and CSV go as they are; the gateway parses."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = json.loads(data)
        return {"json": {"keys": doc} if isinstance(doc, list) else doc}
    if suffix == ".csv":
        header = next(csv.reader([data.decode("utf-8-sig").split("\n", 1)[0]]), [])
        if "code" not in [h.strip() for h in header]:
            raise AdminError(f"{path}: the CSV needs a 'code' column (header: {header})")
        return {"content": data, "headers": {"Content-Type": "text/csv"}}
    return {"content": data, "headers": {"Content-Type": "text/plain; charset=utf-8"}}


def import_params(normalize: str | None, run_async: bool | None) -> dict[str, str]:
    """The query of a key import: its dedup rules, and sync/async (None: the gateway decides
    by the body's size)."""
    params = {"normalize": normalize} if normalize else {}
    if run_async is not None:
        params["async"] = "true" if run_async else "false"
    return params


def wait_for_import(
    client: httpx.Client, out: Any, poll_s: float = 0.5, sleep: Callable[[float], None] = time.sleep
) -> Any:
    """An import answered as a job (`status` running) is polled until it is done or failed;
    a failed one is an error. A finished answer passes through."""
    while isinstance(out, dict) and out.get("status") == "running":
        sleep(poll_s)
        out = call(client, "GET", f"/v1/admin/imports/{out['import_id']}")
    if isinstance(out, dict) and out.get("status") == "failed":
        raise AdminError(json.dumps(out, indent=2))
    return out


def run(args: argparse.Namespace) -> int:
    url, token = connection(args)
    try:
        with admin_client(url, token) as client:
            out = _dispatch(client, args)
    except AdminError as exc:
        print(exc.body, file=sys.stderr)
        if url == DEFAULT_URL and exc.body.startswith("cannot reach"):
            print(
                "no flashgate up runs from this directory (.run/flashgate.env): start one "
                "with `make up`, or name the gateway with FLASHGATE_URL or --url",
                file=sys.stderr,
            )
        return 1
    print(json.dumps(out, indent=2))
    return 0


def _dispatch(client: httpx.Client, args: argparse.Namespace) -> Any:
    match (args.command, args.action):
        case ("channel", "create"):
            body: dict[str, Any] = {"name": args.name}
            if args.webhook_url:
                body["webhook_url"] = args.webhook_url
            return call(client, "POST", "/v1/admin/channels", json=body)
        case ("channel", "rotate-secret"):
            rotate = {} if args.overlap_s is None else {"json": {"overlap_s": args.overlap_s}}
            return call(
                client,
                "POST",
                f"/v1/admin/channels/{args.channel_id}/webhook-secret/rotate",
                **rotate,
            )
        case ("sale", "create"):
            body = {
                "sku": args.sku,
                "name": args.name,
                "starts_at": args.starts_at,
                "ends_at": args.ends_at,
            }
            for field in ("sale_id", "per_user_limit", "reservation_ttl_s", "stock_buckets"):
                if getattr(args, field) is not None:
                    body[field] = getattr(args, field)
            return call(client, "POST", "/v1/admin/sales", json=body)
        case ("sale", "show"):
            return call(client, "GET", f"/v1/admin/sales/{args.sale_id}")
        case ("keys", "import"):
            try:
                request = key_import_request(Path(args.file))
            except (OSError, ValueError) as exc:
                raise AdminError(f"{args.file}: {exc}") from exc
            params = import_params(args.normalize, args.run_async)
            out = call(
                client, "POST", f"/v1/admin/sales/{args.sale_id}/keys", params=params, **request
            )
            return out if args.no_wait else wait_for_import(client, out)
        case ("keys", "import-status"):
            return call(client, "GET", f"/v1/admin/imports/{args.import_id}")
        case ("risk", "list"):
            return call(client, "GET", f"/v1/admin/risk/lists/{args.list}/{args.kind}")
        case ("risk", "add" | "remove"):
            method = "POST" if args.action == "add" else "DELETE"
            return call(
                client,
                method,
                f"/v1/admin/risk/lists/{args.list}/{args.kind}",
                json={"entries": args.entries},
            )
        case ("risk", "config"):
            path = f"/v1/admin/sales/{args.sale_id}/risk"
            if args.set is None:
                return call(client, "GET", path)
            try:
                override = json.loads(Path(args.set).read_text())
            except (OSError, ValueError) as exc:
                raise AdminError(f"{args.set}: {exc}") from exc
            return call(client, "PUT", path, json=override)
        case ("risk", "stats"):
            return call(client, "GET", "/v1/admin/risk/stats")
    raise AdminError(f"unknown command {args.command} {args.action}")


def add_connection_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """--url and --token, on the main parser (before the subcommand) and on each admin command
    (after it, with SUPPRESS as default so that they leave a value given before untouched)."""
    parser.add_argument(
        "--url",
        default=default,
        help="the gateway (default: $FLASHGATE_URL, else the flashgate up "
        f"running from this directory (.run/flashgate.env), else "
        f"{DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=default,
        help="admin bearer token (default: $FLASHGATE_ADMIN_TOKEN, or the "
        "running flashgate up's; prefer the variable: a command line "
        "is visible to other users of the machine)",
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common, argparse.SUPPRESS)  # after the subcommand, too

    channel = sub.add_parser("channel", help="storefront channels").add_subparsers(
        dest="action", required=True
    )
    p = channel.add_parser(
        "create", parents=[common], help="create a channel (prints its API key once)"
    )
    p.add_argument("name")
    p.add_argument("--webhook-url")
    p = channel.add_parser(
        "rotate-secret",
        parents=[common],
        help="new webhook secret (printed "
        "once); the old one keeps signing for the overlap (docs/WEBHOOKS.md)",
    )
    p.add_argument("channel_id")
    p.add_argument(
        "--overlap-s",
        type=int,
        help="seconds the old secret still signs (0 = none; default: the server's "
        "FLASHGATE_WEBHOOK_SECRET_OVERLAP_S)",
    )

    sale = sub.add_parser("sale", help="flash sales").add_subparsers(dest="action", required=True)
    p = sale.add_parser("create", parents=[common], help="create a sale")
    p.add_argument("--sku", required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--starts-at",
        required=True,
        type=parse_time,
        help="RFC 3339, 'now' or relative ('+30s', '+10m')",
    )
    p.add_argument("--ends-at", required=True, type=parse_time)
    p.add_argument("--sale-id")
    p.add_argument("--per-user-limit", type=int)
    p.add_argument("--reservation-ttl-s", type=int)
    p.add_argument(
        "--stock-buckets",
        type=int,
        help="split one hot sale's stock over N Redis ledgers (1..64, default 1; "
        "docs/OPERATIONS.md, Stock buckets)",
    )
    p = sale.add_parser("show", parents=[common], help="a sale and its stock")
    p.add_argument("sale_id")

    keys = sub.add_parser("keys", help="card keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser(
        "import",
        parents=[common],
        help="import card keys from a file (.txt one per line, .csv with a 'code' column, .json)",
    )
    p.add_argument("sale_id")
    p.add_argument("file")
    p.add_argument(
        "--normalize",
        metavar="RULES",
        help="what duplicates ignore: none (default), ignore_case, "
        "ignore_separators, or both comma-separated (the key delivered is "
        "always the code as given)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--async",
        dest="run_async",
        action="store_true",
        default=None,
        help="run as a job (202) whatever the size; waits for it unless --no-wait",
    )
    mode.add_argument(
        "--sync",
        dest="run_async",
        action="store_false",
        help="answer only once done, whatever the size",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="print the job as accepted instead of polling it to the end "
        "(then: flashgate keys import-status ID)",
    )
    p = keys.add_parser("import-status", parents=[common], help="an import job's progress")
    p.add_argument("import_id", type=int)

    risk = sub.add_parser(
        "risk", help="risk engine: lists, per-sale config, counts"
    ).add_subparsers(dest="action", required=True)
    for action, text in (
        ("list", "show a list"),
        ("add", "add entries"),
        ("remove", "remove entries"),
    ):
        p = risk.add_parser(action, parents=[common], help=f"{text} (block/allow lists)")
        p.add_argument("list", choices=["allow", "block"])
        p.add_argument("kind", choices=["user", "device", "ip", "cidr"])
        if action != "list":
            p.add_argument("entries", nargs="+")
    p = risk.add_parser(
        "config",
        parents=[common],
        help="a sale's effective risk config, or "
        "set its override from a JSON file (--set override.json; {} clears)",
    )
    p.add_argument("sale_id")
    p.add_argument("--set", metavar="FILE")
    risk.add_parser("stats", parents=[common], help="decision counts of the gateway process")

    for name in ("channel", "sale", "keys", "risk"):
        sub.choices[name].set_defaults(handler=run)
