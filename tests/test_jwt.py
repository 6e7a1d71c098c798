"""deepsec._jwt: the one unverified JWT payload decoder (cache expiry, doctor, wire server)."""

from __future__ import annotations

import base64
import json

from deepsec import _jwt
from deepsec.doctor import decode_claims
from deepsec.testing.oracle import decode_jwt_claims
from deepsec.tokens.cache import jwt_expiry


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(payload: object) -> str:
    return f"{b64(b'{}')}.{b64(json.dumps(payload).encode())}.sig"


def test_decodes_a_jws_payload_without_verifying() -> None:
    assert _jwt.decode_claims(token({"sub": "alice", "exp": 5})) == {"sub": "alice", "exp": 5}
    assert _jwt.expiry(token({"exp": 5})) == 5.0
    assert _jwt.expiry(token({"exp": 1.5})) == 1.5


def test_anything_malformed_is_none_not_an_exception() -> None:
    deep = "[" * (_jwt.MAX_DEPTH + 1) + "]" * (_jwt.MAX_DEPTH + 1)
    bad = [
        None,
        42,
        "",
        "opaque",
        "a.b",
        "a.b.c.d.e",  # JWE: the payload is encrypted
        "a..c",
        "a.%%%.c",
        f"a.{b64(b'not json')}.c",
        f"a.{b64(bytes([0xFF, 0xFE]))}.c",  # not UTF-8
        token([1, 2]),  # not an object
        token("text"),
        f"a.{b64(deep.encode())}.c",
        f"a.{b64(json.dumps({'x': 'y' * _jwt.MAX_TOKEN_CHARS}).encode())}.c",
    ]
    for value in bad:
        assert _jwt.decode_claims(value) is None, value
        assert _jwt.expiry(value) is None


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    claims = {"name": "[" * 100 + '\\"{' * 50}
    assert _jwt.decode_claims(token(claims)) == claims


def test_exp_must_be_a_number() -> None:
    for exp in (True, "5", None, [5]):
        assert _jwt.expiry(token({"exp": exp})) is None


def test_the_three_former_decoders_are_this_one() -> None:
    good = token({"sub": "s", "exp": 7})
    assert jwt_expiry(good) == 7.0
    assert decode_claims(good) == decode_jwt_claims(good) == {"sub": "s", "exp": 7}
    assert decode_claims("junk") == decode_jwt_claims("junk") == decode_jwt_claims(None) == {}
