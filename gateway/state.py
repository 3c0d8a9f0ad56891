"""What the routes share: the runtime's clients, channel auth and the risk engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from starlette.requests import Request

from core.errors import InvalidRequest, MalformedRequest, NotFound, UnsupportedMediaType
from core.runtime import Runtime
from gateway.auth import ChannelAuth
from gateway.duplicate_keys import refuse_duplicate_keys
from risk.engine import RiskEngine

T = TypeVar("T")


@dataclass
class GatewayState:
    runtime: Runtime
    channels: ChannelAuth
    risk: RiskEngine


def state(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gateway
    return gw


_decoders: dict[type, msgspec.json.Decoder] = {}  # type: ignore[type-arg]


def path_id(request: Request, name: str, is_valid: Callable[[str], bool], what: str) -> str:
    """A path parameter that must be a well-formed id; a malformed one is simply not found."""
    value: str = request.path_params[name]
    if not is_valid(value):
        raise NotFound(f"no such {what}")
    return value


def is_json(content_type: str | None) -> bool:
    """The media-type rule of every JSON body: no Content-Type (curl -d without -H, a bare
    client) is read as JSON; so are application/json and application/*+json, with any
    parameters (charset, ...); any other type is the caller's mistake (415)."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media in ("application/json", "") or (
        media.startswith("application/") and media.endswith("+json")
    )


async def decode(request: Request, body_type: type[T]) -> T:
    """The JSON body as `body_type`: 415 if it is sent as another media type, 400 if it isn't
    JSON, 422 with the failing path if invalid or if an object repeats a key."""
    if not is_json(request.headers.get("content-type")):
        raise UnsupportedMediaType(
            "the body must be JSON: send Content-Type: application/json, or no Content-Type"
        )
    decoder = _decoders.get(body_type)
    if decoder is None:
        decoder = _decoders[body_type] = msgspec.json.Decoder(body_type)
    raw = await request.body()
    try:
        value: T = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc)) from None
    except msgspec.DecodeError:
        raise MalformedRequest("the body is not valid JSON") from None
    except RecursionError:  # an `Any` body nested deeper than the interpreter's stack
        raise InvalidRequest("the body is nested too deeply") from None
    refuse_duplicate_keys(raw, body_type)
    return value
