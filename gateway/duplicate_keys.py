"""Refuse JSON bodies whose objects repeat a key (`{"user_id":"a","user_id":"b"}`).

msgspec, like most parsers, keeps the last value of a repeated key and has no option to refuse
it; a body that two parsers read differently (a proxy or a log reader keeps the first) is
refused with 422 `invalid_request` naming the key.

A pre-check keeps the usual body off the slow path: a repeat is only possible when a field's
quoted name occurs twice in the raw bytes, or when the body has a backslash (a key can be
spelled `"user\\u005fid"`). Only then is the body parsed a second time, with the standard
library's `json` and an `object_pairs_hook` that sees every key of every object. Measured by
bench/edge.py on a purchase body: the pre-check costs about what msgspec's decode of it does
(~1 us, ~1% of a purchase's gateway CPU), the slow path ~4x that. Bodies that hold objects
with keys of any name (a `dict`, `Any`, nested Structs) are always parsed twice: admin bodies.
"""

from __future__ import annotations

import json
from typing import Any

from msgspec import inspect as mi

from core.errors import InvalidRequest

# The types whose JSON is an object with keys we can't list in advance.
_OBJECTS = (
    mi.AnyType,
    mi.DictType,
    mi.StructType,
    mi.TypedDictType,
    mi.DataclassType,
    mi.CustomType,
)
_tokens: dict[Any, tuple[bytes, ...] | None] = {}
_UNSEEN: Any = object()


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def refuse_duplicate_keys(raw: bytes, body_type: Any) -> None:
    """Raise InvalidRequest if an object in `raw` (already decoded as `body_type`) repeats a
    key."""
    tokens = _tokens.get(body_type, _UNSEEN)
    if tokens is _UNSEEN:
        tokens = _tokens[body_type] = field_tokens(body_type)
    if tokens is not None and b"\\" not in raw and not _repeats_a_token(raw, tokens):
        return
    key = repeated_key(raw)
    if key is not None:
        raise InvalidRequest(f"duplicate key {json.dumps(key)[:80]}: each key may appear once")


def _repeats_a_token(raw: bytes, tokens: tuple[bytes, ...]) -> bool:
    # A plain loop: any() over a generator cost ~1.7x, one regex of all names ~1.2x (measured).
    for token in tokens:  # noqa: SIM110
        if raw.count(token) > 1:
            return True
    return False


def field_tokens(body_type: Any) -> tuple[bytes, ...] | None:
    """The quoted JSON names of a flat Struct's fields (b'"user_id"', ...), or None if the body
    may hold other objects (then every body is checked in full)."""
    info = mi.type_info(body_type)
    if not isinstance(info, mi.StructType):
        return None
    if any(_may_hold_object(f.type) for f in info.fields):
        return None
    return tuple(b'"%s"' % f.encode_name.encode() for f in info.fields)


def _may_hold_object(t: mi.Type) -> bool:
    if isinstance(t, _OBJECTS):
        return True
    inner: list[mi.Type] = []
    for attr in ("type", "item_type", "key_type", "value_type"):
        value = getattr(t, attr, None)
        if isinstance(value, mi.Type):
            inner.append(value)
    for attr in ("types", "item_types"):
        inner.extend(getattr(t, attr, ()))
    return any(_may_hold_object(i) for i in inner)


def repeated_key(raw: bytes) -> str | None:
    """The first key repeated within one object of `raw` (valid JSON), or None."""
    try:
        json.loads(raw, object_pairs_hook=_no_repeats)
    except _Repeated as exc:
        return exc.key
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValueError:  # msgspec accepted it; the standard library is not stricter
        return None
    return None


def _no_repeats(pairs: list[tuple[str, Any]]) -> None:
    if len(pairs) > 1:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
