"""deepsec.web: the identity rules every adapter shares, without a framework."""

from __future__ import annotations

import logging

import pytest

import spi_static
from deepsec import ConfigError, EndUserContext, TokenAcquisitionError
from deepsec.web import (
    MalformedIdentity,
    WebSettings,
    identity_from_authorization,
    identity_from_cookie,
    parse_cookie_header,
    rejection_for_error,
    resolve,
)

TOKEN = spi_static.make_jwt({"preferred_username": "alice"})


@pytest.mark.parametrize(
    ("raw", "identity"),
    [
        (f'"{TOKEN}"', TOKEN),  # JSON string
        (TOKEN, TOKEN),  # bare token
        ('["bob", null]', ("bob", None)),
        ('["bob","k1"]', ("bob", "k1")),
        ("%5B%22bob%22%2Cnull%5D", ("bob", None)),  # percent-encoded JSON
        ("", None),
        (None, None),
    ],
)
def test_cookie_forms(raw, identity):
    assert identity_from_cookie(raw) == identity


@pytest.mark.parametrize(
    "raw",
    ['["bob"]', "[1, null]", '{"a": 1}', "[", '"has space"', "not a token!", '["", null]'],
)
def test_malformed_cookies(raw):
    with pytest.raises(MalformedIdentity) as info:
        identity_from_cookie(raw)
    assert info.value.status == 400
    assert raw not in str(info.value) or len(raw) < 3


def test_oversized_values():
    with pytest.raises(MalformedIdentity, match="larger than 64 bytes"):
        identity_from_cookie("a" * 65, max_size=64)
    with pytest.raises(MalformedIdentity) as info:
        identity_from_authorization("Bearer " + "a" * 65, max_size=64)
    assert info.value.status == 401


def test_authorization_header():
    assert identity_from_authorization(f"Bearer {TOKEN}") == TOKEN
    assert identity_from_authorization(f"bearer {TOKEN}") == TOKEN  # case-insensitive
    assert identity_from_authorization(f"BEARER   {TOKEN}  ") == TOKEN
    assert identity_from_authorization("Basic dXNlcjpwdw==") is None  # not ours
    for bad in ("Bearer", "Bearer ", "Bearer a b", "Bearer {x}"):
        with pytest.raises(MalformedIdentity, match="Bearer token is malformed"):
            identity_from_authorization(bad)


def test_parse_cookie_header():
    header = f'theme=dark; identity="{TOKEN}"; other=1'
    assert parse_cookie_header(header, "identity") == f'"{TOKEN}"'
    # The same cookie twice: the same value is that value; two values are ambiguous.
    assert parse_cookie_header("a=1; identity=x; identity=x", "identity") == "x"
    with pytest.raises(MalformedIdentity, match="more than once"):
        parse_cookie_header("a=1; identity=x; identity=y", "identity")
    # Repeated Cookie fields, as a list or joined by a server with "," or "; ".
    for header in (["a=1", "identity=x"], "a=1, identity=x", "a=1,identity=x", "a=1; identity=x"):
        assert parse_cookie_header(header, "identity") == "x"
    assert parse_cookie_header('identity=["bob", null]', "identity") == '["bob", null]'
    assert parse_cookie_header("identityx=1", "identity") is None
    assert parse_cookie_header(None, "identity") is None


def test_order_cookie_then_bearer_then_resolver_wins():
    settings = WebSettings()
    other = spi_static.make_jwt({"preferred_username": "bob"})
    got = resolve(settings, None, cookie=TOKEN, authorization=f"Bearer {other}")
    assert got.context == EndUserContext(TOKEN)
    got = resolve(settings, None, cookie=None, authorization=f"Bearer {other}")
    assert got.context == EndUserContext(other)
    with_resolver = WebSettings(resolver=lambda request: ("carol", None))
    got = resolve(with_resolver, None, cookie=TOKEN, authorization=f"Bearer {other}")
    assert got.context == EndUserContext(("carol", None))


