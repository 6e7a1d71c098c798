"""Django test setup, confined to tests/django_adapter.

Settings are configured here (not through DJANGO_SETTINGS_MODULE), so the
rest of the suite runs as if Django were not installed; DATABASES point at
the session's Oracle wire test server once it runs.  No test database is
ever created: the tests use raw cursors on Django's connections.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1] / "support"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

if not settings.configured:
    from django_project import settings as project_settings

    settings.configure(
        **{k: getattr(project_settings, k) for k in dir(project_settings) if k.isupper()}
    )
    django.setup()

from django.db import connections  # noqa: E402

import spi_static  # noqa: E402
from deepsec.testing.pytest_plugin import OracleServerFixture  # noqa: E402
from django_project import ALIASES, database_settings  # noqa: E402


def _reset_connection_handler(databases: dict[str, Any]) -> None:
    """Point django.db.connections at ``databases`` (test-only, before any query)."""
    connections.close_all()
    settings.DATABASES = databases
    connections._settings = databases
    connections.__dict__.pop("settings", None)
    from asgiref.local import Local

    connections._connections = Local(connections.thread_critical)


def close_django_connections() -> None:
    """Close this thread's connections and every Django-managed pool."""
    for alias in ALIASES:
        conn = connections[alias]
        conn.close()
        key = (alias, conn.settings_dict["USER"])
        if conn.is_pool and key in conn._connection_pools:
            conn.close_pool()


@pytest.fixture(scope="session", autouse=True)
def django_oracle(
    oracle_server: OracleServerFixture, django_db_blocker: Any
) -> Iterator[OracleServerFixture]:
    """Django configured against the wire server; DB access unblocked for tests/django_adapter."""
    databases = database_settings(
        oracle_server.dsn,
        oracle_server.client_ssl_context(),
        oracle_server.user,
        oracle_server.password,
    )
    _reset_connection_handler(databases)
    blocker = django_db_blocker.unblock() if django_db_blocker is not None else None
    if blocker is not None:
        blocker.__enter__()
    try:
        yield oracle_server
    finally:
        try:
            close_django_connections()
        finally:
            if blocker is not None:
                blocker.__exit__(None, None, None)


@pytest.fixture
def server(django_oracle: OracleServerFixture) -> Iterator[OracleServerFixture]:
    """The wire server, with the custom token module reset around the test.

    This thread's connections and the pool are closed afterwards, so no test
    leaves logged-in connections on the session-wide server.
    """
    spi_static.reset()
    try:
        yield django_oracle
    finally:
        spi_static.reset()
        close_django_connections()
