"""Every Redis key Flashgate uses, built here and nowhere else.

All keys of one sale carry the hash tag `{s:<sale_id>}`, so every script's KEYS share one slot
and the scripts run unchanged on Redis Cluster. Scripts never build key names themselves.

Order ids embed their sale id (`<sale_id>.<ulid>`) so that an order can be routed to its sale's
slot without a lookup.

Stock buckets (core/ids.py): a sale of N > 1 buckets has N ledgers, one per *shard*: the sale
id itself for bucket 0 and `<sale>:b<b>` for bucket b, so that bucket b's keys carry the tag
`{s:<sale>:b<b>}` and land on a slot (and usually a node) of their own. Every per-sale method
below takes a shard; passing a plain sale id means bucket 0, i.e. the one-bucket layout.
Order ids of bucket b > 0 (`<sale>.b<b>.<ulid>`) route to their shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.ids import shard_of_order


@dataclass(frozen=True)
class Keys:
    prefix: str = "fg"

    # -- global (not part of any script) -------------------------------------------------
    def active_sales(self) -> str:
        """SET of sale ids whose streams workers consume and whose reservations they sweep."""
        return f"{self.prefix}:sales:active"

    def channels(self) -> str:
        """HASH api-key hash (hex) -> channel id, the hot path's view of channel credentials."""
        return f"{self.prefix}:channels"

    def worker_heartbeat(self, worker: str = "*") -> str:
        """STRING with a TTL, refreshed by a live worker (`*`: the pattern of all of them)."""
        return f"{self.prefix}:workers:hb:{worker}"

    def risk_list(self, action: str, kind: str) -> str:
        """SET of entries of one risk list (`action` allow|block, `kind` user|device|ip|cidr)."""
        return f"{self.prefix}:{{risk}}:{action}:{kind}"

    def risk_lists_version(self) -> str:
        """STRING counter bumped on every list change; gateways reload their copy when it moves."""
        return f"{self.prefix}:{{risk}}:lists:v"

    def admin_auth_failures(self, client: str) -> str:
        """STRING counter with a TTL: failed admin authentications of one client address in the
        current window (gateway/auth.py). `client` is an IP address (bounded, no braces)."""
        return f"{self.prefix}:{{admin}}:authfail:{client}"

    # -- per sale --------------------------------------------------------------------------
    def _tag(self, sale_id: str) -> str:
        return f"{self.prefix}:{{s:{sale_id}}}"

    def sale_pattern(self, shard: str) -> str:
        """SCAN MATCH pattern of every key of one sale's ledger shard (bench clean-up only)."""
        return f"{self._tag(shard)}:*"

    def sale(self, sale_id: str) -> str:
        """HASH: window, limits and the stock ledger (total/available/reserved/confirmed/...)."""
        return f"{self._tag(sale_id)}:sale"

    def buyers(self, sale_id: str) -> str:
        """HASH user id -> units held (reserved + confirmed + delivered)."""
        return f"{self._tag(sale_id)}:buyers"

    def idempotency(self, sale_id: str) -> str:
        """HASH `<channel>:<Idempotency-Key>` -> the original answer of that purchase."""
        return f"{self._tag(sale_id)}:idem"

    def deadlines(self, sale_id: str) -> str:
        """ZSET order id -> reservation deadline (ms); the expiry sweeper's work list."""
        return f"{self._tag(sale_id)}:deadlines"

    def events(self, sale_id: str) -> str:
        """STREAM of order events (reserved, confirmed, cancelled, expired) for the workers."""
        return f"{self._tag(sale_id)}:events"

    def dead_letters(self, sale_id: str) -> str:
        """STREAM of events that kept failing; kept for operators, never dropped."""
        return f"{self._tag(sale_id)}:dead"

    def low_stock(self, sale_id: str) -> str:
        """HASH sale total -> when (ms) the sale went low on stock at that total: HSETNX makes
        each low-stock event happen once, however many workers see it (a restock, a new total,
        arms it again)."""
        return f"{self._tag(sale_id)}:lowstock"

    def imports(self, sale_id: str) -> str:
        """SET of key-import ids already added to the stock (makes add_stock idempotent)."""
        return f"{self._tag(sale_id)}:imports"

    # -- per shard, transfers between stock buckets (lua/withdraw.lua, deposit.lua, settle.lua)
    def transfers(self, shard: str) -> str:
        """HASH transfer id -> "<recipient bucket>|<units>|<at ms>": units withdrawn from this
        bucket and not yet settled (the recovery pass's work list)."""
        return f"{self._tag(shard)}:xfer:out"

    def transfer_ids(self, shard: str) -> str:
        """SET of transfer ids ever withdrawn from this bucket: an id never withdraws twice."""
        return f"{self._tag(shard)}:xfer:ids"

    def deposits(self, shard: str) -> str:
        """SET of transfer ids deposited into this bucket (makes a deposit idempotent)."""
        return f"{self._tag(shard)}:xfer:in"

    # -- per sale, risk (lua/risk_features.lua) --------------------------------------------
    def risk_config(self, sale_id: str) -> str:
        """STRING: the sale's risk-config override (JSON), set through the admin API."""
        return f"{self._tag(sale_id)}:risk:cfg"

    def risk_admission(self, sale_id: str, channel_id: str = "") -> str:
        """STRING: GCRA theoretical arrival time (us) of the sale, or of one channel in it."""
        return f"{self._tag(sale_id)}:risk:adm:{channel_id or '*'}"

    def risk_counter(self, sale_id: str, kind: str, value: str) -> str:
        """STRING of sliding-window request counters (1 s, 60 s) of one user/device/ip/subnet."""
        return f"{self._tag(sale_id)}:risk:c:{kind}:{value}"

    def risk_distinct_users(self, sale_id: str, kind: str, value: str) -> str:
        """HyperLogLog of the user ids seen from one device or ip during the sale."""
        return f"{self._tag(sale_id)}:risk:hu:{kind}:{value}"

    def risk_memo(self, sale_id: str) -> str:
        """HASH `<channel>:<Idempotency-Key>` -> the features risk recorded on the key's first
        sight, so that every repeat of a key is scored the same."""
        return f"{self._tag(sale_id)}:risk:memo"

    def risk_verdicts(self, sale_id: str) -> str:
        """HASH `<channel>:<Idempotency-Key>` -> the refusal purchase.lua gave that key (so a
        repeat of the key gets the same verdict)."""
        return f"{self._tag(sale_id)}:risk:verdicts"

    def risk_solution(self, sale_id: str, challenge_id: str) -> str:
        """STRING set once (NX) when a challenge's solution is used: solutions are single-use."""
        return f"{self._tag(sale_id)}:risk:pow:{challenge_id}"

    def order(self, order_id: str) -> str:
        """HASH of one order's live state."""
        return f"{self._tag(shard_of_order(order_id))}:o:{order_id}"


WORKER_GROUP = "flashgate-workers"