def test_roles_and_attributes_callables():
    settings = WebSettings(
        data_roles=lambda request: ["hr_" + request], attributes=lambda request: {"r": request}
    )
    got = resolve(settings, "x", cookie=TOKEN)
    assert got.context is not None
    assert got.context.data_roles == ("hr_x",) and got.context.attributes == {"r": "x"}


def test_malformed_is_no_identity_logged_each_time_without_the_value(caplog):
    caplog.set_level(logging.WARNING, logger="deepsec.web")
    settings = WebSettings()
    secretish = '["bob", 12345678]'
    for _ in range(2):
        got = resolve(settings, None, cookie=secretish)
        assert got.context is None and got.rejection is None
    records = [r for r in caplog.records if r.name == "deepsec.web"]
    assert len(records) == 2  # malformed input is never served from the cache
    assert "12345678" not in caplog.text


def test_strict_and_deny_policies():
    strict = WebSettings(strict=True)
    bad_cookie = resolve(strict, None, cookie="[")
    assert bad_cookie.rejection is not None and bad_cookie.rejection.status == 400
    bad_bearer = resolve(strict, None, authorization="Bearer {}")
    assert bad_bearer.rejection is not None and bad_bearer.rejection.status == 401
    assert ("WWW-Authenticate", 'Bearer error="invalid_token"') in bad_bearer.rejection.headers
    deny = resolve(WebSettings(no_identity="deny"), None)
    assert deny.rejection is not None and deny.rejection.status == 401
    assert ("WWW-Authenticate", "Bearer") in deny.rejection.headers


def test_repeat_requests_share_one_context_object():
    """The driver hook's fast path relies on this: same user, same object."""
    settings = WebSettings()
    first = resolve(settings, None, cookie=TOKEN)
    second = resolve(settings, None, cookie=TOKEN)
    assert first.context is second.context is not None
    # With per-request callables the context may differ per request: no cache.
    dynamic = WebSettings(attributes=lambda request: {"n": request})
    a = resolve(dynamic, 1, cookie=TOKEN)
    b = resolve(dynamic, 2, cookie=TOKEN)
    assert a.context is not None and b.context is not None
    assert a.context.attributes == {"n": 1} and b.context.attributes == {"n": 2}


def test_resolution_cache_is_bounded():
    settings = WebSettings()
    for i in range(2000):
        resolve(settings, None, cookie=spi_static.make_jwt({"sub": f"user{i}"}))
    assert 0 < len(settings._resolved) <= 512


def test_settings_validation_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        WebSettings.from_mapping(
            {"STRICT": "yes", "no_identity": "maybe", "max_size": 10, "bogus": 1},
            where="DEEPSEC",
        )
    assert "unknown setting(s): bogus" in str(info.value)
    with pytest.raises(ConfigError) as info:
        WebSettings.from_mapping(
            {"STRICT": "yes", "no_identity": "maybe", "max_size": 10}, where="DEEPSEC"
        )
    text = str(info.value)
    assert "strict must be true or false" in text
    assert "no_identity must be" in text and "max_size must be between" in text
    assert "_resolved" not in WebSettings.field_names()


def test_token_failure_response_has_no_secret():
    exc = TokenAcquisitionError("provider said no", error="invalid_client", correlation_id="c-1")
    rejection = rejection_for_error(exc, WebSettings())
    assert rejection is not None and rejection.status == 503
    assert rejection.body["provider_error"] == "invalid_client"
    assert rejection.body["correlation_id"] == "c-1"
    assert ("Retry-After", "5") in rejection.headers
    assert rejection_for_error(ValueError("x"), WebSettings()) is None


def test_cookies_quoted_by_frameworks_parse():
    """Values written by werkzeug's and http.cookies' set_cookie come back intact."""
    from http.cookies import SimpleCookie

    from werkzeug.http import dump_cookie

    for value, identity in (('["bob", null]', ("bob", None)), (f'"{TOKEN}"', TOKEN)):
        header = dump_cookie("identity", value).split(";")[0]
        raw = parse_cookie_header(header, "identity")
        assert identity_from_cookie(raw) == identity
        jar = SimpleCookie()
        jar["identity"] = value
        raw = parse_cookie_header(jar.output(header="").strip(), "identity")
        assert identity_from_cookie(raw) == identity


