"""pytest-django fixtures: test a Django app against the wire test server and the local IdP.

Load them from the project's top-level ``conftest.py`` (pytest-django installed,
``DJANGO_SETTINGS_MODULE`` set as pytest-django wants)::

    pytest_plugins = ["deepsec.testing.django"]

``django_db_setup`` (session; replaces pytest-django's)
    Points every ``django.db.backends.oracle`` database of the settings at the
    session's Oracle wire test server (``NAME`` its TCPS DSN, a working
    ``USER``/``PASSWORD``, its ``ssl_context``) and swaps its
    ``end_user_sec_params`` for :func:`deepsec_end_user_sec_params`.  No Oracle
    test database is created: pytest-django's default would connect to the real
    host from the settings first (``gaierror``), and the wire server has no
    DDL.  Every other database (SQLite, PostgreSQL...) gets pytest-django's
    usual test database.  The settings are restored at the end of the session.
``deepsec_end_user_sec_params`` (session)
    The ``end_user_sec_params`` used in tests: Azure client credentials
    against the local identity provider.  Override it to test another flow.
``deepsec_client`` (function)
    A :class:`DeepSecClient`: Django's test ``Client`` that signs in as an
    end user and keeps the statements each request sent.

The wire server (``oracle_server``, ``oracle``) and identity provider
(``local_idp``, ``idp``) fixtures are loaded too.  Django database access is
unblocked by ``deepsec_client`` through pytest-django's ``db`` fixture, so
the test needs no ``django_db`` mark.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ..django.checks import ORACLE_ENGINE
from .idp import LocalIdP
from .oracle import RoundTrip, statement_has_tag

pytest_plugins = ["deepsec.testing.pytest_plugin"]

__all__ = [
    "DeepSecClient",
    "deepsec_client",
    "deepsec_end_user_sec_params",
    "django_db_setup",
    "point_databases_at",
    "restore_databases",
]


class DeepSecClient:
    """Django's test ``Client``, signed in as an end user, recording each request's SQL.

    ``sign_in("alice")`` sends a token the local identity provider signs for
    ``alice`` (``preferred_username`` and ``upn`` are exactly ``alice``) in the
    ``identity`` cookie, or as ``Authorization: Bearer`` with
    ``via="bearer"``; ``token=`` sends a token of your own instead.
    ``sign_out()`` sends no identity.  After each request,
    :attr:`statements` holds the round trips that request executed, each
    with the end-user context that travelled with it
    (``trip.context.username``; ``trip.context`` is ``None`` without one).
    A streaming body runs its statements while it is read, after the request
    returned: read them with ``server.statements(since=server.mark())``.
    """

    def __init__(self, server: Any, idp: LocalIdP, **client_kwargs: Any) -> None:
        from django.test import Client

        self.server = server
        self.idp = idp
        self.django_client = Client(**client_kwargs)
        self.statements: list[RoundTrip] = []
        self._bearer: str | None = None

    def sign_in(self, user: str, *, via: str = "cookie", token: str | None = None) -> str:
        """Send ``user``'s identity with every following request; returns the token."""
        from deepsec.django.conf import get_settings

        if via not in ("cookie", "bearer"):
            raise ValueError("via must be 'cookie' or 'bearer'")
        self.sign_out()
        token = token or self.idp.issue_user_token(user, preferred_username=user, upn=user)
        if via == "bearer":
            self._bearer = token
        else:
            cookie_name = get_settings().cookie_name
            if cookie_name is None:
                raise ValueError("DEEPSEC['cookie_name'] is None: sign in with via='bearer'")
            # A JSON string is a token in every form the cookie accepts.
            self.django_client.cookies[cookie_name] = json.dumps(token)
        return token

    def sign_out(self) -> None:
        """Send no identity from now on (other cookies, e.g. a ``force_login`` session, stay)."""
        from deepsec.django.conf import get_settings

        self._bearer = None
        cookie_name = get_settings().cookie_name
        if cookie_name is not None:
            self.django_client.cookies.pop(cookie_name, None)

    def statements_containing(self, text: str) -> list[RoundTrip]:
        """The last request's statements whose SQL contains ``text`` (plain substring)."""
        return [t for t in self.statements if t.sql is not None and text in t.sql]

    def statements_tagged(self, tag: str) -> list[RoundTrip]:
        """The last request's statements with ``tag`` in an SQL comment, wherever it sits.

        Uses :func:`deepsec.testing.oracle.statement_has_tag`, so ``/* t1 */`` is
        found also at the end of a statement that Django's Oracle backend rewrote.
        """
        return [t for t in self.statements if statement_has_tag(t.sql, tag)]

    def usernames(self) -> list[str | None]:
        """The end user each statement of the last request ran as (``None``: no end user)."""
        return [t.context.username if t.context is not None else None for t in self.statements]

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """Send one request (``get``/``post``... call this) and record its statements."""
        if self._bearer is not None:
            headers = dict(kwargs.pop("headers", None) or {})
            headers.setdefault("Authorization", f"Bearer {self._bearer}")
            kwargs["headers"] = headers
        mark = self.server.mark()
        try:
            response = getattr(self.django_client, method)(path, *args, **kwargs)
        finally:
            self.statements = self.server.statements(since=mark)
        return response

    def get(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """``GET path`` (Django test client arguments)."""
        return self.request("get", path, *args, **kwargs)

    def post(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """``POST path`` (Django test client arguments)."""
        return self.request("post", path, *args, **kwargs)

    def put(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """``PUT path`` (Django test client arguments)."""
        return self.request("put", path, *args, **kwargs)

    def patch(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """``PATCH path`` (Django test client arguments)."""
        return self.request("patch", path, *args, **kwargs)

    def delete(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """``DELETE path`` (Django test client arguments)."""
        return self.request("delete", path, *args, **kwargs)


def point_databases_at(
    server: Any, end_user_sec_params: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Point every Oracle database of the Django settings at ``server``.

    Changes the settings dicts in place (as Django's own test runner does,
    so existing connection wrappers see them) after closing their
    connections; returns what to give :func:`restore_databases`.
    """
    from django.conf import settings
    from django.db import connections

    saved: dict[str, dict[str, Any]] = {}
    for alias, db in settings.DATABASES.items():
        if db.get("ENGINE") != ORACLE_ENGINE:
            continue
        connections[alias].close()
        saved[alias] = dict(db)
        options = dict(db.get("OPTIONS") or {})
        options["ssl_context"] = server.client_ssl_context()
        extra = dict(options.get("extra_auth_params") or {})
        extra["end_user_sec_params"] = dict(end_user_sec_params)
        options["extra_auth_params"] = extra
        db.update(
            NAME=server.dsn,
            HOST="",
            PORT="",
            USER=server.user,
            PASSWORD=server.password,
            OPTIONS=options,
        )
    return saved


def restore_databases(saved: dict[str, dict[str, Any]]) -> None:
    """Undo :func:`point_databases_at` (connections closed first)."""
    from django.conf import settings
    from django.db import connections

    for alias, original in saved.items():
        connections[alias].close()
        db = settings.DATABASES[alias]
        db.clear()
        db.update(original)


@pytest.fixture(scope="session")
def deepsec_end_user_sec_params(local_idp: LocalIdP) -> dict[str, Any]:
    """``end_user_sec_params`` for the tests: client credentials from the local IdP."""
    return local_idp.azure_params("client_credentials")


def _aliases_to_set_up(
    request: pytest.FixtureRequest, oracle_aliases: set[str]
) -> tuple[set[str], set[str]]:
    """The non-Oracle aliases (and serialized ones) the session's tests use, as pytest-django
    computes them; every non-Oracle alias if its helper is not there."""
    from django.db import connections

    try:
        from pytest_django.fixtures import _get_databases_for_setup

        aliases, serialized = _get_databases_for_setup(request.session.items)
    except ImportError:  # pytest-django moved its private helper: set up every alias
        aliases, serialized = set(connections), set()
    return set(aliases) - oracle_aliases, set(serialized) - oracle_aliases


def _set_up_others(
    verbosity: int, aliases: set[str], serialized: set[str], oracle: set[str], keepdb: bool
) -> Any:
    """pytest-django's test databases for the non-Oracle ``aliases`` (``None``: none).

    Django orders test databases after their ``TEST["DEPENDENCIES"]``
    (``["default"]`` unless set); an Oracle alias gets no test database, so it
    is left out of them for the setup, else Django reports a circular dependency.
    """
    from django.db import connections
    from django.test.utils import setup_databases

    if not aliases:
        return None
    missing = object()
    saved: dict[str, object] = {}
    for alias in aliases:
        test = connections[alias].settings_dict.setdefault("TEST", {})
        saved[alias] = test.get("DEPENDENCIES", missing)
        test["DEPENDENCIES"] = [d for d in test.get("DEPENDENCIES", ["default"]) if d not in oracle]
    try:
        return setup_databases(
            verbosity=verbosity,
            interactive=False,
            aliases=aliases,
            serialized_aliases=serialized,
            keepdb=keepdb,
        )
    finally:
        for alias, value in saved.items():
            test = connections[alias].settings_dict["TEST"]
            if value is missing:
                del test["DEPENDENCIES"]
            else:
                test["DEPENDENCIES"] = value


@pytest.fixture(scope="session")
def django_db_setup(
    request: pytest.FixtureRequest,
    django_test_environment: None,
    django_db_blocker: Any,
    django_db_keepdb: bool,
    django_db_createdb: bool,
    django_db_modify_db_settings: None,
    oracle_server: Any,
    deepsec_end_user_sec_params: dict[str, Any],
) -> Iterator[None]:
    """Oracle databases on the wire test server; the others get pytest-django's test databases.

    No Oracle test database is created (the wire server has no DDL).  Every
    other alias (SQLite, PostgreSQL...) is set up exactly as pytest-django
    would, so a ``db`` test never writes to a real non-Oracle database.
    """
    from django.test.utils import teardown_databases

    from .pytest_plugin import reset_token_state

    verbosity = request.config.option.verbose
    keepdb = django_db_keepdb and not django_db_createdb
    with django_db_blocker.unblock():
        saved = point_databases_at(oracle_server, deepsec_end_user_sec_params)
        aliases, serialized = _aliases_to_set_up(request, set(saved))
        created = _set_up_others(verbosity, aliases, serialized, set(saved), keepdb)
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            if created is not None and not django_db_keepdb:
                teardown_databases(created, verbosity=verbosity)
            restore_databases(saved)
        reset_token_state()


@pytest.fixture
def deepsec_client(db: None, oracle_server: Any, local_idp: LocalIdP) -> DeepSecClient:
    """A :class:`DeepSecClient` (no identity until ``sign_in``), database access allowed."""
    return DeepSecClient(oracle_server, local_idp)
