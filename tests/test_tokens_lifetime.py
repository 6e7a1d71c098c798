"""Token lifetimes are untrusted input: anything but a finite positive lifetime is refused.

``expires_in: NaN`` used to be cached yet never served (a provider call on
every sync call) and made the async path raise a 500.  Real MSAL / requests
over HTTPS to the local identity provider, and a custom ``spi_type`` module.
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
from deepsec.tokens._lifetime import MAX_LIFETIME
from deepsec.tokens.cache import FAILURE_MEMORY
from token_support import skip_ahead

pytestmark = pytest.mark.timeout(60)

FLOWS = ["client_credentials", "on_behalf_of", "oci"]
BAD_EXPIRES_IN: list[Any] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    -1,
    0,
    MAX_LIFETIME + 1,
    1e300,
    "3600",
    [3600],
    True,
]


def source_for(idp: LocalIdP, flow: str) -> TokenSource:
    params = idp.oci_params() if flow == "oci" else idp.azure_params(flow)  # type: ignore[arg-type]
    return token_source_for(parse_end_user_sec_params(params))


def context_for(idp: LocalIdP, flow: str) -> EndUserContext:
    return EndUserContext(idp.issue_user_token("lena") if flow == "on_behalf_of" else None)


@pytest.mark.parametrize("bad", BAD_EXPIRES_IN, ids=repr)
@pytest.mark.parametrize("flow", FLOWS)
def test_bad_expires_in_is_a_typed_error_and_nothing_is_cached(
    idp: LocalIdP, flow: str, bad: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = source_for(idp, flow)
    ctx = context_for(idp, flow)
    idp.reply_expires_in = bad
    with pytest.raises(TokenAcquisitionError) as info:
        source.get_token(ctx)
    assert info.value.error == "invalid_response"
    assert source.cached_token(ctx) is None
    sent = idp.token_requests()
    with pytest.raises(TokenAcquisitionError):  # remembered: no provider call per request
        source.get_token(ctx)
    assert idp.token_requests() == sent
    # The provider fixes its answers: the next fetch (after the window) is a real
    # one, not a bad token kept in MSAL's own cache.
    idp.reset()
    skip_ahead(monkeypatch, FAILURE_MEMORY + 0.1)
    token = source.get_token(ctx)
    assert idp.token_requests() == 1
    assert source.cached_token(ctx) == token


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5, "60"], ids=repr)
@pytest.mark.parametrize("flow", FLOWS)
def test_bad_expires_in_async_is_a_typed_error_not_a_crash(
    idp: LocalIdP, flow: str, bad: Any
) -> None:
    source = source_for(idp, flow)
    ctx = context_for(idp, flow)
    idp.reply_expires_in = bad

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                *(source.get_token_async(ctx) for _ in range(10)), return_exceptions=True
            )
        )

    results = asyncio.run(main())
    assert all(isinstance(r, TokenAcquisitionError) for r in results), results
    assert {r.error for r in results} == {"invalid_response"}
    assert source.cached_token(ctx) is None


def test_good_lifetimes_still_work(idp: LocalIdP) -> None:
    for flow in FLOWS:
        source = source_for(idp, flow)
        ctx = context_for(idp, flow)
        idp.reply_expires_in = 3599.5
        assert source.get_token(ctx) == source.cached_token(ctx)
        if flow != "client_credentials":  # (MSAL's own cache chokes on a null expires_in)
            idp.reply_expires_in = None  # null: the JWT's exp decides
            source.invalidate(ctx)
            assert source.get_token(ctx) == source.cached_token(ctx)


@pytest.mark.parametrize(
    "payload",
    [
        '{"exp": NaN}',
        '{"exp": Infinity}',
        '{"exp": -Infinity}',
        '{"exp": 1e400}',
        '{"exp": 1' + "0" * 400 + "}",
        f'{{"exp": {int(time.time()) + 10 * 86_400}}}',
    ],
    ids=["nan", "inf", "-inf", "1e400", "10**400", "ten-days"],
)
def test_custom_module_bad_exp_is_a_typed_error(payload: str) -> None:
    config = parse_end_user_sec_params({"spi_type": "spi_payload", "payload": payload})
    source = token_source_for(config)
    ctx = EndUserContext(("eve", None))
    with pytest.raises(TokenAcquisitionError) as info:
        source.get_token(ctx)
    assert info.value.error == "invalid_response"
    assert source.cached_token(ctx) is None

    async def main() -> str:
        return await source.get_token_async(ctx)

    with pytest.raises(TokenAcquisitionError):
        asyncio.run(main())


def test_custom_module_good_exp_is_cached() -> None:
    payload = '{"exp": ' + str(int(time.time()) + 3600) + "}"
    source = token_source_for(
        parse_end_user_sec_params({"spi_type": "spi_payload", "payload": payload})
    )
    ctx = EndUserContext(("eve", None))
    assert source.get_token(ctx) == source.cached_token(ctx)
