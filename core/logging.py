"""Structured logs: one JSON object per line, on the standard `logging` module.

`configure()` installs the JSON formatter on the root logger (the gateway and worker entry
points call it; FLASHGATE_LOG_FORMAT=text keeps the plain format for a terminal), and sends
uvicorn's own loggers (`uvicorn`, `uvicorn.error`, and `uvicorn.access` when the access log is
on) through it instead of the plain handlers uvicorn's default log config gives them: one
format for every line of the gateway's output; FLASHGATE_LOG_LEVEL holds for all of them.

Every line carries `ts`, `level`, `logger`, `msg`, and the `request_id` of the HTTP request
being handled: always the server's own (gateway/middleware.py generates it and returns it as
X-Request-Id). A caller's X-Request-Id is kept apart, sanitized, as `client_request_id`: a
client can correlate with it but never choose the id an audit row or a log line is filed
under. Extra fields given with `log.info(..., extra={"sale_id": ...})` are added as keys.

Secrets never reach a line: API keys (`fgk_…`), bearer tokens and `key=`/`secret=`/`token=`
pairs are masked by the formatter as a last line of defence; card keys and master keys are
never passed to a logger in the first place (they live in `Secret` or encrypted).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import secrets
import sys
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
CLIENT_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "client_request_id", default=""
)

CLIENT_REQUEST_ID_MAX = 64
_REQUEST_ID_BAD = re.compile(r"[^A-Za-z0-9._:-]")
_SECRETS = re.compile(
    r"(fgk_[A-Za-z0-9_\-]+)|(Bearer\s+\S+)|((?:api_key|master_key|secret|token|card_key)"
    r"[\"']?\s*[=:]\s*[\"']?)[^\s,\"'}]+",
    re.IGNORECASE,
)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}  # uvicorn's ANSI copy of `msg`
# uvicorn's loggers with handlers of their own in its default config (propagate=False).
_UVICORN = ("uvicorn", "uvicorn.access")


def new_request_id() -> str:
    return secrets.token_hex(8)


def client_request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-Id, sanitized: at most 64 characters of [A-Za-z0-9._:-], any
    other character replaced by '_'; "" without one. Only ever stored beside the server's id."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value[:CLIENT_REQUEST_ID_MAX].decode("latin-1")
            return _REQUEST_ID_BAD.sub("_", text)
    return ""


def redact(text: str) -> str:
    def mask(m: re.Match[str]) -> str:
        if m.group(1):
            return "fgk_*****"
        if m.group(2):
            return "Bearer *****"
        return m.group(3) + "*****"

    return _SECRETS.sub(mask, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        client_rid = CLIENT_REQUEST_ID.get()
        if client_rid:
            out["client_request_id"] = client_rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """JSON lines on stderr for the root logger (idempotent; replaces its handlers)."""
    level = level or os.environ.get("FLASHGATE_LOG_LEVEL", "INFO")
    fmt = fmt or os.environ.get("FLASHGATE_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    handler.setLevel(level.upper())  # also for uvicorn's loggers, which set their own level
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _UVICORN:
        logger = logging.getLogger(name)
        if logger.handlers:  # uvicorn's plain handler; none on uvicorn.access = access log off
            logger.handlers[:] = []
            logger.propagate = True
