"""Responses encoded with msgspec (one encoder, reused)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encoder = msgspec.json.Encoder()


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class ProblemResponse(JSONResponse):
    media_type = "application/problem+json"