def test_rejected_user_tokens_are_401_not_503():
    import types

    import oracledb

    settings = WebSettings()
    for exc in (
        TokenAcquisitionError("obo failed", error="invalid_grant"),
        TokenAcquisitionError("obo failed", error="expired_user_token"),
    ):
        rejection = rejection_for_error(exc, settings)
        assert rejection is not None and rejection.status == 401
        assert ("WWW-Authenticate", 'Bearer error="invalid_token"') in rejection.headers
    ora = oracledb.DatabaseError(types.SimpleNamespace(code=52601, message="ORA-52601"))
    wrapped = RuntimeError("framework wrapper")
    wrapped.__cause__ = ora
    for exc in (ora, wrapped):
        rejection = rejection_for_error(exc, settings)
        assert rejection is not None and rejection.status == 401
    other = oracledb.DatabaseError(types.SimpleNamespace(code=1403, message="ORA-01403"))
    assert rejection_for_error(other, settings) is None
    provider_down = TokenAcquisitionError("down", error="connection_error")
    assert rejection_for_error(provider_down, settings).status == 503


def test_client_sent_local_users_are_refused_unless_opted_in(caplog):
    """Nothing authenticates a keyless local user: a client cookie cannot claim one."""
    caplog.set_level(logging.WARNING, logger="deepsec.web")
    cookie = '["hr_admin", null]'
    refused = resolve(WebSettings(), None, cookie=cookie)
    assert refused.context is None and refused.rejection is None
    assert "client_local_users is off" in caplog.text
    strict = resolve(WebSettings(strict=True), None, cookie=cookie)
    assert strict.rejection is not None and strict.rejection.status == 400
    accepted = resolve(WebSettings(client_local_users=True), None, cookie=cookie)
    assert accepted.context == EndUserContext(("hr_admin", None))
    # A resolver built on the app's own authentication may always return one.
    resolved = resolve(WebSettings(resolver=lambda request: ("hr_admin", None)), None)
    assert resolved.context == EndUserContext(("hr_admin", None))


def test_a_bad_cookie_does_not_hide_a_good_bearer_header():
    got = resolve(WebSettings(), None, cookie='{"x": 1}', authorization=f"Bearer {TOKEN}")
    assert got.context == EndUserContext(TOKEN)
    strict = resolve(
        WebSettings(strict=True), None, cookie='{"x": 1}', authorization=f"Bearer {TOKEN}"
    )
    assert strict.rejection is not None and strict.rejection.status == 400


def test_token_not_ready_is_a_retryable_503():
    from deepsec import TokenNotReadyError

    rejection = rejection_for_error(TokenNotReadyError("not fetched"), WebSettings())
    assert rejection is not None and rejection.status == 503
    assert ("Retry-After", "1") in rejection.headers


def test_malformed_cookie_with_a_valid_bearer_warns_on_every_request(caplog):
    """Issue 9: the cached resolution dropped the warning; now it is logged per request."""
    caplog.set_level(logging.WARNING, logger="deepsec.web")
    settings = WebSettings()
    for _ in range(3):
        got = resolve(
            settings, None, cookie_header='identity=["bob"', authorization=f"Bearer {TOKEN}"
        )
        assert got.context == EndUserContext(TOKEN)
    records = [r for r in caplog.records if r.name == "deepsec.web"]
    assert len(records) == 3
    assert all(r.levelno == logging.WARNING for r in records)
    assert '["bob"' not in caplog.text and TOKEN not in caplog.text
    # A malformed input is not cached (it would evict good entries).
    assert settings._resolved == settings._by_raw == {}


def test_nested_and_surrogate_cookies_are_one_warning_without_the_value(caplog):
    caplog.set_level(logging.WARNING, logger="deepsec.web")
    local = WebSettings(client_local_users=True)
    for header in ("identity=" + "[" * 1000, 'identity=["\\ud800", null]'):
        caplog.clear()
        got = resolve(local, None, cookie_header=header)
        assert got.context is None and got.rejection is None
        records = [r for r in caplog.records if r.name == "deepsec.web"]
        assert len(records) == 1 and "[[[" not in caplog.text and "ud800" not in caplog.text
        strict = resolve(
            WebSettings(strict=True, client_local_users=True), None, cookie_header=header
        )
        assert strict.rejection is not None and strict.rejection.status == 400
        assert strict.rejection.reason == "malformed_identity"


