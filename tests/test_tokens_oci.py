"""OCITokenSource: real requests over HTTPS to the local IdP's OCI-style endpoint."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from concurrency_support import run_threads
from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.errors import TokenAcquisitionError
from deepsec.testing.idp import LocalIdP
from deepsec.tokens import token_source_for
from deepsec.tokens.oci import OCITokenSource

NOBODY = EndUserContext(None)
TIMEOUT = 0.5


def source(params: dict[str, Any]) -> OCITokenSource:
    src = token_source_for(parse_end_user_sec_params(params))
    assert isinstance(src, OCITokenSource)
    return src


def test_client_credentials(idp: LocalIdP) -> None:
    src = source(idp.oci_params())
    token = src.get_token(NOBODY)
    claims = idp.decode(token)
    assert claims["sub"] == idp.client_id
    assert claims["scope"] == "urn:oracle:db::id::*"
    assert src.get_token(EndUserContext(("bob", None))) == token  # identity-independent
    assert src.cached_token(NOBODY) == token
    assert idp.token_requests("client_credentials", endpoint="oci") == 1


def test_concurrent_cold_start_one_request(idp: LocalIdP) -> None:
    idp.faults.delay(0.2)
    # A generous timeout: 64 threads share 2 loaded cores with the provider
    # (in this process); one request for all of them needs no deadline.
    src = source(idp.oci_params(timeout=30.0))
    barrier = threading.Barrier(64)
    out: list[str] = []

    def worker() -> None:
        barrier.wait()
        out.append(src.get_token(NOBODY))

    run_threads(worker, count=64)
    assert len(set(out)) == 1 and len(out) == 64
    assert idp.token_requests(endpoint="oci") == 1

    async def main() -> list[str]:
        src.invalidate(NOBODY)
        return list(await asyncio.gather(*(src.get_token_async(NOBODY) for _ in range(64))))

    assert len(set(asyncio.run(main()))) == 1
    assert idp.token_requests(endpoint="oci") == 2


def test_retries_on_503_then_succeeds(idp: LocalIdP) -> None:
    idp.faults.status(503, times=2)
    src = source(idp.oci_params(max_retries=2))
    assert idp.decode(src.get_token(NOBODY))["sub"] == idp.client_id
    assert idp.token_requests(endpoint="oci") == 3


def test_retries_on_429_honouring_a_small_retry_after(idp: LocalIdP) -> None:
    idp.faults.status(429, retry_after=0.3)
    src = source(idp.oci_params(max_retries=1))
    started = time.perf_counter()
    assert src.get_token(NOBODY)
    assert time.perf_counter() - started >= 0.3
    assert idp.token_requests(endpoint="oci") == 2


def test_large_retry_after_is_not_waited_for(idp: LocalIdP) -> None:
    idp.faults.status(429, retry_after=120)
    src = source(idp.oci_params(max_retries=3))
    started = time.perf_counter()
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert time.perf_counter() - started < 1.0
    assert info.value.status == 429 and info.value.error == "too_many_requests"
    assert idp.token_requests(endpoint="oci") == 1


def test_retries_on_dropped_connection(idp: LocalIdP) -> None:
    idp.faults.drop()
    src = source(idp.oci_params(max_retries=1))
    assert src.get_token(NOBODY)
    assert idp.token_requests(endpoint="oci") == 2


def test_persistent_500_is_bounded(idp: LocalIdP) -> None:
    idp.faults.status(500, times=None)
    src = source(idp.oci_params(max_retries=2, timeout=TIMEOUT))
    started = time.perf_counter()
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    elapsed = time.perf_counter() - started
    assert info.value.status == 500 and info.value.error == "server_error"
    assert info.value.correlation_id
    assert idp.token_requests(endpoint="oci") == 3
    assert elapsed < 3 * TIMEOUT  # backoff is short and capped


def test_max_retries_zero_means_one_attempt(idp: LocalIdP) -> None:
    idp.faults.status(503, times=None)
    with pytest.raises(TokenAcquisitionError):
        source(idp.oci_params(max_retries=0)).get_token(NOBODY)
    assert idp.token_requests(endpoint="oci") == 1


def test_wrong_secret_is_invalid_client_and_not_retried(idp: LocalIdP) -> None:
    src = source(idp.oci_params(client_credential="wrong-secret-123"))
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert info.value.error == "invalid_client" and info.value.status == 401
    assert "wrong-secret-123" not in str(info.value) + repr(info.value) + repr(src)
    assert idp.token_requests(endpoint="oci") == 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("timeout", "timeout"), ("malformed_json", "invalid_response"), ("400", "invalid_grant")],
)
def test_faults_give_typed_errors_within_the_timeout(idp: LocalIdP, kind: str, error: str) -> None:
    if kind == "timeout":
        idp.faults.delay(3 * TIMEOUT + 1)
    elif kind == "malformed_json":
        idp.faults.malformed_json()
    else:
        idp.faults.status(int(kind))
    src = source(idp.oci_params(timeout=TIMEOUT))
    started = time.perf_counter()
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert time.perf_counter() - started < 3 * TIMEOUT
    assert info.value.error == error
    assert idp.client_secret not in str(info.value)


def test_no_secret_in_debug_logs(idp: LocalIdP, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "deepsec"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    src = source(idp.oci_params(timeout=TIMEOUT))
    token = src.get_token(NOBODY)
    src.invalidate(NOBODY)
    idp.faults.status(401, description=f"bad secret {idp.client_secret}")
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    assert caplog.records
    for text in (caplog.text, str(info.value), repr(info.value)):
        assert idp.client_secret not in text
        assert token not in text


def test_environment_cannot_change_tls_trust(
    idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", idp.ca_file)
    params = idp.oci_params(max_retries=0)
    del params["ca_file"]
    with pytest.raises(TokenAcquisitionError) as info:
        source(params).get_token(NOBODY)
    assert info.value.error == "connection_error"


def test_provider_description_is_kept_out_of_messages_and_logs(
    idp: LocalIdP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="deepsec")
    src = source(idp.oci_params(timeout=TIMEOUT))
    idp.faults.status(401, "invalid_client", description="user ivan@example.test is disabled")
    with pytest.raises(TokenAcquisitionError) as info:
        src.get_token(NOBODY)
    exc = info.value
    assert exc.status == 401 and exc.error == "invalid_client"
    assert exc.description is not None and "disabled" in exc.description
    deepsec_lines = [r.getMessage() for r in caplog.records if r.name.startswith("deepsec")]
    assert deepsec_lines
    for text in (str(exc), repr(exc), *deepsec_lines):
        assert "ivan" not in text and "disabled" not in text, text
