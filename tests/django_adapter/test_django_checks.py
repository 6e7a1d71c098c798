"""System checks and the DEEPSEC setting of deepsec.django."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.core import checks
from django.test import override_settings

from deepsec.django import MIDDLEWARE_PATH
from deepsec.django.checks import AUTH_MIDDLEWARE, check_databases
from deepsec.django.conf import get_settings, parse_settings
from deepsec.django.resolvers import django_user
from deepsec.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return sorted(m.id for m in checks.run_checks(tags=["deepsec"]))


@contextmanager
def patched_databases(databases: dict[str, Any]) -> Iterator[None]:
    """Swap settings.DATABASES for the checks only (connections are not touched)."""
    saved = settings.DATABASES
    settings.DATABASES = databases
    try:
        yield
    finally:
        settings.DATABASES = saved


def databases_with(**changes: Any) -> dict[str, Any]:
    dbs = {alias: dict(db) for alias, db in settings.DATABASES.items()}
    db = dict(dbs["default"])
    db["OPTIONS"] = dict(db["OPTIONS"])
    for key, value in changes.items():
        if key == "OPTIONS":
            db["OPTIONS"].update(value)
        else:
            db[key] = value
    return {"default": db}


def test_app_is_installed_and_hook_registered() -> None:
    import deepsec

    assert apps.get_app_config("deepsec").name == "deepsec.django"
    assert deepsec.installed()


def test_project_passes_every_check(django_oracle: Any) -> None:
    assert ids() == []


def test_e001_middleware_missing() -> None:
    assert "deepsec.E001" not in ids()
    with override_settings(MIDDLEWARE=[]):
        (message,) = [m for m in checks.run_checks(tags=["deepsec"]) if m.id == "deepsec.E001"]
    assert message.level == checks.ERROR
    assert MIDDLEWARE_PATH in message.hint


def test_e002_before_authentication_middleware() -> None:
    wrong = [MIDDLEWARE_PATH, AUTH_MIDDLEWARE]
    assert "deepsec.E002" in ids(MIDDLEWARE=wrong)
    assert ids(MIDDLEWARE=list(reversed(wrong))) == []


@pytest.mark.parametrize("resolver", [django_user, "deepsec.django.resolvers.django_user"])
def test_e003_user_resolver_without_authentication(resolver: Any) -> None:
    assert ids(DEEPSEC={"resolver": resolver}) == ["deepsec.E003"]
    assert ids(DEEPSEC={"Resolver": resolver}, MIDDLEWARE=[AUTH_MIDDLEWARE, MIDDLEWARE_PATH]) == []


@pytest.mark.parametrize(
    ("deepsec_setting", "fragment"),
    [
        ({"cookie": "x"}, "unknown setting(s): cookie"),
        ({"no_identity": "allow"}, "no_identity"),
        ({"max_size": 10}, "max_size"),
        ({"resolver": "no_such_module.resolver"}, "cannot import"),
        ({"resolver": 42}, "resolver must be a callable"),
        ("strict", "must be a dict"),
    ],
)
def test_e004_invalid_settings(deepsec_setting: Any, fragment: str) -> None:
    with override_settings(DEEPSEC=deepsec_setting):
        (message,) = checks.run_checks(tags=["deepsec"])
        with pytest.raises(ConfigError):
            get_settings()
    assert message.id == "deepsec.E004"
    assert fragment in message.msg
    assert message.hint


def test_e005_invalid_end_user_sec_params() -> None:
    params = {"spi_type": "azure_tokens", "client_secret": "s3cr3t-value", "auth_flow": "x"}
    dbs = databases_with(OPTIONS={"extra_auth_params": {"end_user_sec_params": params}})
    with patched_databases(dbs):
        messages = check_databases()
    (message,) = messages
    assert message.id == "deepsec.E005"
    assert "auth_flow" in message.msg and "missing required key" in message.msg
    assert "s3cr3t-value" not in message.msg + (message.hint or "")


def test_e006_engine_not_oracle() -> None:
    dbs = databases_with(ENGINE="django.db.backends.postgresql")
    with patched_databases(dbs):
        assert [m.id for m in check_databases()] == ["deepsec.E006"]


def test_e007_extra_auth_params_not_a_dict() -> None:
    dbs = databases_with(OPTIONS={"extra_auth_params": "nope"})
    with patched_databases(dbs):
        assert [m.id for m in check_databases()] == ["deepsec.E007", "deepsec.W001"]


def test_w001_no_database_configured() -> None:
    with patched_databases({"default": {"ENGINE": "django.db.backends.dummy"}}):
        (message,) = check_databases()
    assert message.id == "deepsec.W001"
    assert message.level == checks.WARNING
    assert message.hint


def test_every_message_has_a_hint() -> None:
    dbs = databases_with(
        ENGINE="django.db.backends.sqlite3",
        OPTIONS={"extra_auth_params": {"end_user_sec_params": {}}},
    )
    with override_settings(MIDDLEWARE=[MIDDLEWARE_PATH, AUTH_MIDDLEWARE], DEEPSEC={"x": 1}):
        messages = checks.run_checks(tags=["deepsec"])
    with patched_databases(dbs):
        messages += check_databases()
    assert {m.id for m in messages} >= {
        "deepsec.E002",
        "deepsec.E004",
        "deepsec.E005",
        "deepsec.E006",
    }
    assert all(m.hint for m in messages)


def test_settings_are_case_insensitive_and_cached() -> None:
    with override_settings(
        DEEPSEC={
            "COOKIE_NAME": "who",
            "Strict": True,
            "resolver": "django_project.views.data_roles",
        }
    ):
        parsed = get_settings()
        assert parsed is get_settings()
        assert parsed.cookie_name == "who" and parsed.strict is True
        assert callable(parsed.resolver)
    assert get_settings().cookie_name == "identity"  # rebuilt once the override ends


def test_parse_settings_defaults_and_callables() -> None:
    def attributes(request: Any) -> dict[str, Any]:
        return {}

    assert parse_settings(None) == parse_settings({})
    parsed = parse_settings({"attributes": attributes, "token_error_status": 502})
    assert parsed.attributes is attributes
    assert parsed.token_error_status == 502
    before = copy.deepcopy(settings.DEEPSEC)
    parse_settings({"resolver": "deepsec.django.resolvers.django_user"})
    assert before == settings.DEEPSEC


def test_django_user_resolver_unit() -> None:
    class Anon:
        is_authenticated = False

    class User:
        is_authenticated = True

        def get_username(self) -> str:
            return "zoe"

    class Req:
        user: Any = None

    req = Req()
    assert django_user(req) is None
    req.user = Anon()
    assert django_user(req) is None
    req.user = User()
    assert django_user(req) == ("zoe", None)


def test_e004_reports_every_problem_not_the_first() -> None:
    bad = {"colour": "blue", "no_identity": "maybe", "resolver": "no_such_module.f"}
    with override_settings(DEEPSEC=bad):
        messages = checks.run_checks(tags=["deepsec"])
    assert [m.id for m in messages] == ["deepsec.E004"] * 3
    text = " ".join(m.msg for m in messages)
    assert "unknown setting(s): colour" in text
    assert "no_identity must be 'least_privilege' or 'deny'" in text
    assert "resolver: cannot import 'no_such_module.f'" in text


@pytest.mark.parametrize(
    "changes",
    [
        {"NAME": "tcp://db.example.com:1521/hr"},
        {"NAME": "db.example.com:1521/hr"},
        {"NAME": "(DESCRIPTION=(ADDRESS=(PROTOCOL=TCP)(HOST=h)(PORT=1))(CONNECT_DATA=(SID=x)))"},
        {"NAME": "hr", "HOST": "db.example.com", "PORT": "1521"},
    ],
)
def test_e008_plain_tcp_with_end_user_params(changes: dict[str, str]) -> None:
    with patched_databases(databases_with(**changes)):
        (message,) = check_databases()
    assert message.id == "deepsec.E008"
    assert message.level == checks.ERROR
    assert "TCPS" in message.msg and "tcps://" in message.hint
    assert changes["NAME"] not in message.msg  # the connect string may hold a password


def test_e008_not_raised_for_tcps_or_eztls() -> None:
    for name in ("tcps://db.example.com:1522/hr", "app/pw-123@tcps://db.example.com:1522/hr"):
        with patched_databases(databases_with(NAME=name)):
            assert check_databases() == []
    dbs = databases_with(NAME="db.example.com:1522/hr", OPTIONS={"protocol": "tcps"})
    with patched_databases(dbs):
        assert check_databases() == []
    # ezTLS encrypts a TCP address: accepted from OPTIONS, with NAME or with HOST/PORT.
    for changes in (
        {"NAME": "tcp://db.example.com:1521/hr"},
        {"NAME": "hr", "HOST": "db.example.com", "PORT": "1521"},
    ):
        with patched_databases(databases_with(**changes, OPTIONS={"use_eztls": True})):
            assert check_databases() == [], changes


def test_e008_message_names_the_driver_error() -> None:
    with patched_databases(databases_with(NAME="tcp://db.example.com:1521/hr")):
        (message,) = check_databases()
    assert "DPY-2073" in message.msg and "requires use of the tcps protocol" in message.msg
    assert "DPY-4011" not in message.msg


def test_e008_with_credentials_in_name_never_echoes_them() -> None:
    with patched_databases(databases_with(NAME="app/pw-secret-77@tcp://db.example.com:1521/hr")):
        (message,) = check_databases()
    assert message.id == "deepsec.E008"
    assert "pw-secret-77" not in message.msg + (message.hint or "")


def test_use_eztls_in_the_connect_string_is_not_eztls() -> None:
    # python-oracledb ignores use_eztls inside a connect string: still plain TCP.
    with patched_databases(databases_with(NAME="tcp://db.example.com:1521/hr?use_eztls=true")):
        (message,) = check_databases()
    assert message.id == "deepsec.E008"
    assert "OPTIONS['use_eztls']" in message.msg


@pytest.mark.parametrize(
    "name",
    [
        "hr_high",  # a TNS alias without tnsnames.ora here
        "(DESCRIPTION=(ADDRESS=(PROTOCOL=ipc)(KEY=x))(CONNECT_DATA=(SERVICE_NAME=hr)))",
        "config-file:///nonexistent/app/pw-secret-88.json",
    ],
)
def test_w002_when_the_protocol_cannot_be_told(name: str) -> None:
    with patched_databases(databases_with(NAME=name)):
        (message,) = check_databases()
    assert message.id == "deepsec.W002" and message.level == checks.WARNING
    assert "cannot tell the protocol of DATABASES['default']['NAME']" in message.msg
    assert name not in message.msg and "pw-secret" not in message.msg


def test_e004_and_parse_settings_agree_on_a_raising_import() -> None:
    # A dotted path whose module raises (not ImportError) is one problem, for both.
    bad = {"resolver": "tests_raising_module_xyz.f", "colour": "blue"}
    import sys
    import types

    module = types.ModuleType("tests_raising_module_xyz")
    module.__getattr__ = lambda name: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[attr-defined]
    sys.modules["tests_raising_module_xyz"] = module
    try:
        with pytest.raises(ConfigError) as raised:
            parse_settings(bad)
        with override_settings(DEEPSEC=bad):
            messages = checks.run_checks(tags=["deepsec"])
    finally:
        del sys.modules["tests_raising_module_xyz"]
    assert len(raised.value.problems) == 2
    assert [m.msg for m in messages] == [
        f"settings.DEEPSEC is invalid: {p}" for p in raised.value.problems
    ]
    assert "resolver: cannot import 'tests_raising_module_xyz.f' (RuntimeError)" in (
        raised.value.problems
    )


def test_middleware_refuses_to_start_without_the_app() -> None:
    from django.core.exceptions import ImproperlyConfigured

    from deepsec.django.middleware import EndUserSecMiddleware

    without_app = override_settings(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"]
    )
    expected = re.escape("add 'deepsec.django' to INSTALLED_APPS")
    with without_app, pytest.raises(ImproperlyConfigured, match=expected):
        EndUserSecMiddleware(lambda request: None)
    assert EndUserSecMiddleware(lambda request: None) is not None