def test_rejection_reasons_and_close_codes():
    from deepsec import TokenNotReadyError

    settings = WebSettings()
    deny = resolve(WebSettings(no_identity="deny"), None).rejection
    assert deny is not None and (deny.reason, deny.close_code) == ("no_identity", 1008)
    rejected = rejection_for_error(TokenAcquisitionError("x", error="invalid_grant"), settings)
    assert rejected is not None and rejected.reason == "user_token_rejected"
    down = rejection_for_error(TokenAcquisitionError("x", error="timeout"), settings)
    assert down is not None and (down.reason, down.close_code) == ("provider_unavailable", 1013)
    not_ready = rejection_for_error(TokenNotReadyError("x"), settings)
    assert not_ready is not None and not_ready.reason == "token_not_ready"


def test_rejection_cannot_be_subclassed():
    """The request paths tell a rejection from a lease by ``type(x) is
    Rejection``: a subclass would be activated as if it were a lease."""
    from deepsec.web import Rejection

    with pytest.raises(TypeError, match="cannot be subclassed"):

        class _Mine(Rejection):  # type: ignore[misc]
            pass


def test_retry_after_follows_what_the_library_will_do():
    """The TOKENS helper's ``retry_after`` (seconds) wins over the default."""
    exc = TokenAcquisitionError("throttled", error="temporarily_unavailable")
    exc.retry_after = 12.2  # type: ignore[attr-defined]
    rejection = rejection_for_error(exc, WebSettings())
    assert rejection is not None and ("Retry-After", "13") in rejection.headers
    exc.retry_after = None  # type: ignore[attr-defined]
    assert ("Retry-After", "5") in rejection_for_error(exc, WebSettings()).headers


def _timed(fn, *args, **kwargs):
    import contextlib
    import time

    start = time.perf_counter()
    with contextlib.suppress(MalformedIdentity):
        fn(*args, **kwargs)
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "header",
    [
        "identity=x;" + " " * 40_000 + "a",  # spaces after ";"
        "identity=x," + " " * 40_000 + "a",  # spaces after ","
        "identity=x" + ", " * 20_000 + "a=1",
        "identity=x" + ",a" * 20_000,
    ],
    ids=["semicolon-spaces", "comma-spaces", "comma-space-pairs", "comma-tokens"],
)
def test_cookie_header_parsing_is_linear(header):
    # A backtracking split took 7.6 s on 40 KB (the whole event loop frozen).
    assert _timed(parse_cookie_header, header, "identity") < 0.5
    assert _timed(resolve, WebSettings(), None, cookie_header=header) < 0.5


def test_an_oversized_cookie_header_is_one_warning_without_the_value(caplog):
    settings = WebSettings(max_size=1024)
    header = "identity=x; pad=" + "q" * (8 * 1024)
    with pytest.raises(MalformedIdentity, match="Cookie header is larger"):
        parse_cookie_header(header, "identity", max_size=1024)
    with caplog.at_level(logging.WARNING, logger="deepsec.web"):
        resolution = resolve(settings, None, cookie_header=header)
    assert resolution.context is None and resolution.rejection is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "qqqq" not in caplog.text
    # Just under the bound it is parsed.
    assert parse_cookie_header(header[:-20], "identity", max_size=1024) == "x"


def test_json_string_scan_is_linear():
    # An unterminated string of escaped quotes, within the 16 KB limit: 2.1 s before.
    value = '["' + '\\"' * 8000
    assert _timed(identity_from_cookie, value) < 0.5
    with pytest.raises(MalformedIdentity):
        identity_from_cookie(value)
    # Escapes are still skipped correctly: brackets inside strings are content.
    assert identity_from_cookie('["b\\\\[o\\"[b", null]') == ('b\\[o"[b', None)
    with pytest.raises(MalformedIdentity, match="nested"):
        identity_from_cookie('["b\\\\", ["x"]]')


