"""A flash sale as Locust users: honest buyers, bots, and buyers who solve challenges.

Run by `loadtest/run.py` (which creates the sale and audits the outcome), or by hand:

    FG_SALE_ID=launch FG_API_KEY=fgk_... FG_OPENS_AT=<unix s> FG_SHAPE=spike \
        locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000

Environment: FG_SALE_ID, FG_API_KEY (a channel key), FG_OPENS_AT (unix seconds; users wait for
it), FG_SHAPE (`none`: use -u/-r/-t; `spike` or `steady`: loadtest/profiles.py with FG_USERS and
FG_DURATION_S), FG_BOTS / FG_SOLVERS (fixed counts), FG_BOT_RATE (purchases/s per bot, 0 =
unpaced), FG_RECORDS (JSON-lines file: every order
seen, written when Locust quits, for the audit), FG_RUN (prefix of user ids), FG_PROGRESS
(JSON-lines file: a snapshot of users, requests, req/s, p99 so far and failures every
FG_PROGRESS_S seconds, which `loadtest/run.py` prints while the run goes on).

Every answer is checked for its business content, not only its status: a 409 sold_out is a
correct answer; a 201 without an order id of this sale, or a 409 with an unexpected code, is a
failure. Failures are 5xx answers, connection errors and timeouts (after retries with the same
Idempotency-Key), and wrong content.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from typing import Any

import msgspec
from locust import (
    FastHttpUser,
    LoadTestShape,
    between,
    constant,
    constant_throughput,
    events,
    task,
)

from loadtest.profiles import schedule
from loadtest.target import require_loopback
from risk.solver import SOLUTION_HEADER, Unsolvable, solve

SALE_ID = os.environ.get("FG_SALE_ID", "")
API_KEY = os.environ.get("FG_API_KEY", "")
OPENS_AT = float(os.environ.get("FG_OPENS_AT", "0"))
RUN = os.environ.get("FG_RUN", uuid.uuid4().hex[:6])
SHAPE = os.environ.get("FG_SHAPE", "none")
RECORDS_FILE = os.environ.get("FG_RECORDS", "")
PROGRESS_FILE = os.environ.get("FG_PROGRESS", "")
PROGRESS_S = float(os.environ.get("FG_PROGRESS_S", "3"))
DELIVERY_WAIT_S = float(os.environ.get("FG_DELIVERY_WAIT_S", "10"))
POLL_S = 0.2
MAX_TRIES = 3  # a timeout, connection error or 5xx is retried with the same Idempotency-Key

PURCHASE_PATH = f"/v1/sales/{SALE_ID}/purchase"
REFUSALS = {"sold_out", "insufficient_stock", "purchase_limit_exceeded"}
RISK_REFUSALS = {"risk_denied", "challenge_required", "rate_limited"}

RECORDS: list[dict[str, Any]] = []  # one per order seen (or per refused buyer), updated in place
_ids = itertools.count()


@events.init.add_listener
def _loopback_only(environment: Any, **_kwargs: Any) -> None:
    """Load only ever goes to this machine's loopback (loadtest/target.py)."""
    if environment.host:
        try:
            require_loopback(environment.host, "--host")
        except ValueError as exc:
            raise SystemExit(f"loadtest: {exc}") from None


@events.test_start.add_listener
def _report_progress(environment: Any, **_kwargs: Any) -> None:
    """Every PROGRESS_S, one JSON line: the run as far as it went (cumulative p99)."""
    if not PROGRESS_FILE:
        return
    import gevent

    started = time.monotonic()

    def loop() -> None:
        with open(PROGRESS_FILE, "a", buffering=1) as out:
            while True:
                gevent.sleep(PROGRESS_S)
                runner, total = environment.runner, environment.stats.total
                purchases = [
                    e
                    for (name, _), e in environment.stats.entries.items()
                    if name.startswith("purchase")
                ]
                out.write(
                    json.dumps(
                        {
                            "t_s": round(time.monotonic() - started, 1),
                            "users": runner.user_count if runner else 0,
                            "requests": total.num_requests,
                            "failures": total.num_failures,
                            "rps": round(total.current_rps, 1),
                            "purchases": sum(e.num_requests for e in purchases),
                            "purchase_p99_ms": max(
                                (e.get_response_time_percentile(0.99) or 0 for e in purchases),
                                default=0,
                            ),
                        }
                    )
                    + "\n"
                )

    gevent.spawn(loop)


