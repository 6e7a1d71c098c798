"""AzureTokenSource: real MSAL over HTTPS against the local IdP (nothing patched)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import jwt
import pytest
import requests

from concurrency_support import run_threads
from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.errors import IdentityError, TokenAcquisitionError
from deepsec.testing.idp import LocalIdP
from deepsec.tokens import token_source_for
from deepsec.tokens.azure import AzureTokenSource
from deepsec.tokens.cache import FAILURE_MEMORY
from token_support import CacheClock, raw_msal_app, skip_ahead, wait_until

SCOPE = "api://oracle-db/.default"
#: The provider timeout of the concurrency tests: hundreds of threads and TLS
#: handshakes share 2 loaded cores with the provider (in this process), and
#: what they prove (one request per user) has no deadline; 2 s was too tight.
CONCURRENT_TIMEOUT = 30.0


def source(params: dict[str, Any]) -> AzureTokenSource:
    src = token_source_for(parse_end_user_sec_params(params))
    assert isinstance(src, AzureTokenSource)
    return src


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


NOBODY = EndUserContext(None)


# --- the two flows ------------------------------------------------------------------


def test_client_credentials(idp: LocalIdP) -> None:
    src = source(idp.azure_params())
    token = src.get_token(NOBODY)
    assert idp.decode(token)["sub"] == idp.client_id
    assert src.get_token(NOBODY) == token
    assert src.cached_token(NOBODY) == token
    assert idp.token_requests("client_credentials") == 1


def test_on_behalf_of(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of"))
    alice = EndUserContext(idp.issue_user_token("alice"))
    token = src.get_token(alice)
    verified = idp.decode(token)
    assert verified["preferred_username"] == "alice@example.test"
    assert verified["azp"] == idp.client_id
    assert src.get_token(alice) == token
    assert src.cached_token(alice) == token
    assert src.cached_token(EndUserContext(idp.issue_user_token("bob"))) is None
    assert idp.token_requests("on_behalf_of") == 1


def test_async_on_behalf_of(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of"))
    bob = EndUserContext(idp.issue_user_token("bob"))

    async def main() -> tuple[str, str]:
        return await src.get_token_async(bob), await src.get_token_async(bob)

    first, second = asyncio.run(main())
    assert first == second
    assert claims(first)["preferred_username"] == "bob@example.test"
    assert idp.token_requests("on_behalf_of") == 1


@pytest.mark.parametrize("identity", [None, ("bob", None), ("bob", "key")])
def test_on_behalf_of_needs_a_user_token(idp: LocalIdP, identity: Any) -> None:
    src = source(idp.azure_params("on_behalf_of"))
    with pytest.raises(IdentityError, match=r"on_behalf_of.*access token"):
        src.get_token(EndUserContext(identity))
    assert src.cached_token(EndUserContext(identity)) is None
    assert idp.token_requests() == 0


def test_expired_user_token_is_not_sent(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of"))
    expired = EndUserContext(idp.issue_user_token("carol", expires_in=-10))
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(expired)
    assert info.value.error == "expired_user_token"
    assert idp.token_requests() == 0


def test_obo_token_never_outlives_the_user_token(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of"))
    user_token = idp.issue_user_token("dave", expires_in=120)
    src.get_token(EndUserContext(user_token))
    (key,) = list(src.cache._data)
    expires = src.cache.expires_at(key)
    assert expires is not None
    assert expires <= claims(user_token)["exp"]  # IdP token lives 3600 s


# --- single-flight under load -------------------------------------------------------


def test_256_threads_one_user_cold_cache_one_request(idp: LocalIdP) -> None:
    idp.faults.delay(0.3)  # keep the first fetch in flight while the others arrive
    src = source(idp.azure_params("on_behalf_of", timeout=CONCURRENT_TIMEOUT))
    user_token = idp.issue_user_token("erin")
    barrier = threading.Barrier(256)
    results: list[str] = []

    def worker() -> None:
        ctx = EndUserContext(user_token)
        barrier.wait()
        results.append(src.get_token(ctx))

    run_threads(worker, count=256)
    assert len(results) == 256 and len(set(results)) == 1
    assert idp.token_requests("on_behalf_of") == 1


def test_256_asyncio_tasks_one_user_cold_cache_one_request(idp: LocalIdP) -> None:
    idp.faults.delay(0.3)
    src = source(idp.azure_params("on_behalf_of", timeout=CONCURRENT_TIMEOUT))
    ctx = EndUserContext(idp.issue_user_token("frank"))

    async def main() -> list[str]:
        return list(await asyncio.gather(*(src.get_token_async(ctx) for _ in range(256))))

    results = asyncio.run(main())
    assert len(set(results)) == 1
    assert idp.token_requests("on_behalf_of") == 1


def test_50_users_50_requests(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of", timeout=CONCURRENT_TIMEOUT))
    users = {f"user{i}": idp.issue_user_token(f"user{i}") for i in range(50)}
    seen: dict[str, set[str]] = {name: set() for name in users}
    lock = threading.Lock()

    def worker(name: str) -> None:
        token = src.get_token(EndUserContext(users[name]))
        with lock:
            seen[name].add(claims(token)["preferred_username"])

    run_threads(worker, each=[n for n in users for _ in range(4)])
    assert idp.token_requests("on_behalf_of") == 50
    assert all(s == {f"{name}@example.test"} for name, s in seen.items())


# --- lifetime: refresh-ahead ---------------------------------------------------------


def test_short_lived_token_is_refreshed_in_the_background(idp: LocalIdP) -> None:
    # MSAL treats a cached token with < 5 min left as expired, so every MSAL
    # call goes to the IdP here; our cache decides when that happens.
    idp.expires_in = 3
    src = source(idp.azure_params())
    first = src.get_token(NOBODY)
    first_exp = claims(first)["exp"]
    bad: list[float] = []
    tokens: list[str] = []
    stop = time.time() + 4.0

    def worker() -> None:
        while time.time() < stop:
            # Expired before the call began: served expired.  (The clock read
            # after the call blamed the cache for a thread the machine paused.)
            before = time.time()
            started = time.perf_counter()
            token = src.get_token(NOBODY)
            waited = time.perf_counter() - started
            if claims(token)["exp"] <= before:
                bad.append(before)
            tokens.append(token)
            assert waited < 1.0
            time.sleep(0.005)

    run_threads(worker, count=4)
    assert not bad, "a caller got an expired token"
    requests_log = [r for r in idp.requests() if r.grant_type == "client_credentials"]
    assert len(requests_log) >= 2
    # the second token was requested while the first was still valid
    assert requests_log[1].time < first_exp
    assert len(set(tokens)) >= 2
    # about one provider call per token lifetime, not one per caller
    assert len(requests_log) <= 8


def test_idp_down_during_refresh_keeps_serving_valid_token(
    idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    idp.expires_in = 3  # usable 1.5-2.25 s (exp is whole seconds), refreshed in the last half
    # The downed provider drops connections at once: the timeout bounds only
    # the first fetch (MSAL start-up included), generous for a loaded machine.
    src = source(idp.azure_params(timeout=5.0))
    token = src.get_token(NOBODY)
    (key,) = list(src.cache._data)
    usable_until = src.cache.expires_at(key)
    assert usable_until is not None and usable_until < claims(token)["exp"]
    idp.faults.down()
    # The cache's clock steps through the refresh window to just before the
    # end (real sleeps there, 50 ms from the end, failed on a loaded machine);
    # each refresh it starts fails against the provider, before the next step.
    clock = CacheClock(monkeypatch)
    for left in (0.7, 0.4, 0.15, 0.01):
        clock.now = usable_until - left
        assert src.get_token(NOBODY) == token
        wait_until(lambda: src.cache.refresh_failures == src.cache.fetches - 1)
    assert src.cache.refresh_failures >= 1
    clock.now = usable_until + 0.01
    assert src.cached_token(NOBODY) is None
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert info.value.error == "connection_error"


# --- faults -------------------------------------------------------------------------------

TIMEOUT = 0.5


def _inject(idp: LocalIdP, kind: str) -> None:
    if kind == "timeout":
        idp.faults.delay(3 * TIMEOUT + 1)
    elif kind == "drop":
        idp.faults.drop()
    elif kind == "malformed_json":
        idp.faults.malformed_json()
    else:
        idp.faults.status(int(kind))


@pytest.mark.parametrize(
    ("flow", "kind", "error"),
    [
        ("client_credentials", "timeout", "timeout"),
        ("client_credentials", "drop", "connection_error"),
        ("client_credentials", "500", "server_error"),
        ("client_credentials", "503", "server_error"),
        ("client_credentials", "malformed_json", "invalid_response"),
        ("client_credentials", "401", "invalid_client"),
        ("client_credentials", "429", "too_many_requests"),
        ("on_behalf_of", "timeout", "timeout"),
        ("on_behalf_of", "400", "invalid_grant"),
        ("on_behalf_of", "503", "server_error"),
        ("on_behalf_of", "malformed_json", "invalid_response"),
    ],
)
def test_faults_give_typed_errors_within_the_timeout(
    idp: LocalIdP, flow: str, kind: str, error: str
) -> None:
    src = source(idp.azure_params(flow, timeout=TIMEOUT))
    user_token = idp.issue_user_token("gina")
    ctx = EndUserContext(user_token)
    src.get_token(ctx)  # the MSAL app is built (discovery) and the path works
    src.invalidate(ctx)
    _inject(idp, kind)
    started = time.perf_counter()
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(ctx)
    elapsed = time.perf_counter() - started
    assert info.value.error == error
    assert elapsed < 3 * TIMEOUT
    if kind in ("500", "503"):
        assert info.value.status == int(kind)
    if kind in ("400", "401", "429"):  # MSAL drops the body of a 5xx answer
        assert info.value.correlation_id
    for text in (str(info.value), repr(info.value)):
        assert idp.client_secret not in text
        assert user_token not in text
    # the transport exception (whose text may echo the request) is not chained
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_wrong_client_secret(idp: LocalIdP) -> None:
    src = source(idp.azure_params(client_credential="not-the-secret"))
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert info.value.error == "invalid_client"
    assert "not-the-secret" not in str(info.value)
    assert "not-the-secret" not in repr(src) and "not-the-secret" not in repr(src.config)


def test_idp_unreachable_at_startup_then_recovers(idp: LocalIdP) -> None:
    params = idp.azure_params(timeout=0.5)
    params["authority"] = "https://127.0.0.1:1/test-tenant"  # nothing listens there
    src = source(params)
    started = time.perf_counter()
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert info.value.error == "connection_error"
    assert time.perf_counter() - started < 1.5


def test_failure_is_remembered_briefly_then_success_is_fetched(
    idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(idp.azure_params("on_behalf_of", timeout=TIMEOUT))
    ctx = EndUserContext(idp.issue_user_token("hank"))
    idp.faults.drop()
    with pytest.raises(TokenAcquisitionError) as first:
        src.get_token(ctx)
    assert first.value.retry_after == FAILURE_MEMORY
    assert src.cached_token(ctx) is None
    sent = idp.token_requests()
    with pytest.raises(TokenAcquisitionError) as again:  # remembered: no new request
        src.get_token(ctx)
    assert idp.token_requests() == sent
    assert again.value.error == first.value.error
    assert 0 < (again.value.retry_after or 0) <= FAILURE_MEMORY
    skip_ahead(monkeypatch, FAILURE_MEMORY + 0.1)
    assert claims(src.get_token(ctx))["preferred_username"] == "hank@example.test"


# --- secrets never leak -------------------------------------------------------------------


def test_no_secret_in_errors_or_debug_logs(idp: LocalIdP, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: deepsec, msal, urllib3, requests
    for name in ("msal", "urllib3", "requests", "deepsec"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    cc = source(idp.azure_params(timeout=TIMEOUT))
    obo = source(idp.azure_params("on_behalf_of", timeout=TIMEOUT))
    user_token = idp.issue_user_token("ivan")
    ctx = EndUserContext(user_token)
    errors: list[BaseException] = []

    cc.get_token(NOBODY)
    obo.get_token(ctx)
    obo.invalidate(ctx)
    cc.invalidate(NOBODY)
    # a provider that echoes the assertion in its error description
    idp.faults.status(400, "invalid_grant", description=f"AADSTS50013: bad assertion {user_token}")
    # a malformed body holding a token: MSAL logs malformed bodies verbatim
    leaked = idp.issue_user_token("leak")
    idp.faults.malformed_json(body=b'{"access_token": "' + leaked.encode() + b'", ')
    idp.faults.status(401, description=f"client secret {idp.client_secret} rejected")
    for src, context in ((obo, ctx), (obo, ctx), (cc, NOBODY)):
        src.invalidate(context)
        try:
            src.get_token(context)
        except TokenAcquisitionError as exc:
            errors.append(exc)
    assert len(errors) == 3

    secrets = [idp.client_secret, *idp.issued_tokens()]
    assert user_token in secrets and leaked in secrets
    # the signature part alone is a secret too
    secrets += [t.rsplit(".", 1)[1] for t in idp.issued_tokens()]
    assert caplog.records, "expected debug records from msal/urllib3/deepsec"
    names = {r.name.split(".")[0] for r in caplog.records}
    assert {"msal", "urllib3", "deepsec"} <= names
    texts = [caplog.text, *(str(e) for e in errors), *(repr(e) for e in errors)]
    texts += [repr(cc), repr(obo), repr(cc.config), repr(obo.cache), repr(ctx)]
    for text in texts:
        for secret in secrets:
            assert secret not in text


# --- the cross-user hazard and MSAL app reuse ---------------------------------------------


def test_raw_msal_shows_the_cross_user_hazard(idp: LocalIdP) -> None:
    """Why the flows are kept apart: one MSAL app, OBO reply without client_info."""
    idp.obo_account_info = False
    app = raw_msal_app(idp)
    user_token = idp.issue_user_token("mallory")
    obo = app.acquire_token_on_behalf_of(user_token, [SCOPE])
    app_token = app.acquire_token_for_client([SCOPE])
    if app_token["access_token"] != obo["access_token"]:
        pytest.skip("this MSAL version no longer mixes OBO and client tokens")
    assert claims(app_token["access_token"])["preferred_username"] == "mallory@example.test"


def test_client_credentials_never_returns_a_users_obo_token(idp: LocalIdP) -> None:
    idp.obo_account_info = False  # MSAL would store the user token without an account
    obo = source(idp.azure_params("on_behalf_of"))
    cc = source(idp.azure_params())
    user_token = obo.get_token(EndUserContext(idp.issue_user_token("mallory")))
    assert claims(user_token)["preferred_username"] == "mallory@example.test"
    app_token = cc.get_token(NOBODY)
    assert app_token != user_token
    assert claims(app_token)["sub"] == idp.client_id
    assert "preferred_username" not in claims(app_token)
    assert idp.token_requests("client_credentials") == 1


def test_one_msal_app_per_identity_for_the_process(idp: LocalIdP) -> None:
    first = source(idp.azure_params())
    first.get_token(NOBODY)
    discovery = sum(1 for r in idp.requests() if r.method == "GET")
    # another config (other scope, other cache size) for the same client: same app
    second = source(idp.azure_params(scopes="api://other/.default", cache_size=5))
    second.get_token(NOBODY)
    assert sum(1 for r in idp.requests() if r.method == "GET") == discovery
    # MSAL's own cache is kept: a fresh source for the first config asks nobody
    first.cache.clear()
    assert first.get_token(NOBODY)
    assert idp.token_requests("client_credentials") == 2


def test_invalidate_forces_a_new_client_token(idp: LocalIdP) -> None:
    src = source(idp.azure_params())
    old = src.get_token(NOBODY)
    src.invalidate(NOBODY)
    new = src.get_token(NOBODY)
    assert new != old
    assert idp.token_requests("client_credentials") == 2


def test_lru_bound_evicts_old_obo_entries(idp: LocalIdP) -> None:
    src = source(idp.azure_params("on_behalf_of", cache_size=3))
    users = [EndUserContext(idp.issue_user_token(f"lru{i}")) for i in range(5)]
    for ctx in users:
        src.get_token(ctx)
    assert len(src.cache) == 3
    assert src.cached_token(users[0]) is None and src.cached_token(users[1]) is None
    assert all(src.cached_token(ctx) for ctx in users[2:])
    src.get_token(users[0])
    assert idp.token_requests("on_behalf_of") == 6


# --- trust and environment ------------------------------------------------------------------


def test_environment_cannot_change_tls_trust(
    idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    # REQUESTS_CA_BUNDLE pointing at the test CA must not make an unconfigured
    # source trust it: without ca_file the certifi bundle is used.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", idp.ca_file)
    monkeypatch.setenv("CURL_CA_BUNDLE", idp.ca_file)
    params = idp.azure_params(timeout=10.0)  # the handshake fails; a loaded machine is slow
    del params["ca_file"]
    with pytest.raises(TokenAcquisitionError) as info:
        source(params).get_token(NOBODY)
    assert info.value.error == "connection_error"
    assert "TLS" in str(info.value)


def test_msal_force_region_does_not_interfere(
    idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSAL_FORCE_REGION", "westus")
    assert source(idp.azure_params()).get_token(NOBODY)
    assert idp.token_requests("client_credentials") == 1


def test_oidc_style_discovery_path_is_served(idp: LocalIdP) -> None:
    response = requests.get(
        f"{idp.authority}/.well-known/openid-configuration", verify=idp.ca_file, timeout=2
    )
    assert response.json()["issuer"] == idp.issuer


def test_provider_description_is_kept_out_of_messages_and_logs(
    idp: LocalIdP, caplog: pytest.LogCaptureFixture
) -> None:
    # Entra's error_description can name the end user; the error's message
    # reaches logs and error pages, so it holds the error code only.
    caplog.set_level(logging.DEBUG, logger="deepsec")
    obo = source(idp.azure_params("on_behalf_of", timeout=TIMEOUT))
    user_token = idp.issue_user_token("ivan")
    idp.faults.status(
        400, "invalid_grant", description="AADSTS50173: user ivan@example.test revoked"
    )
    with pytest.raises(TokenAcquisitionError) as info:
        obo.get_token(EndUserContext(user_token))
    exc = info.value
    assert exc.error == "invalid_grant"
    assert exc.description is not None and "AADSTS50173" in exc.description
    deepsec_lines = [r.getMessage() for r in caplog.records if r.name.startswith("deepsec")]
    assert deepsec_lines
    for text in (str(exc), repr(exc), *deepsec_lines):
        assert "ivan" not in text and "AADSTS50173" not in text, text


def test_tls_failures_name_verification_only_when_the_certificate_was_rejected(
    idp: LocalIdP, tmp_path: Any
) -> None:
    """A certificate the CA file does not vouch for points at ca_file; a handshake
    cut short (an overloaded provider or proxy) does not."""
    import ssl

    from deepsec.testing.tls import TestCA
    from deepsec.tokens._http import error_from_exception

    other_ca = TestCA().write_ca_pem(tmp_path / "other-ca.pem")
    with pytest.raises(requests.exceptions.SSLError) as caught:
        requests.get(idp.base_url, verify=str(other_ca), timeout=10)
    rejected = error_from_exception(caught.value, "token request")
    assert "TLS verification" in str(rejected) and "ca_file" in str(rejected)
    cut = requests.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    dropped = error_from_exception(cut, "token request")
    assert "verification" not in str(dropped) and "ca_file" not in str(dropped)
    assert "SSLEOFError" in str(dropped) and "violation" not in str(dropped)
    assert rejected.error == dropped.error == "connection_error"
