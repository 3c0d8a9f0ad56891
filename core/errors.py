"""Domain errors with stable, machine-readable codes.

Each class carries its HTTP status and `code`; the gateway turns any `FlashgateError` into one
application/problem+json response (gateway/problems.py). Codes are an API: never rename one.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FlashgateError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra
        self.headers: dict[str, str] = {}


# -- 4xx: the client's mistake or the sale's state ----------------------------------------
class MalformedRequest(FlashgateError):
    status, code, title = 400, "malformed_request", "The body is not valid JSON"


class InvalidRequest(FlashgateError):
    status, code, title = 422, "invalid_request", "The request is not valid"


class Unauthorized(FlashgateError):
    status, code, title = 401, "unauthorized", "Missing or wrong credentials"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers = {"WWW-Authenticate": "Bearer"}


class NotFound(FlashgateError):
    status, code, title = 404, "not_found", "No such resource"


class MethodNotAllowed(FlashgateError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class PayloadTooLarge(FlashgateError):
    status, code, title = 413, "payload_too_large", "The body is too large"


class UnsupportedMediaType(FlashgateError):
    status, code, title = 415, "unsupported_media_type", "Unsupported content type"


class HeadersTooLarge(FlashgateError):
    """Answered by the HTTP protocol itself (gateway/server.py), before any route."""

    status, code, title = 431, "headers_too_large", "The request line and headers are too large"


class RequestTimeout(FlashgateError):
    status, code, title = 408, "request_timeout", "The body did not arrive in time"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers = {"Connection": "close"}  # the rest of the body is never read


class IdempotencyMismatch(FlashgateError):
    status, code = 422, "idempotency_mismatch"
    title = "This Idempotency-Key was already used with a different request"


class Conflict(FlashgateError):
    status, code, title = 409, "conflict", "Conflict with the current state"


class SoldOut(Conflict):
    code, title = "sold_out", "The sale is sold out"


class InsufficientStock(Conflict):
    code, title = "insufficient_stock", "Fewer units are left than requested"


class PurchaseLimitExceeded(Conflict):
    code, title = "purchase_limit_exceeded", "This buyer has reached the sale's per-user limit"


class SaleNotActive(Conflict):
    code, title = "sale_not_active", "The sale is not open now"


class SaleExists(Conflict):
    code, title = "sale_exists", "A different sale with this id already exists"


class ReservationExpired(Conflict):
    code, title = "reservation_expired", "The reservation expired before it was confirmed"


class OrderCancelled(Conflict):
    code, title = "order_cancelled", "The order was cancelled"


class OrderNotCancellable(Conflict):
    code, title = "order_not_cancellable", "A confirmed order can't be cancelled"


class OrderNotRefundable(Conflict):
    code, title = "order_not_refundable", "A cancelled or expired order can't be refunded"


class OrderRefunded(Conflict):
    code, title = "order_refunded", "The order was refunded"


class RateLimited(FlashgateError):
    """An admission limit refused the request. `limit` names the one that answered, as
    risk/config.py's Admission calls it ("sale_rate" or "channel_rate"; the scripts return
    it), and goes out in the problem's `limit` field."""

    status, code, title = 429, "rate_limited", "Too many requests; retry later"

    def __init__(
        self,
        retry_after_s: int,
        detail: str | None = None,
        *,
        limit: str | bytes | None = None,
        **extra: Any,
    ) -> None:
        name = limit.decode() if isinstance(limit, bytes) else limit
        if name in ADMISSION_LIMITS:
            extra["limit"] = name
            detail = detail or ADMISSION_LIMITS[name]
        super().__init__(detail, **extra)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}


ADMISSION_LIMITS = {
    "sale_rate": "The sale's admission limit (admission.sale_rate) answered: retry after "
    "Retry-After",
    "channel_rate": "This channel's admission limit in the sale (admission.channel_rate) "
    "answered: retry after Retry-After",
}


# -- 5xx: ours --------------------------------------------------------------------------
class ServiceUnavailable(FlashgateError):
    status, code, title = 503, "service_unavailable", "A backing service is unavailable"


class SaleNotReady(ServiceUnavailable):
    """PostgreSQL knows the sale but Redis has no ledger for it (Redis lost its data): the sale
    is paused until `flashgate reconcile SALE` rebuilds the ledger from PostgreSQL."""

    code, title = "sale_not_ready", "The sale is paused until its ledger is reconciled"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers = {"Retry-After": "5"}


class RiskDenied(FlashgateError):
    status, code, title = 403, "risk_denied", "The purchase was refused by risk checks"


class ChallengeRequired(FlashgateError):
    status, code, title = 428, "challenge_required", "Solve the challenge and retry"
