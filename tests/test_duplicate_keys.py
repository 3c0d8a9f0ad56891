"""gateway/duplicate_keys.py and the media-type rule, unit by unit (the live replays are in
tests/test_edge.py)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from core.errors import InvalidRequest
from gateway.duplicate_keys import field_tokens, refuse_duplicate_keys, repeated_key
from gateway.models import KeysBody, PurchaseBody
from gateway.state import is_json


class Nested(msgspec.Struct):
    inner: PurchaseBody


def test_field_tokens_only_for_flat_structs() -> None:
    assert field_tokens(PurchaseBody) == (
        b'"user_id"',
        b'"client_ip"',
        b'"device_id"',
        b'"quantity"',
        b'"user_agent"',
        b'"payment_ref"',
    )
    assert field_tokens(KeysBody) == (b'"keys"',)
    for body_type in (Nested, dict[str, Any], Any, list[dict[str, int]]):
        assert field_tokens(body_type) is None


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"user_id":"a","user_id":"b"}', "user_id"),
        (b'{"user_id":"a","user\\u005fid":"b"}', "user_id"),  # an escaped spelling of the same
        (b'{"a":{"x":1,"y":2,"x":3}}', "x"),
        (b'[{"k":1},{"k":2,"k":3}]', "k"),
        (b'{"user_id":"user_id"}', None),  # a value may say a key's name
        (b'{"a":{"x":1},"b":{"x":1}}', None),  # the same key in two objects
        (b'{"user_id":"a\\"user_id\\""}', None),
    ],
)
def test_repeated_key(raw: bytes, key: str | None) -> None:
    assert repeated_key(raw) == key


def test_refuse_names_the_key_and_lets_the_usual_body_pass() -> None:
    good = b'{"user_id":"user_id","client_ip":"1.2.3.4","device_id":"d"}'
    refuse_duplicate_keys(good, PurchaseBody)
    refuse_duplicate_keys(good.replace(b"user_id", b"u\\u0073er_id", 1), PurchaseBody)
    with pytest.raises(InvalidRequest, match='duplicate key "device_id"'):
        refuse_duplicate_keys(good[:-1] + b',"device_id":"e"}', PurchaseBody)
    with pytest.raises(InvalidRequest, match='duplicate key "z"'):
        refuse_duplicate_keys(b'{"rules":{"z":1,"z":1}}', dict[str, Any])


@pytest.mark.parametrize(
    ("content_type", "json"),
    [
        (None, True),
        ("", True),
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("APPLICATION/JSON ; charset=UTF-8", True),
        ("application/problem+json", True),
        ("application/vnd.api+json", True),
        ("application/x-www-form-urlencoded", False),
        ("text/plain", False),
        ("text/json", False),
        ("application/jsonl", False),
        ("multipart/form-data; boundary=x", False),
        ("+json", False),
    ],
)
def test_media_type_rule(content_type: str | None, json: bool) -> None:
    assert is_json(content_type) is json
