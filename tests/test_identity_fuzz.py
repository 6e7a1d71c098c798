"""Property tests: untrusted identity input never escapes as anything but MalformedIdentity.

Thousands of generated cookies and ``Authorization`` headers go through
:mod:`deepsec.web`'s parsers and :func:`~deepsec.web.resolve`, then raw ASGI
headers (arbitrary bytes) through :class:`deepsec.asgi.EndUserSecMiddleware`:
no exception other than :class:`~deepsec.web.MalformedIdentity` leaves a
parser, ``resolve`` never raises, every result is a valid identity, and the
middleware never answers 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deepsec import EndUserContext, current_end_user
from deepsec._validation import validate_identity
from deepsec.web import (
    MalformedIdentity,
    WebSettings,
    identity_from_authorization,
    identity_from_cookie,
    parse_cookie_header,
    resolve,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=3000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

token_chars = st.sampled_from(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
)
tokens = st.text(token_chars, min_size=1, max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
local_users = st.tuples(st.text(max_size=12), st.none() | st.text(max_size=12)).map(list)
cookie_values = st.one_of(
    st.text(max_size=200),
    tokens,
    tokens.map(json.dumps),
    local_users.map(json.dumps),
    local_users.map(lambda v: quote(json.dumps(v))),
    json_values.map(json.dumps),
    st.text(token_chars | st.sampled_from('[]"{},: %\\\x00\u00e9\U0001f600'), max_size=60),
    st.integers(0, 20_000).map(lambda n: "a" * n),
)
schemes = st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer\t", "Token"])
authorization_values = st.one_of(
    st.text(max_size=200),
    st.builds(lambda s, sep, t: f"{s}{sep}{t}", schemes, st.sampled_from([" ", "  ", ""]), tokens),
    st.builds(lambda s, t: f"{s} {t}", schemes, st.text(max_size=100)),
    st.integers(0, 20_000).map(lambda n: "Bearer " + "b" * n),
)
max_sizes = st.integers(64, 4096)


def _check_identity(result: object, max_size: int) -> None:
    assert result is None or validate_identity(result) == result
    if isinstance(result, str):
        assert 0 < len(result.encode("utf-8", "surrogatepass")) <= max_size + 7
    if isinstance(result, tuple):
        assert len(result) == 2 and isinstance(result[0], str) and result[0].strip()


@FUZZ
@given(value=st.none() | cookie_values, max_size=max_sizes)
def test_identity_from_cookie(value: str | None, max_size: int) -> None:
    try:
        result = identity_from_cookie(value, max_size=max_size)
    except MalformedIdentity as exc:
        assert exc.status == 400
        assert value is not None and (not value.strip() or str(value.strip()) not in str(exc))
        return
    _check_identity(result, max_size)


@FUZZ
@given(value=st.none() | authorization_values, max_size=max_sizes)
def test_identity_from_authorization(value: str | None, max_size: int) -> None:
    try:
        result = identity_from_authorization(value, max_size=max_size)
    except MalformedIdentity as exc:
        assert exc.status == 401
        return
    _check_identity(result, max_size)
    assert result is None or isinstance(result, str)


@settings(FUZZ, max_examples=2000)
@given(
    pairs=st.lists(st.tuples(st.text(max_size=10), cookie_values), max_size=5),
    noise=st.text(max_size=40),
    name=st.sampled_from(["identity", "id", ""]),
)
def test_parse_cookie_header(pairs: list[tuple[str, str]], noise: str, name: str) -> None:
    header = "; ".join(f"{k}={v}" for k, v in pairs) + noise
    try:
        result = parse_cookie_header(header, name)
    except MalformedIdentity as exc:  # the cookie twice, with different values
        assert exc.status == 400 and header.count(f"{name}=") >= 2
        return
    assert result is None or (isinstance(result, str) and result in header)
    assert parse_cookie_header(None, name) is None and parse_cookie_header("", name) is None


@FUZZ
@given(
    cookie=st.none() | cookie_values,
    authorization=st.none() | authorization_values,
    strict=st.booleans(),
    deny=st.booleans(),
    bearer=st.booleans(),
    max_size=max_sizes,
)
def test_resolve_never_raises(
    cookie: str | None,
    authorization: str | None,
    strict: bool,
    deny: bool,
    bearer: bool,
    max_size: int,
) -> None:
    web = WebSettings(
        strict=strict,
        no_identity="deny" if deny else "least_privilege",
        bearer=bearer,
        max_size=max_size,
    )
    resolution = resolve(web, object(), cookie=cookie, authorization=authorization)
    if resolution.rejection is not None:
        assert resolution.context is None
        assert resolution.rejection.status in (400, 401)
        assert strict or (deny and resolution.rejection.status == 401)
        body = resolution.rejection.json_body().decode()
        for secret in (cookie, authorization):
            assert not secret or len(secret) < 8 or secret not in body
        return
    ctx = resolution.context
    assert ctx is None or isinstance(ctx, EndUserContext)
    if ctx is not None:
        _check_identity(ctx.identity, max_size)
    elif deny:
        raise AssertionError("deny policy let a request without identity through")


header_names = st.sampled_from([b"cookie", b"authorization", b"Cookie", b"AUTHORIZATION", b"x"])
raw_headers = st.lists(
    st.tuples(
        header_names,
        st.binary(max_size=300)
        | cookie_values.map(str.encode)
        | cookie_values.map(lambda v: f"a=1; identity={v}".encode()),
    ),
    max_size=6,
)


def test_asgi_middleware_never_answers_500(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepsec import asgi, lifecycle

    async def no_prepare(context: Any = None) -> None:  # no token source needed here
        return None

    monkeypatch.setattr(lifecycle, "prepare", no_prepare)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = current_end_user()
        assert scope[asgi.SCOPE_KEY] == user
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    apps = {strict: asgi.EndUserSecMiddleware(app, strict=strict) for strict in (False, True)}
    loop = asyncio.new_event_loop()
    statuses: set[int] = set()

    @settings(FUZZ, max_examples=2000)
    @given(headers=raw_headers, strict=st.booleans())
    # Every branch must be exercised whatever the random draw finds.
    @example(headers=[(b"authorization", b"Bearer {not a token}")], strict=True)
    @example(headers=[(b"cookie", b"identity=[")], strict=True)
    @example(headers=[(b"cookie", b'identity=["bob", null]')], strict=False)
    def check(headers: list[tuple[bytes, bytes]], strict: bool) -> None:
        sent: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        loop.run_until_complete(apps[strict](scope, receive, send))
        status = sent[0]["status"]
        assert status in (200, 400, 401), status
        assert status == 200 or strict
        statuses.add(status)
        assert current_end_user() is None

    try:
        check()
    finally:
        loop.close()
    assert statuses == {200, 400, 401}  # every branch was exercised


# -- mutation fuzzing: >= 100,000 resolve() calls, a fast loop --------------------

_SEEDS_COOKIE = [
    'identity=["bob", null]',
    'identity=["bob","k1"]',
    "identity=%5B%22bob%22%2Cnull%5D",
    'identity="eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.sig"',
    "identity=eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.sig",
    'theme=dark; identity="[\\"bob\\"\\054 null]"; other=1',
    'a=1, identity=["zo\u00eb", null]',
]
_SEEDS_AUTH = [
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.sig",
    "bearer abc.def.ghi",
    "Basic YWxpY2U6cHc=",
    "Bearer a, Bearer b",
]
# What mutations insert: structure, escapes, separators, odd code points.
_ALPHABET = [
    *'[]{}",:;=\\% \t\x00\x7f',
    "\ud800",
    "\udfff",
    "\u00e9",
    "\U0001f600",
    "\\ud800",
    "%ED%A0%80",
    "%C3",
    "[" * 50,
    "1" * 5000,
    "null",
    "identity=",
    "Bearer ",
    ", ",
]


def _mutate(rng: Any, value: str) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(value))
        if op == 0:
            value = value[:pos] + rng.choice(_ALPHABET) + value[pos:]
        elif op == 1 and value:
            value = value[:pos] + value[pos + rng.randint(1, 8) :]
        elif op == 2 and value:
            value = value[:pos] + chr(rng.randrange(0x110000)) + value[pos + 1 :]
        elif op == 3:
            value = (
                value[:pos]
                + value[pos : pos + rng.randint(1, 20)] * rng.randint(2, 60)
                + (value[pos:])
            )
        elif op == 4:
            value = value[: rng.randint(0, len(value))]
        else:
            value = value[:pos] + "[" * rng.randint(10, 1500) + value[pos:]
    return value


def test_mutation_fuzz_resolve_100k_cases_without_an_exception() -> None:
    """Issue 8: 7,500 of 300,000 mutated inputs raised (RecursionError...).  Now none."""
    import logging
    import random

    rng = random.Random(20261207)
    variants = [
        WebSettings(strict=strict, client_local_users=local, no_identity=policy)
        for strict in (False, True)
        for local in (False, True)
        for policy in ("least_privilege", "deny")
    ]
    cases = 100_000
    outcomes: dict[str, int] = {"context": 0, "none": 0, "rejection": 0}
    previous = logging.getLogger("deepsec.web").level
    logging.getLogger("deepsec.web").setLevel(logging.ERROR)  # a warning per malformed case
    try:
        for i in range(cases):
            web = variants[i % len(variants)]
            cookie: Any = _mutate(rng, rng.choice(_SEEDS_COOKIE)) if rng.random() < 0.8 else None
            auth: Any = _mutate(rng, rng.choice(_SEEDS_AUTH)) if rng.random() < 0.5 else None
            if cookie is not None and rng.random() < 0.2:
                cookie = [cookie, _mutate(rng, rng.choice(_SEEDS_COOKIE))]
            if auth is not None and rng.random() < 0.1:
                auth = [auth, auth]
            resolution = resolve(web, None, cookie_header=cookie, authorization=auth)
            if resolution.rejection is not None:
                assert resolution.rejection.status in (400, 401)
                outcomes["rejection"] += 1
            elif resolution.context is None:
                outcomes["none"] += 1
            else:
                identity = resolution.context.identity
                if isinstance(identity, tuple):
                    identity[0].encode("utf-8")  # what the driver will do with it
                    assert identity[0].isprintable()
                else:
                    assert isinstance(identity, str) and identity.isascii()
                outcomes["context"] += 1
            if i % 20_000 == 0:
                for web in variants:  # let parsing run, not only the cache
                    web._resolved.clear()
                    web._by_raw.clear()
    finally:
        logging.getLogger("deepsec.web").setLevel(previous)
    assert sum(outcomes.values()) == cases
    # Every outcome was reached: the mutations exercise every branch.
    assert min(outcomes.values()) > 1000, outcomes
