"""deepsec's pytest fixtures: the Oracle wire test server, the local identity provider, Redis.

Opt-in, on purpose: there is **no** ``pytest11`` entry point, so installing
deepsec never makes pytest import the test servers, and fixture names like
``oracle`` never appear in a test session uninvited.  Load them in your
top-level ``conftest.py``::

    pytest_plugins = ["deepsec.testing.pytest_plugin"]

Every deepsec fixture lives here (the identity provider's included); Django
projects add :mod:`deepsec.testing.django` for pytest-django.

Oracle wire test server fixtures:

``oracle_server`` (session scope)
    A running :class:`deepsec.testing.oracle.OracleTestServer` on 127.0.0.1
    over TCPS; ``.dsn``, ``.client_ssl_context()``, ``.user``/``.password``
    (a password login that works), the recording API (``round_trips()``,
    ``statements()``, ``connections()``, ``mark()``, ``clear_records()``),
    ``find_tagged()``, ``add_table()``, ``token_validator`` and ``row_policy``.

``oracle`` (function scope)
    The same server after ``reset()``: records cleared, no token validator, no
    row policy, no canned tables; all reset again after the test.

Redis fixtures (shared token cache, Celery broker):

``redis_server`` (session scope)
    A running :class:`deepsec.testing.redis.RedisTestServer` (Debian's
    ``redis-server`` on a free loopback port).  Skipped, saying why, when the
    binary is missing -- unless ``DEEPSEC_REQUIRE_REDIS=1`` (set by
    ``./run test`` once it has installed Redis), which makes that a failure.

``redis`` (function scope)
    The same server, started again if a test killed it, and flushed before
    and after the test.

Local identity provider fixtures:

``local_idp`` (session scope)
    A running :class:`deepsec.testing.idp.LocalIdP` (its own test CA;
    ``local_idp.ca_file`` is the PEM clients trust).

``idp`` (function scope)
    The same provider for one test: request log, faults, issued-token list
    and lifetime settings reset before and after the test, and every token
    source and MSAL application forgotten (:func:`reset_token_state`), so
    each test starts cold.  Build ``end_user_sec_params`` with
    ``idp.azure_params(auth_flow=...)`` and ``idp.oci_params()``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from deepsec.testing.idp import LocalIdP
from deepsec.testing.oracle import OracleTestServer
from deepsec.testing.redis import RedisTestServer, redis_server_binary

# ---------------------------------------------------------------------------
# Oracle wire test server
# ---------------------------------------------------------------------------

ORACLE_TEST_USER = "app_user"
ORACLE_TEST_PASSWORD = "app_password"


class OracleServerFixture(OracleTestServer):
    """:class:`OracleTestServer` plus the credentials of a working password login."""

    user: str = ORACLE_TEST_USER
    password: str = ORACLE_TEST_PASSWORD

    def connect_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``oracledb.connect`` with password login."""
        return {
            "user": self.user,
            "password": self.password,
            "dsn": self.dsn,
            "ssl_context": self.client_ssl_context(),
        }


@pytest.fixture(scope="session")
def oracle_server() -> Iterator[OracleServerFixture]:
    """A session-wide Oracle wire test server (TCPS on 127.0.0.1)."""
    server = OracleServerFixture(users={ORACLE_TEST_USER: ORACLE_TEST_PASSWORD, "scott": "tiger"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oracle(oracle_server: OracleServerFixture) -> Iterator[OracleServerFixture]:
    """The session server, reset (records, validator, row policy, tables) around the test."""
    oracle_server.reset()
    try:
        yield oracle_server
    finally:
        oracle_server.token_validator = None
        oracle_server.reset()


# ---------------------------------------------------------------------------
# Local identity provider
# ---------------------------------------------------------------------------


def reset_token_state() -> None:
    """Forget every token source, cached token and MSAL application.

    Also forgets which configs :func:`deepsec.prepare` fetches for, so one
    test's identity providers (often stopped by now) are not asked again in
    the next; connections still open register theirs again when next used.
    """
    from deepsec.prefetch import forget_prefetch_configs
    from deepsec.tokens import clear_token_sources

    clear_token_sources()  # also drops MSAL applications
    forget_prefetch_configs()


@pytest.fixture(scope="session")
def local_idp() -> Iterator[LocalIdP]:
    """A running local HTTPS identity provider for the whole session."""
    provider = LocalIdP().start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture
def idp(local_idp: LocalIdP) -> Iterator[LocalIdP]:
    """The session's provider, reset for this test (log, faults, caches)."""
    local_idp.reset()
    reset_token_state()
    try:
        yield local_idp
    finally:
        local_idp.reset()
        reset_token_state()


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisTestServer]:
    """A session-wide ``redis-server`` on a free loopback port."""
    if redis_server_binary() is None:
        message = "redis-server is not installed (./run test installs it)"
        if os.environ.get("DEEPSEC_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    server = RedisTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisTestServer) -> Iterator[RedisTestServer]:
    """The session's Redis, running and empty for this test."""
    redis_server.start()
    redis_server.flush()
    try:
        yield redis_server
    finally:
        redis_server.start()
        redis_server.flush()