def test_octal_escapes_above_177_are_malformed():
    # http.cookies reads \303\251 as "Ã©", werkzeug as "é": two users, so neither.
    with pytest.raises(MalformedIdentity, match="octal escape"):
        identity_from_cookie('"[\\"zo\\303\\253\\"\\054 null]"')
    assert identity_from_cookie('"[\\"bob\\"\\054 null]"') == ("bob", None)


def test_repeated_cookie_fields_join_with_a_comma_as_wsgi_servers_do():
    # gunicorn, werkzeug and Django under ASGI join fields with ","; the list
    # (ASGI) must give what those servers' joined string gives.
    fields = ['identity=["bob"', "null]"]
    assert parse_cookie_header(fields, "identity") == '["bob",null]'
    assert parse_cookie_header(",".join(fields), "identity") == '["bob",null]'
    settings = WebSettings(client_local_users=True)
    as_list = resolve(settings, None, cookie_header=fields)
    assert as_list.context is not None and as_list.context.identity == ("bob", None)


def test_resolution_cache_keeps_no_oversized_or_malformed_values(caplog):
    settings = WebSettings()
    big = "Bearer " + "a" * 200_000
    for i in range(20):
        resolve(settings, None, authorization=big + str(i))
        resolve(settings, None, cookie_header=f'identity=["bob{i}"')
    assert settings._resolved == settings._by_raw == {}
    # Each malformed request still warns, cached or not.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepsec.web"):
        for _ in range(3):
            resolve(settings, None, cookie_header='identity=["bob"')
    assert len(caplog.records) == 3
    resolve(settings, None, authorization=f"Bearer {TOKEN}")
    # Once under the parsed values, once under the raw headers (lifecycle.start),
    # there as the context a request activates.
    assert set(settings._resolved) == {(None, f"Bearer {TOKEN}")}
    parsed = settings._resolved[None, f"Bearer {TOKEN}"][0].context
    assert settings._by_raw == {(None, f"Bearer {TOKEN}"): parsed} and parsed is not None


def test_a_huge_cookie_header_is_never_remembered_raw():
    """The raw-header keys of lifecycle.start obey the same max_size cap."""
    from deepsec.lifecycle import start

    settings = WebSettings()
    auth = f"Bearer {TOKEN}"
    for i in range(20):
        # Other cookies make the header large; the identity itself is valid.
        header = f"pad{i}=" + "x" * (settings.max_size + 10) + '; identity=["bob",null]'
        outcome = start(settings, None, cookie_header=header, authorization=auth)
        outcome.end()
    assert all(
        sum(len(part) for part in key if isinstance(part, str)) <= settings.max_size
        for key in [*settings._resolved, *settings._by_raw]
    )
    assert len(settings._resolved) <= 1 and settings._by_raw == {}


def test_an_exception_group_of_our_errors_is_answered_like_them():
    import builtins

    from deepsec import TokenNotReadyError

    group_type = getattr(builtins, "ExceptionGroup", None)
    if group_type is None:
        pytest.skip("ExceptionGroup needs Python 3.11")
    settings = WebSettings()
    err = TokenNotReadyError("no token")
    alone = rejection_for_error(err, settings)
    assert alone is not None and alone.status == 503
    # An endpoint's task group wraps the error: still a 503, not a 500.
    assert rejection_for_error(group_type("task group", [err]), settings) == alone
    # Mixed with an app bug: not ours to hide, the app's 500 stands.
    assert rejection_for_error(group_type("g", [err, ValueError()]), settings) is None


def test_a_literal_comma_inside_a_name_is_malformed_whatever_the_join():
    # Two Cookie fields identity=["bo + b", null] arrive as "bo,b" (gunicorn,
    # Django) or "bo, b" (waitress): the same bytes must not name two users.
    for joined in ('["bo,b", null]', '["bo, b", null]', '"[\\"b,ob\\"\\054 null]"'):
        with pytest.raises(MalformedIdentity, match="literal comma"):
            identity_from_cookie(joined)
    # Escaped commas are the writer's, not a join: accepted.
    assert identity_from_cookie('"[\\"b\\054ob\\"\\054 null]"') == ("b,ob", None)
    assert identity_from_cookie("%5B%22b%2Cob%22%2Cnull%5D") == ("b,ob", None)
    assert identity_from_cookie('["bob",null]') == ("bob", None)


