"""A provider's ``Retry-After`` is honoured per cache key, up to a cap.

MSAL honours ``Retry-After`` for up to an hour under a key without the user
for on-behalf-of requests: one 503 with ``Retry-After: 60`` failed every
user, new users included, for 60 s while the provider was healthy again.
Real MSAL / requests over HTTPS to the local identity provider.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.errors import TokenAcquisitionError
from deepsec.testing.idp import LocalIdP
from deepsec.tokens import TokenSource, token_source_for
from deepsec.tokens.cache import MAX_RETRY_AFTER, MIN_RETRY_AFTER
from token_support import raw_msal_app, skip_ahead

pytestmark = pytest.mark.timeout(60)

SCOPE = "api://oracle-db/.default"


def source_for(idp: LocalIdP, flow: str) -> TokenSource:
    params = idp.oci_params() if flow == "oci" else idp.azure_params(flow)  # type: ignore[arg-type]
    return token_source_for(parse_end_user_sec_params(params))


def user(idp: LocalIdP, name: str) -> EndUserContext:
    return EndUserContext(idp.issue_user_token(name))


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_60_blocks_only_the_affected_user_and_is_capped(
    idp: LocalIdP, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    obo = source_for(idp, "on_behalf_of")
    cc = source_for(idp, "client_credentials")
    alice, bob = user(idp, "alice"), user(idp, "bob")
    obo.get_token(user(idp, "warm"))  # MSAL application built
    idp.faults.throttle(60, status=status)
    with pytest.raises(TokenAcquisitionError) as info:
        obo.get_token(alice)
    assert info.value.retry_after == MAX_RETRY_AFTER  # not 60: capped
    if status == 503:
        assert info.value.status == 503

    # The provider is healthy again: another user and the other flow are served at once.
    started = time.monotonic()
    assert obo.get_token(bob) == obo.cached_token(bob)
    assert cc.get_token(EndUserContext(None))
    assert time.monotonic() - started < 2.0

    # alice stays refused without a provider call, and is told how long is left.
    sent = idp.token_requests()
    with pytest.raises(TokenAcquisitionError) as again:
        obo.get_token(alice)
    assert idp.token_requests() == sent
    assert 0 < (again.value.retry_after or 0) <= MAX_RETRY_AFTER

    # After the cap (not after 60 s) she is served.
    skip_ahead(monkeypatch, MAX_RETRY_AFTER + 0.1)
    assert obo.get_token(alice) == obo.cached_token(alice)
    assert idp.token_requests() == sent + 1


def test_a_short_retry_after_is_honoured_as_given(idp: LocalIdP) -> None:
    obo = source_for(idp, "on_behalf_of")
    idp.faults.throttle(3, status=429)
    with pytest.raises(TokenAcquisitionError) as info:
        obo.get_token(user(idp, "carl"))
    assert info.value.retry_after == 3
    idp.faults.throttle(0, status=429)
    with pytest.raises(TokenAcquisitionError) as info:
        obo.get_token(user(idp, "dina"))
    assert info.value.retry_after == MIN_RETRY_AFTER


def test_client_credentials_retry_after_is_capped(idp: LocalIdP) -> None:
    cc = source_for(idp, "client_credentials")
    idp.faults.throttle(3600, status=503)
    with pytest.raises(TokenAcquisitionError) as info:
        cc.get_token(EndUserContext(None))
    assert info.value.retry_after == MAX_RETRY_AFTER


def test_async_callers_get_the_same_capped_retry_after(idp: LocalIdP) -> None:
    obo = source_for(idp, "on_behalf_of")
    ctx = user(idp, "erin")
    idp.faults.throttle(60)

    async def main() -> list[Any]:
        first = await asyncio.gather(obo.get_token_async(ctx), return_exceptions=True)
        later = await asyncio.gather(
            *(obo.get_token_async(ctx) for _ in range(10)), return_exceptions=True
        )
        return [*first, *later]

    results = asyncio.run(main())
    assert all(isinstance(r, TokenAcquisitionError) for r in results)
    assert results[0].retry_after == MAX_RETRY_AFTER
    assert all(0 < r.retry_after <= MAX_RETRY_AFTER for r in results[1:])
    assert idp.token_requests() == 1


def test_oci_long_retry_after_is_not_waited_and_is_capped(idp: LocalIdP) -> None:
    oci = source_for(idp, "oci")
    idp.faults.throttle(60, status=503)
    started = time.monotonic()
    with pytest.raises(TokenAcquisitionError) as info:
        oci.get_token(EndUserContext(None))
    assert time.monotonic() - started < 1.0
    assert info.value.status == 503 and info.value.retry_after == MAX_RETRY_AFTER


def test_raw_msal_throttles_every_obo_user_for_the_providers_retry_after(idp: LocalIdP) -> None:
    """Why deepsec turns MSAL's throttling off: MSAL keys OBO throttling without the user."""
    app = raw_msal_app(idp)
    idp.faults.throttle(60, status=429)
    first = app.acquire_token_on_behalf_of(idp.issue_user_token("alice"), [SCOPE])
    assert "access_token" not in first
    sent = idp.token_requests()
    other = app.acquire_token_on_behalf_of(idp.issue_user_token("bob"), [SCOPE])
    assert "access_token" not in other  # bob is refused from MSAL's memory...
    assert idp.token_requests() == sent  # ...without the healthy provider being asked
