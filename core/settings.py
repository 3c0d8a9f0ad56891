"""Every setting Flashgate reads, read here and nowhere else.

Environment variables only (12-factor). Each is typed and validated at start-up; a bad value
fails fast with a message that names the variable. Secrets are wrapped in `Secret` so that a
stray `repr()` in a log or a traceback prints `*****`, never the value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

N = TypeVar("N", int, float)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


class Secret:
    """A string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('*****')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit key-encryption key and its id (stored beside every wrapped data key)."""

    key_id: str
    material: bytes = field(repr=False)


def parse_master_keys(raw: str, var: str = "FLASHGATE_MASTER_KEY") -> tuple[MasterKey, ...]:
    """Parse `[id:]base64key[,[id:]base64key...]`; the first key is the active one.

    Older keys stay listed during a rotation so that data keys they wrapped can still be read.
    Without an explicit id, the id is derived from the key itself.
    """
    keys: list[MasterKey] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key_id, _, encoded = part.rpartition(":")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{var}: not valid base64") from exc
        if len(material) != 32:
            raise ConfigError(f"{var}: each key must be 32 bytes (base64 of 32 random bytes)")
        key_id = key_id or "mk-" + hashlib.sha256(material).hexdigest()[:12]
        keys.append(MasterKey(key_id, material))
    if not keys:
        raise ConfigError(f"{var} is empty")
    if len({k.key_id for k in keys}) != len(keys):
        raise ConfigError(f"{var}: duplicate key ids")
    return tuple(keys)


ADMIN_TOKEN_MIN_LENGTH = 32
ADMIN_TOKEN_MIN_BITS = 128
_GENERATE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def estimated_bits(token: str) -> float:
    """A token's entropy as its length times the Shannon entropy of its characters.

    A conservative estimate for a random token (secrets.token_urlsafe(32): ~200 bits;
    secrets.token_hex(32): ~240), and near 0 for a repeated or patterned one ('a' * 40: 0;
    'abcd' * 10: 80).
    """
    n = len(token)
    counts = [token.count(ch) for ch in set(token)]
    return sum(c * math.log2(n / c) for c in counts)


def _repetitive(token: str) -> bool:
    """A repeated pattern ('0123456789' * 4) that a per-character estimate can't see: fewer
    than 3 in 4 of its 3-character windows are distinct (a random token: ~all of them)."""
    windows = [token[i : i + 3] for i in range(len(token) - 2)]
    return len(set(windows)) < 0.75 * len(windows)


def parse_admin_tokens(raw: str, var: str = "FLASHGATE_ADMIN_TOKEN") -> tuple[Secret, ...]:
    """`token[,token...]`: every listed token is accepted (several during a rotation). Each
    must be at least 32 characters of printable ASCII and carry at least 128 estimated bits."""
    tokens = [t.strip() for t in raw.split(",") if t.strip()]
    if not tokens:
        raise ConfigError(f"{var} is required; generate one with: {_GENERATE_TOKEN}")
    for i, token in enumerate(tokens, start=1):
        which = f"{var} (token {i} of {len(tokens)})" if len(tokens) > 1 else var
        if not all("!" <= ch <= "~" for ch in token):
            raise ConfigError(
                f"{which}: printable ASCII only, no spaces; generate one with: {_GENERATE_TOKEN}"
            )
        if len(token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ConfigError(
                f"{which} is too short ({len(token)} characters, at least "
                f"{ADMIN_TOKEN_MIN_LENGTH}); generate one with: {_GENERATE_TOKEN}"
            )
        if estimated_bits(token) < ADMIN_TOKEN_MIN_BITS or _repetitive(token):
            raise ConfigError(
                f"{which} is too predictable (repeated or patterned characters: "
                f"~{estimated_bits(token):.0f} bits, at least "
                f"{ADMIN_TOKEN_MIN_BITS}); generate one with: {_GENERATE_TOKEN}"
            )
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"{var}: the same token is listed twice")
    return tuple(Secret(t) for t in tokens)


def _number(env: Mapping[str, str], name: str, default: N, lo: N, hi: N) -> N:
    """An int or float setting (typed like its default) within [lo, hi]."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    cast = type(default)
    try:
        value = cast(raw)
    except ValueError as exc:
        kind = "an integer" if cast is int else "a number"
        raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from exc
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _networks(env: Mapping[str, str], name: str) -> tuple[Network, ...]:
    """A comma-separated list of CIDRs (`10.0.0.0/8,fd00::/8`); host bits set are an error."""
    nets: list[Network] = []
    for part in (p.strip() for p in env.get(name, "").split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part))
        except ValueError as exc:
            raise ConfigError(f"{name}: {part!r} is not a network in CIDR form ({exc})") from exc
    return tuple(nets)