def test_start_reuses_raw_header_resolutions_and_still_warns_each_request(caplog):
    """lifecycle.start's hot path: a repeat of raw header values is one lookup.

    A remembered resolution that carries a warning goes through resolve()
    again, so the warning is still logged once per request.
    """
    from deepsec.context import current_end_user
    from deepsec.lifecycle import start

    caplog.set_level(logging.WARNING, logger="deepsec.web")
    settings = WebSettings()
    headers = {"cookie_header": "theme=dark", "authorization": f"Bearer {TOKEN}"}
    first, second = start(settings, None, **headers), start(settings, None, **headers)
    assert first.context is second.context  # one remembered context object
    assert settings._by_raw["theme=dark", f"Bearer {TOKEN}"] is first.context
    second.end()
    first.end()
    assert current_end_user() is None
    bad = {"cookie_header": 'identity=["bob"', "authorization": f"Bearer {TOKEN}"}
    for _ in range(3):
        outcome = start(settings, None, **bad)
        assert outcome.context == EndUserContext(TOKEN)
        outcome.end()
    records = [r for r in caplog.records if r.name == "deepsec.web"]
    assert len(records) == 3 and '["bob"' not in caplog.text
    # Neither the malformed raw headers nor anything keyed on them is remembered.
    assert all('["bob"' not in str(key) for key in [*settings._resolved, *settings._by_raw])
    # Repeated fields (lists) are not hashable: resolved in full, never remembered raw.
    listed = start(settings, None, cookie_header=["a=1", "b=2"], authorization=None)
    assert listed.context.identity is None
    listed.end()


def test_a_remembered_header_value_names_its_user_only_in_its_own_header() -> None:
    """The raw-header memo is looked up by (Cookie, Authorization), in that order.

    A Cookie header that is, byte for byte, a remembered Authorization value
    names nobody: swapped, the lookup would hand that request the token's user.
    """
    from deepsec.context import current_end_user
    from deepsec.lifecycle import start

    settings = WebSettings()
    bearer = f"Bearer {TOKEN}"
    for _ in range(2):  # resolved, then remembered
        lease = start(settings, None, cookie_header=None, authorization=bearer)
        assert lease.context == EndUserContext(TOKEN)
        lease.end()
    for _ in range(2):
        lease = start(settings, None, cookie_header=bearer, authorization=None)
        assert lease.context.identity is None and current_end_user() is None
        lease.end()
    assert settings._by_raw[None, bearer] == EndUserContext(TOKEN)


def test_the_remembered_request_sets_every_field_of_activation_and_rejects_still() -> None:
    """lifecycle.start activates a remembered request like any other.

    Every slot of Activation is set, the lease ends like any other, and a
    remembered rejection (no identity where one is required) is still
    answered, never activated.
    """
    import contextvars

    from deepsec import lifecycle
    from deepsec.context import Activation, current_end_user
    from deepsec.web import Rejection, WebSettings

    slots = {name for cls in Activation.__mro__ for name in getattr(cls, "__slots__", ())}
    settings = WebSettings()
    token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ.sig"
    seen = []
    for _ in range(2):  # the first resolves in full, the second is remembered
        lease = lifecycle.start(settings, None, cookie_header=None, authorization=f"Bearer {token}")
        assert isinstance(lease, Activation)
        seen.append({name: hasattr(lease, name) for name in slots})
        assert current_end_user() is not None and current_end_user().identity == token
        outlives = contextvars.copy_context()  # what a task spawned now would hold
        lease.end()
        assert outlives.run(current_end_user) is None and current_end_user() is None
    assert seen[1] == dict.fromkeys(slots, True)
    deny = WebSettings(no_identity="deny")
    for _ in range(2):  # remembered the second time, and still a rejection
        outcome = lifecycle.start(deny, None, cookie_header=None, authorization=None)
        assert isinstance(outcome, Rejection) and outcome.status == 401
        assert current_end_user() is None
