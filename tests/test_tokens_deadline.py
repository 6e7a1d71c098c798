"""``timeout`` bounds a whole token fetch: real MSAL / requests over HTTPS to a dripping IdP.

The local identity provider's ``drip`` fault sends its answer one byte a
second: every single socket read succeeds, so only a deadline on the whole
call (connect, TLS, every read, MSAL's discovery and token requests, OCI's
retries) ends it.  Before, ``timeout=2`` held callers for a minute.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from concurrency_support import run_threads
from deepsec.config import parse_end_user_sec_params
from deepsec.context import EndUserContext
from deepsec.errors import TokenAcquisitionError
from deepsec.testing.idp import LocalIdP
from deepsec.tokens import TokenSource, token_source_for
from deepsec.tokens.cache import FAILURE_MEMORY

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 2.0
#: Slack over ``timeout`` for thread scheduling on a loaded 2-core machine.
MARGIN = 1.0

FLOWS = ["client_credentials", "on_behalf_of", "oci"]


def params_for(idp: LocalIdP, flow: str, **overrides: Any) -> dict[str, Any]:
    if flow == "oci":
        return idp.oci_params(timeout=TIMEOUT, **overrides)
    return idp.azure_params(flow, timeout=TIMEOUT, **overrides)  # type: ignore[arg-type]


def source_for(idp: LocalIdP, flow: str, **overrides: Any) -> TokenSource:
    return token_source_for(parse_end_user_sec_params(params_for(idp, flow, **overrides)))


def context_for(idp: LocalIdP, flow: str, user: str = "dora") -> EndUserContext:
    return EndUserContext(idp.issue_user_token(user) if flow == "on_behalf_of" else None)


def timed(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def warm(idp: LocalIdP, source: TokenSource, flow: str) -> None:
    """Build the MSAL application (discovery) and check the path works, then drop the token."""
    ctx = context_for(idp, flow, "warm")
    source.get_token(ctx)
    source.invalidate(ctx)


# --- one fetch, bounded ---------------------------------------------------------------


@pytest.mark.parametrize("after_headers", [False, True], ids=["whole-answer", "body-only"])
@pytest.mark.parametrize("flow", FLOWS)
def test_dripping_provider_is_bounded_to_timeout_sync(
    idp: LocalIdP, flow: str, after_headers: bool
) -> None:
    source = source_for(idp, flow)
    warm(idp, source, flow)
    idp.faults.drip(1.0, after_headers=after_headers, times=None)
    elapsed, exc = timed(lambda: source.get_token(context_for(idp, flow)))
    assert isinstance(exc, TokenAcquisitionError), exc
    assert exc.error == "timeout"
    assert TIMEOUT - 0.2 <= elapsed <= TIMEOUT + MARGIN, elapsed


@pytest.mark.parametrize("flow", FLOWS)
def test_dripping_provider_is_bounded_to_timeout_async(idp: LocalIdP, flow: str) -> None:
    source = source_for(idp, flow)
    warm(idp, source, flow)
    idp.faults.drip(1.0, times=None)
    ctx = context_for(idp, flow)

    async def main() -> tuple[float, list[Any]]:
        started = time.monotonic()
        results = await asyncio.gather(
            *(source.get_token_async(ctx) for _ in range(20)), return_exceptions=True
        )
        return time.monotonic() - started, results

    elapsed, results = asyncio.run(main())
    assert all(isinstance(r, TokenAcquisitionError) and r.error == "timeout" for r in results)
    assert elapsed <= TIMEOUT + MARGIN, elapsed
    assert idp.token_requests() == 1 + 1  # the warm-up and one shared fetch


def test_msal_discovery_is_inside_the_deadline(idp: LocalIdP) -> None:
    """The OpenID metadata MSAL reads when it builds its application drips too."""
    source = source_for(idp, "client_credentials")
    idp.faults.drip(1.0, target="metadata", times=None)
    elapsed, exc = timed(lambda: source.get_token(EndUserContext(None)))
    assert isinstance(exc, TokenAcquisitionError) and exc.error == "timeout", exc
    assert elapsed <= TIMEOUT + MARGIN, elapsed
    assert idp.token_requests() == 0  # it never got as far as the token request


def test_stall_after_headers_is_bounded(idp: LocalIdP) -> None:
    source = source_for(idp, "oci")
    idp.faults.stall(30.0, times=None)
    elapsed, exc = timed(lambda: source.get_token(EndUserContext(None)))
    assert isinstance(exc, TokenAcquisitionError) and exc.error == "timeout", exc
    assert elapsed <= TIMEOUT + MARGIN, elapsed


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a stuck TLS handshake)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize("flow", FLOWS)
def test_stuck_tls_handshake_is_bounded(idp: LocalIdP, flow: str, black_hole: int) -> None:
    authority = f"https://127.0.0.1:{black_hole}/" + (
        "oauth2/v1/token" if flow == "oci" else idp.tenant
    )
    extra = {"max_retries": 2} if flow == "oci" else {}
    source = source_for(idp, flow, authority=authority, **extra)
    elapsed, exc = timed(lambda: source.get_token(context_for(idp, flow)))
    assert isinstance(exc, TokenAcquisitionError) and exc.error == "timeout", exc
    assert elapsed <= TIMEOUT + MARGIN, elapsed


def test_oci_retries_stay_inside_the_deadline(idp: LocalIdP) -> None:
    """Each attempt may be quick to fail; all of them together still end within timeout."""
    source = source_for(idp, "oci", max_retries=50)
    idp.faults.status(503, times=None, retry_after=0.4)
    elapsed, exc = timed(lambda: source.get_token(EndUserContext(None)))
    assert isinstance(exc, TokenAcquisitionError) and exc.status == 503, exc
    assert elapsed <= TIMEOUT + MARGIN, elapsed
    assert 2 <= idp.token_requests() < 10


# --- many callers: remembered failure, no waves ------------------------------------


@pytest.mark.parametrize("flow", FLOWS)
def test_queued_callers_fail_fast_during_the_remembered_failure(idp: LocalIdP, flow: str) -> None:
    source = source_for(idp, flow)
    warm(idp, source, flow)
    idp.faults.drip(1.0, times=None)
    ctx = context_for(idp, flow)
    durations: list[float] = []
    errors: list[TokenAcquisitionError] = []
    lock = threading.Lock()

    def caller() -> None:
        elapsed, exc = timed(lambda: source.get_token(ctx))
        with lock:
            durations.append(elapsed)
            assert isinstance(exc, TokenAcquisitionError)
            errors.append(exc)

    run_threads(caller, count=32)  # the first wave: one fetch, all bounded
    assert len(errors) == 32 and max(durations) <= TIMEOUT + MARGIN, max(durations)
    assert idp.token_requests() == 2  # warm-up + one fetch for 32 callers
    assert all(e.error == "timeout" for e in errors)
    assert {e.retry_after for e in errors} == {FAILURE_MEMORY}

    durations.clear()
    errors.clear()
    run_threads(caller, count=32)  # the queued wave: remembered, no new fetch
    # Far below the fetch's timeout (what a caller that fetched would wait),
    # with room for 32 threads on 2 loaded cores.
    assert max(durations) < TIMEOUT / 2, max(durations)
    assert idp.token_requests() == 2
    assert all(e.error == "timeout" and 0 < (e.retry_after or 0) <= FAILURE_MEMORY for e in errors)


def test_other_users_are_not_held_by_one_users_remembered_failure(idp: LocalIdP) -> None:
    source = source_for(idp, "on_behalf_of")
    warm(idp, source, "on_behalf_of")
    idp.faults.drip(1.0, times=1)
    slow = context_for(idp, "on_behalf_of", "slow")
    elapsed, exc = timed(lambda: source.get_token(slow))
    assert isinstance(exc, TokenAcquisitionError) and elapsed <= TIMEOUT + MARGIN
    elapsed, exc = timed(lambda: source.get_token(context_for(idp, "on_behalf_of", "fresh")))
    assert exc is None and elapsed < TIMEOUT  # not held for the slow user's timeout
    with pytest.raises(TokenAcquisitionError):  # still remembered for the slow user
        source.get_token(slow)


def test_the_deadline_tls_context_still_checks_trust_and_host_names() -> None:
    """The session's own TLS context (for the deadline) verifies like requests' default."""
    import ssl

    import requests

    from deepsec.testing.tls import TestCA
    from deepsec.tokens._http import TimeoutSession, deadline

    with TestCA() as ca:
        server_ctx = ca.issue_server_cert("other.test", name="other").server_ssl_context()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    server_ctx.wrap_socket(conn, server_side=True).close()
                except (OSError, ssl.SSLError):
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
        try:
            for ca_file, reason in ((str(ca.ca_pem_path), "mismatch"), (None, "issuer")):
                with deadline(TIMEOUT), pytest.raises(requests.exceptions.SSLError) as info:
                    TimeoutSession(TIMEOUT, ca_file).get(f"https://127.0.0.1:{port}/")
                assert reason in str(info.value)
        finally:
            listener.close()