@events.quitting.add_listener
def _write_records(**_kwargs: Any) -> None:
    if RECORDS_FILE:
        with open(RECORDS_FILE, "w") as out:
            for rec in RECORDS:
                out.write(json.dumps(rec) + "\n")


def _wait_for_opening() -> None:
    """Real buyers sit on the page and press at the opening second (within 200 ms)."""
    delay = OPENS_AT - time.time()
    if delay > 0:
        time.sleep(delay + random.random() * 0.2)


def _doc(resp: Any) -> dict[str, Any]:
    """The JSON body, decoded from its bytes: JSON is UTF-8 (RFC 8259), and Locust's
    `resp.json()` goes through `resp.text`, which runs charset detection on every answer
    without a charset parameter (~6% of Locust's CPU in a py-spy profile)."""
    try:
        doc = msgspec.json.decode(resp.content or b"")
    except (msgspec.DecodeError, TypeError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Shopper(FastHttpUser):
    """What every storefront user shares: purchase with retries, confirm, cancel, poll."""

    abstract = True
    network_timeout = 2.0
    connection_timeout = 2.0

    def on_start(self) -> None:
        # The storefront's backend holds warm keep-alive connections to the gateway; open
        # this user's before the opening instead of 1,000 TCP handshakes in its first second.
        self.client.get("/healthz", name="warm-up")
        _wait_for_opening()

    def headers(self, key: str | None = None, **extra: str) -> dict[str, str]:
        h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **extra}
        if key is not None:
            h["Idempotency-Key"] = key
        return h

    def purchase(
        self,
        body: dict[str, Any],
        key: str,
        rec: dict[str, Any],
        *,
        name: str = "purchase",
        expect_risk: bool = False,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """POST a purchase; retry timeouts, connection errors and 5xx with the same key.
        Returns (status, body) of the last answer; status 0 = no answer at all."""
        payload = json.dumps(body)
        status, doc = 0, {}
        for _ in range(MAX_TRIES):
            with self.client.post(
                PURCHASE_PATH,
                data=payload,
                name=name,
                catch_response=True,
                headers=self.headers(key, **(extra or {})),
            ) as resp:
                status, doc = resp.status_code or 0, _doc(resp)
                if status == 0 or status >= 500:
                    resp.failure(f"{status}: {resp.error or doc.get('code', '')}")
                    rec["retries"] = rec.get("retries", 0) + 1
                    continue
                problem = self.check_purchase(status, doc, expect_risk)
                if problem:
                    resp.failure(problem)
                else:
                    resp.success()
                return status, doc
        return status, doc

    @staticmethod
    def check_purchase(status: int, doc: dict[str, Any], expect_risk: bool) -> str:
        if status == 201:
            if not str(doc.get("order_id", "")).startswith(SALE_ID + ".") or doc.get(
                "status"
            ) not in ("reserved", "confirmed"):
                return f"201 without a reservation of this sale: {doc}"
            return ""
        code = doc.get("code", "")
        if status == 409 and code in REFUSALS:
            return ""
        if status in (403, 428, 429) and code in RISK_REFUSALS:
            if status == 428 and not doc.get("challenge"):
                return "428 without a challenge"
            return "" if expect_risk or code == "rate_limited" else f"honest buyer got {code}"
        return f"unexpected {status} {code}"

    def confirm(self, order_id: str, rec: dict[str, Any]) -> bool:
        rec["confirm_sent_at"] = time.time()
        body = json.dumps({"payment_ref": "pay-" + order_id[-12:]})
        for _ in range(MAX_TRIES):
            with self.client.post(
                f"/v1/orders/{order_id}/confirm",
                data=body,
                name="confirm",
                headers=self.headers(),
                catch_response=True,
            ) as resp:
                status, doc = resp.status_code or 0, _doc(resp)
                if status == 0 or status >= 500:
                    resp.failure(f"{status}: {resp.error or doc.get('code', '')}")
                    continue
                if status == 202 and doc.get("status") == "confirmed":
                    rec["confirmed_at"] = time.time()
                    rec["outcome"] = "confirmed"
                    resp.success()
                    return True
                if status == 409 and doc.get("code") == "reservation_expired":
                    rec["outcome"] = "expired"  # a slow payment: a correct answer
                    resp.success()
                    return False
                resp.failure(f"confirm: unexpected {status} {doc.get('code', '')}")
                return False
        return False

    def cancel(self, order_id: str, rec: dict[str, Any]) -> None:
        with self.client.post(
            f"/v1/orders/{order_id}/cancel",
            name="cancel",
            headers=self.headers(),
            catch_response=True,
        ) as resp:
            doc = _doc(resp)
            if resp.status_code == 200 and doc.get("status") == "cancelled":
                rec["outcome"] = "cancelled"
                resp.success()
            elif resp.status_code == 409 and doc.get("code") == "reservation_expired":
                rec["outcome"] = "expired"
                resp.success()
            else:
                resp.failure(f"cancel: unexpected {resp.status_code} {doc.get('code', '')}")

    def await_delivery(self, order_id: str, rec: dict[str, Any]) -> None:
        """Poll the order as its buyer would until its key is there."""
        deadline = time.monotonic() + DELIVERY_WAIT_S
        while time.monotonic() < deadline:
            with self.client.get(
                f"/v1/orders/{order_id}",
                name="order [poll]",
                headers=self.headers(),
                catch_response=True,
            ) as resp:
                doc = _doc(resp)
                if resp.status_code == 200 and doc.get("status") == "delivered":
                    keys = doc.get("card_keys") or []
                    if len(keys) != int(doc.get("quantity", 1)):
                        resp.failure(f"delivered with {len(keys)} keys")
                    rec["keys"] = keys
                    rec["delivered_seen_at"] = time.time()
                    return
                if resp.status_code != 200 or doc.get("status") not in ("confirmed", "delivered"):
                    resp.failure(f"poll: {resp.status_code} {doc.get('status', '')}")
                    return
            time.sleep(POLL_S)

    def new_record(self, kind: str, user: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": kind, "user": user}
        RECORDS.append(rec)
        return rec


class Buyer(Shopper):
    """An honest buyer (a new one each iteration): own device, own /24 (CGNAT space)."""

    weight = 10
    wait_time = between(0.5, 2.0)

    @task
    def buy(self) -> None:
        n = next(_ids)
        user = f"{RUN}-b{n}"
        body = {
            "user_id": user,
            "device_id": f"{RUN}-dev-{n}",
            "user_agent": "loadtest/1",
            # 100.64.0.0-100.126.255.255: 100.127.255.0/24 is the bots' (buyer 16,383 once
            # landed in it and was rightly denied).
            "client_ip": f"100.{64 + (n >> 8) % 63}.{n & 255}.{1 + n % 254}",
        }
        rec = self.new_record("buyer", user)
        key = f"{user}-k1"
        status, doc = self.purchase(body, key, rec)
        rec["status"], rec["code"] = status, doc.get("code", "")
        if status != 201:
            return
        order_id = rec["order_id"] = doc["order_id"]
        roll = random.random()
        if roll < 0.05:
            rec["outcome"] = "abandoned"  # lets the reservation expire
            return
        if roll < 0.12:
            self.cancel(order_id, rec)
            return
        if not self.confirm(order_id, rec):
            return
        if random.random() < 0.1:  # a second try with a new key: the per-user limit says no
            second: dict[str, Any] = {}
            status, doc = self.purchase(body, f"{user}-k2", second, name="purchase [second]")
            rec["second"] = doc.get("code", "") or str(status)
        self.await_delivery(order_id, rec)


BOT_RATE = float(os.environ.get("FG_BOT_RATE", "200"))


class Bot(Shopper):
    """A bot farm: a few shared devices on one /24, a new user id per request, no think time.
    The risk engine should refuse most of it (403, 428 it never solves, 429).

    Each bot is paced at FG_BOT_RATE purchases/s so that the load is a stated one: unpaced
    (0), a closed-loop bot sends as fast as the load generator's own CPU allows, so the
    faster the gateway answers, the more CPU of the shared machine the bots and Locust take."""

    fixed_count = int(os.environ.get("FG_BOTS", "3"))
    wait_time = constant_throughput(BOT_RATE) if BOT_RATE > 0 else constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.summary = self.new_record("bot", f"{RUN}-bots-{id(self)}")
        self.summary["answers"] = {}

    @task
    def hammer(self) -> None:
        n = next(_ids)
        user = f"{RUN}-bot{n}"
        body = {
            "user_id": user,
            "device_id": f"{RUN}-botdev-{n % 2}",
            "client_ip": f"100.127.255.{1 + n % 250}",
            "user_agent": "loadtest-bot/1",
        }
        status, doc = self.purchase(body, f"{user}-k", {}, name="purchase [bot]", expect_risk=True)
        answers = self.summary["answers"]
        label = doc.get("code", "") or str(status)
        answers[label] = answers.get(label, 0) + 1
        if status == 201:  # got through before the counters tripped; never pays
            self.new_record("bot", user).update(
                order_id=doc["order_id"], status=201, outcome="abandoned"
            )


class Solver(Shopper):
    """A buyer from a datacenter range: challenged (428), solves the proof of work, retries
    with the same Idempotency-Key and the solution header, then pays like anyone else."""

    fixed_count = int(os.environ.get("FG_SOLVERS", "2"))
    wait_time = between(1.0, 3.0)

    @task
    def buy(self) -> None:
        n = next(_ids)
        user = f"{RUN}-s{n}"
        body = {
            "user_id": user,
            "device_id": f"{RUN}-sdev-{n}",
            "user_agent": "loadtest/1",
            "client_ip": f"198.51.100.{1 + n % 250}",
        }  # datacenter_sample.txt
        rec = self.new_record("solver", user)
        key = f"{user}-k1"
        status, doc = self.purchase(body, key, rec, name="purchase [challenged]", expect_risk=True)
        if status == 428 and doc.get("code") == "challenge_required":
            try:
                solution = solve(doc["challenge"], timeout_s=10)
            except Unsolvable:
                rec["status"], rec["code"] = 428, "unsolved"
                return
            rec["solved"] = True
            status, doc = self.purchase(
                body, key, rec, name="purchase [solved]", extra={SOLUTION_HEADER: solution}
            )
        rec["status"], rec["code"] = status, doc.get("code", "")
        if status != 201:
            return
        order_id = rec["order_id"] = doc["order_id"]
        if self.confirm(order_id, rec):
            self.await_delivery(order_id, rec)


if SHAPE != "none":
    _schedule = schedule(
        SHAPE,
        users=int(os.environ.get("FG_USERS", "2000")),
        opens_at_s=max(0.0, OPENS_AT - time.time()),
        duration_s=float(os.environ.get("FG_DURATION_S", "30")),
    )

    class SaleShape(LoadTestShape):
        """FG_SHAPE's schedule (loadtest/profiles.py)."""

        def tick(self) -> tuple[int, float] | None:
            return _schedule.tick(self.get_run_time())