def _host_names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of DNS names, compared case-insensitively, without a final dot."""
    hosts: list[str] = []
    for part in (p.strip().lower().rstrip(".") for p in env.get(name, "").split(",")):
        if not part:
            continue
        labels = part.split(".")
        if len(part) > 253 or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        ):
            raise ConfigError(f"{name}: {part!r} is not a host name")
        hosts.append(part)
    return tuple(hosts)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name} is required")
    return value


@dataclass(frozen=True)
class Settings:
    redis_url: str
    database_url: Secret
    admin_tokens: tuple[Secret, ...] = field(repr=False)
    master_keys: tuple[MasterKey, ...] = field(repr=False)
    key_prefix: str = "fg"
    # HTTP limits
    max_body_bytes: int = 64 * 1024
    max_import_bytes: int = 16 * 1024 * 1024
    # A key import whose body is larger than this runs as a job: 202 and
    # GET /v1/admin/imports/{id} (core/card_keys.py); a smaller one answers when it is done.
    import_async_bytes: int = 1024 * 1024
    # Failed admin authentications per client address and window before that address gets
    # 429 for the rest of the window, even with the right token (gateway/auth.py)
    admin_auth_max_failures: int = 10
    admin_auth_window_s: int = 300
    body_timeout_s: float = 10.0  # a request's whole body must arrive within this (408)
    # Redis client
    redis_timeout_s: float = 2.0
    redis_max_connections: int = 64
    redis_min_connections: int = 16  # opened at start-up (see core.runtime.warm_up)
    # Multiplexed connections the Lua scripts share (core/autopipeline.py); 0 = redis-py's pool.
    # Single-node Redis only: on a cluster URL the scripts always go through the cluster client.
    redis_pipeline_connections: int = 2
    # Replicas that must hold a script's writes before its caller hears the result (one WAIT
    # per auto-pipelined buffer, core/autopipeline.py): None = auto (1 wherever the primary has
    # a replica connected), 0 = never. Past the timeout: 503, retry with the same key.
    redis_wait_replicas: int | None = None
    redis_wait_timeout_ms: int = 100
    # Channel cache on the hot path (an API key revoked in Redis stops working within this time)
    channel_cache_ttl_s: float = 30.0
    # Workers
    # 3 x 1000 over 2 x 500: 1.10x the orders/s in `make bench` (docs/PERFORMANCE.md); a
    # 1000-order transaction still commits in ~0.1 s, far inside the delivery SLA.
    worker_batch_size: int = 1000
    worker_consumers_per_sale: int = 3
    worker_block_ms: int = 1000
    # A busy consumer's read of less than a batch waits this long for more before its
    # transaction (workers/consumer.py): at a sale's opening the stream fills a few entries at
    # a time, and each PostgreSQL transaction has a fixed cost (~14 statements), so tiny
    # batches spent the CPU the gateway needed (docs/PERFORMANCE.md, "Load test"). An idle
    # consumer handles the first entry at once. 0 = off.
    worker_linger_ms: int = 50
    worker_claim_idle_ms: int = 30_000
    worker_max_deliveries: int = 5
    worker_metrics_port: int = 0  # Prometheus endpoint of a worker process; 0 = off
    # Liveness of a worker (GET /healthz on its metrics port): every loop of it ran an
    # iteration (or is waiting on a dependency that is down) within this many seconds.
    worker_stall_s: float = 120.0
    sweep_interval_s: float = 0.5
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 8
    # Webhooks go to public addresses only (core/egress.py, docs/WEBHOOKS.md); these let an
    # operator allow private targets: CIDRs (FLASHGATE_WEBHOOK_ALLOW_NETS, e.g. an in-cluster
    # 10.0.0.0/8) and exact host names (FLASHGATE_WEBHOOK_ALLOW_HOSTS). Cloud metadata
    # addresses stay refused whatever these say.
    webhook_allow_nets: tuple[Network, ...] = ()
    webhook_allow_hosts: tuple[str, ...] = ()
    # How long a rotated-out webhook secret still signs beside the new one
    webhook_secret_overlap_s: int = 86_400
    db_pool_max: int = 10
    # PostgreSQL: a query (or a stalled connection) past this fails instead of hanging
    db_timeout_s: float = 30.0
    # Reconciliation (core/reconcile.py): how often each worker checks the current sales
    reconcile_interval_s: float = 60.0
    # Test hook, off by default (tests/faults): "exit" makes a worker process os._exit right
    # after the PostgreSQL commit of its Nth delivering batch, before the marks and the ack.
    fault_after_commit: str = ""
    fault_after_commit_batch: int = 1
    # Risk engine (risk/, docs/RISK.md)
    risk_enabled: bool = True
    risk_config_file: str = ""  # "" = risk/rules.json shipped with the package
    risk_datacenter_file: str = ""  # "" = the small sample in risk/data
    risk_inline: bool = True  # score inside the reservation's script (one round trip)
    risk_timeout_ms: int = 50  # split mode's features call; past it on_error acts
    risk_cache_ttl_s: float = 2.0  # per-sale config and lists, cached in process
    risk_challenge_secret: Secret | None = None  # None: derived from the active master key
    # The gateway's Prometheus endpoint: a second, private port (gateway/routes/metrics.py);
    # 0 = off. The host defaults to the API's (`flashgate gateway --host`), else 127.0.0.1.
    metrics_port: int = 0
    metrics_host: str = ""
    # A scrape reads stock and streams from Redis at most once per this many seconds
    # (a scrape storm costs one Redis read per interval).
    metrics_refresh_s: float = 5.0
    # Benchmark-only routes (gateway/routes/bench.py): never on in production
    bench_endpoints: bool = False
    # A sale is low on stock under this share of its total (workers/lowstock.py; the
    # FlashgateLowStock alert in ops/prometheus/alerts.yml uses the same 0.1)
    low_stock_fraction: float = 0.1

    def __post_init__(self) -> None:
        # A blocking stream read must return before the client's socket timeout fires.
        if self.worker_block_ms >= self.redis_timeout_s * 1000:
            raise ConfigError(
                "FLASHGATE_WORKER_BLOCK_MS must be shorter than FLASHGATE_REDIS_TIMEOUT_S"
            )
        if self.fault_after_commit not in ("", "exit"):
            raise ConfigError("FLASHGATE_FAULT_AFTER_COMMIT: '' or 'exit' (a test hook)")

    @property
    def admin_token(self) -> Secret:
        """The first admin token (what a client of this process, like `flashgate up`, sends)."""
        return self.admin_tokens[0]

    @property
    def active_master_key(self) -> MasterKey:
        return self.master_keys[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        prefix = env.get("FLASHGATE_KEY_PREFIX", "fg")
        if not prefix.replace("-", "").replace("_", "").isalnum() or len(prefix) > 32:
            raise ConfigError("FLASHGATE_KEY_PREFIX: letters, digits, '-' and '_' only")
        return cls(
            redis_url=_required(env, "FLASHGATE_REDIS_URL"),
            database_url=Secret(_required(env, "FLASHGATE_DATABASE_URL")),
            admin_tokens=parse_admin_tokens(env.get("FLASHGATE_ADMIN_TOKEN", "")),
            master_keys=parse_master_keys(_required(env, "FLASHGATE_MASTER_KEY")),
            key_prefix=prefix,
            max_body_bytes=_number(env, "FLASHGATE_MAX_BODY_BYTES", 64 * 1024, 1024, 1 << 24),
            max_import_bytes=_number(env, "FLASHGATE_MAX_IMPORT_BYTES", 16 << 20, 1024, 1 << 30),
            import_async_bytes=_number(env, "FLASHGATE_IMPORT_ASYNC_BYTES", 1 << 20, 0, 1 << 30),
            admin_auth_max_failures=_number(
                env, "FLASHGATE_ADMIN_AUTH_MAX_FAILURES", 10, 1, 1_000_000
            ),
            admin_auth_window_s=_number(env, "FLASHGATE_ADMIN_AUTH_WINDOW_S", 300, 1, 86_400),
            body_timeout_s=_number(env, "FLASHGATE_BODY_TIMEOUT_S", 10.0, 0.1, 600.0),
            redis_timeout_s=_number(env, "FLASHGATE_REDIS_TIMEOUT_S", 2.0, 0.05, 60.0),
            redis_max_connections=_number(env, "FLASHGATE_REDIS_MAX_CONNECTIONS", 64, 4, 10_000),
            redis_min_connections=_number(env, "FLASHGATE_REDIS_MIN_CONNECTIONS", 16, 0, 10_000),
            redis_pipeline_connections=_number(
                env, "FLASHGATE_REDIS_PIPELINE_CONNECTIONS", 2, 0, 64
            ),
            redis_wait_replicas=(
                None
                if env.get("FLASHGATE_REDIS_WAIT_REPLICAS", "auto").strip() in ("auto", "")
                else _number(env, "FLASHGATE_REDIS_WAIT_REPLICAS", 0, 0, 16)
            ),
            redis_wait_timeout_ms=_number(env, "FLASHGATE_REDIS_WAIT_TIMEOUT_MS", 100, 1, 1000),
            channel_cache_ttl_s=_number(env, "FLASHGATE_CHANNEL_CACHE_TTL_S", 30.0, 0.0, 3600.0),
            worker_batch_size=_number(env, "FLASHGATE_WORKER_BATCH_SIZE", 1000, 1, 10_000),
            worker_consumers_per_sale=_number(env, "FLASHGATE_WORKER_CONSUMERS_PER_SALE", 3, 1, 64),
            worker_block_ms=_number(env, "FLASHGATE_WORKER_BLOCK_MS", 1000, 1, 60_000),
            worker_linger_ms=_number(env, "FLASHGATE_WORKER_LINGER_MS", 50, 0, 1000),
            worker_claim_idle_ms=_number(
                env, "FLASHGATE_WORKER_CLAIM_IDLE_MS", 30_000, 100, 3_600_000
            ),
            worker_max_deliveries=_number(env, "FLASHGATE_WORKER_MAX_DELIVERIES", 5, 1, 1000),
            worker_metrics_port=_number(env, "FLASHGATE_WORKER_METRICS_PORT", 0, 0, 65535),
            worker_stall_s=_number(env, "FLASHGATE_WORKER_STALL_S", 120.0, 1.0, 86_400.0),
            sweep_interval_s=_number(env, "FLASHGATE_SWEEP_INTERVAL_S", 0.5, 0.01, 60.0),
            webhook_timeout_s=_number(env, "FLASHGATE_WEBHOOK_TIMEOUT_S", 5.0, 0.1, 60.0),
            webhook_max_attempts=_number(env, "FLASHGATE_WEBHOOK_MAX_ATTEMPTS", 8, 1, 50),
            webhook_allow_nets=_networks(env, "FLASHGATE_WEBHOOK_ALLOW_NETS"),
            webhook_allow_hosts=_host_names(env, "FLASHGATE_WEBHOOK_ALLOW_HOSTS"),
            webhook_secret_overlap_s=_number(
                env, "FLASHGATE_WEBHOOK_SECRET_OVERLAP_S", 86_400, 0, 30 * 86_400
            ),
            db_pool_max=_number(env, "FLASHGATE_DB_POOL_MAX", 10, 1, 200),
            db_timeout_s=_number(env, "FLASHGATE_DB_TIMEOUT_S", 30.0, 0.1, 600.0),
            reconcile_interval_s=_number(
                env, "FLASHGATE_RECONCILE_INTERVAL_S", 60.0, 0.1, 86_400.0
            ),
            fault_after_commit=env.get("FLASHGATE_FAULT_AFTER_COMMIT", "").strip().lower(),
            fault_after_commit_batch=_number(
                env, "FLASHGATE_FAULT_AFTER_COMMIT_BATCH", 1, 1, 1_000_000
            ),
            risk_enabled=_flag(env, "FLASHGATE_RISK_ENABLED", True),
            risk_inline=_flag(env, "FLASHGATE_RISK_INLINE", True),
            risk_config_file=env.get("FLASHGATE_RISK_CONFIG_FILE", ""),
            risk_datacenter_file=env.get("FLASHGATE_RISK_DATACENTER_FILE", ""),
            risk_timeout_ms=_number(env, "FLASHGATE_RISK_TIMEOUT_MS", 50, 1, 10_000),
            risk_cache_ttl_s=_number(env, "FLASHGATE_RISK_CACHE_TTL_S", 2.0, 0.0, 300.0),
            risk_challenge_secret=Secret(env["FLASHGATE_RISK_CHALLENGE_SECRET"])
            if env.get("FLASHGATE_RISK_CHALLENGE_SECRET")
            else None,
            metrics_port=_number(env, "FLASHGATE_METRICS_PORT", 0, 0, 65535),
            metrics_host=env.get("FLASHGATE_METRICS_HOST", "").strip(),
            metrics_refresh_s=_number(env, "FLASHGATE_METRICS_REFRESH_S", 5.0, 0.0, 300.0),
            bench_endpoints=_flag(env, "FLASHGATE_BENCH_ENDPOINTS", False),
            low_stock_fraction=_number(env, "FLASHGATE_LOW_STOCK_FRACTION", 0.1, 0.0, 1.0),
        )


@dataclass(frozen=True)
class RotationSettings:
    """What `flashgate rotate-master-key` needs: PostgreSQL and the keyring, nothing else."""

    database_url: Secret
    master_keys: tuple[MasterKey, ...] = field(repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RotationSettings:
        env = os.environ if env is None else env
        return cls(
            database_url=Secret(_required(env, "FLASHGATE_DATABASE_URL")),
            master_keys=parse_master_keys(_required(env, "FLASHGATE_MASTER_KEY")),
        )
