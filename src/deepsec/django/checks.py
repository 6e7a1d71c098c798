"""System checks for deepsec's Django integration (``manage.py check``).

| id | problem |
|---|---|
| E001 | ``EndUserSecMiddleware`` is not in ``MIDDLEWARE``. |
| E002 | ``EndUserSecMiddleware`` comes before ``AuthenticationMiddleware``. |
| E003 | the resolver uses ``request.user`` but ``AuthenticationMiddleware`` is missing. |
| E004 | ``DEEPSEC`` is invalid (one message per problem). |
| E005 | a database's ``end_user_sec_params`` are invalid. |
| E006 | a database with ``end_user_sec_params`` does not use ``django.db.backends.oracle``. |
| E007 | ``OPTIONS["extra_auth_params"]`` is not a dict. |
| E008 | a database with ``end_user_sec_params`` does not connect over TCPS. |
| E009 | ``deepsec.django`` is not in ``INSTALLED_APPS`` (doctor only, see below). |
| W001 | no database has ``OPTIONS["extra_auth_params"]["end_user_sec_params"]``. |
| W002 | the protocol of a database's ``NAME`` cannot be determined here (alias, provider URL). |

Django runs no check of an app that is not installed, so E009 comes from
``python -m deepsec doctor``; at run time the middleware refuses to start
without the app (``ImproperlyConfigured``).

Each check is a pure function of the setting values (``*_messages``), so
``python -m deepsec doctor --settings`` runs the very same checks on a settings
module, also when ``deepsec.django`` is missing from ``INSTALLED_APPS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning
from django.core.checks import register as _register_check

from ..config import parse_end_user_sec_params
from ..dsn import dsn_tcps_problem, protocols_problem
from ..errors import ConfigError
from . import APP_NAME, MIDDLEWARE_PATH
from .resolvers import django_user

__all__ = [
    "AUTH_MIDDLEWARE",
    "ORACLE_ENGINE",
    "all_messages",
    "check_databases",
    "check_middleware",
    "check_settings",
    "database_messages",
    "installed_app_messages",
    "middleware_messages",
    "register",
    "settings_messages",
]

AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
ORACLE_ENGINE = "django.db.backends.oracle"
_TAG = "deepsec"


def _names(value: object) -> list[str]:
    return [str(m) for m in value] if isinstance(value, (list, tuple)) else []


def _resolver_uses_user(raw: object) -> bool:
    if not isinstance(raw, Mapping):
        return False
    for key, value in raw.items():
        if str(key).lower() == "resolver":
            return bool(
                value is django_user
                or value == "deepsec.django.resolvers.django_user"
                or getattr(value, "uses_request_user", False)
            )
    return False


def middleware_messages(middleware: object, deepsec: object = None) -> list[CheckMessage]:
    """E001-E003 for a ``MIDDLEWARE`` list (and ``DEEPSEC``, for its resolver)."""
    names = _names(middleware)
    if MIDDLEWARE_PATH not in names:
        return [
            Error(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE, so no request runs as its end user.",
                hint=f"Add '{MIDDLEWARE_PATH}' to MIDDLEWARE, after '{AUTH_MIDDLEWARE}'.",
                id="deepsec.E001",
            )
        ]
    messages: list[CheckMessage] = []
    ours = names.index(MIDDLEWARE_PATH)
    if AUTH_MIDDLEWARE in names:
        if names.index(AUTH_MIDDLEWARE) > ours:
            messages.append(
                Error(
                    f"{MIDDLEWARE_PATH} comes before {AUTH_MIDDLEWARE}; request.user is not "
                    "set yet when the end user is resolved.",
                    hint=f"Move '{MIDDLEWARE_PATH}' below '{AUTH_MIDDLEWARE}' in MIDDLEWARE.",
                    id="deepsec.E002",
                )
            )
    elif _resolver_uses_user(deepsec):
        messages.append(
            Error(
                "DEEPSEC['resolver'] uses request.user but AuthenticationMiddleware is not "
                "installed, so every request would run without an end user.",
                hint=f"Add '{AUTH_MIDDLEWARE}' to MIDDLEWARE before '{MIDDLEWARE_PATH}'.",
                id="deepsec.E003",
            )
        )
    return messages


def settings_messages(deepsec: object) -> list[CheckMessage]:
    """E004, one message per problem of ``DEEPSEC`` (:func:`deepsec.django.conf.parse_settings`)."""
    from .conf import parse_settings

    try:
        parse_settings(deepsec)
    except ConfigError as exc:
        problems = exc.problems
    else:
        return []
    return [
        Error(
            f"settings.DEEPSEC is invalid: {problem}",
            hint="Use the keys documented in deepsec.django.conf (case-insensitive); "
            "resolver, data_roles and attributes take a callable or a dotted path.",
            id="deepsec.E004",
        )
        for problem in problems
    ]


def _tcps_message(alias: object, db: Mapping[str, Any], options: Any) -> CheckMessage | None:
    options = options if isinstance(options, Mapping) else {}
    if db.get("PORT"):
        # Django then builds the DSN with makedsn(): always a plain TCP address.
        problem = protocols_problem(["tcp"], use_eztls=options.get("use_eztls") is True)
        if problem is None:
            return None
        return Error(
            f"DATABASES[{alias!r}] has end_user_sec_params but HOST/PORT make Django "
            f"connect over plain TCP: {problem}.",
            hint="Leave HOST and PORT empty and put a TCPS connect string in NAME, "
            "e.g. 'tcps://db.example.com:1522/service' (or set OPTIONS['use_eztls']=True).",
            id="deepsec.E008",
        )
    name = db.get("NAME")
    if not isinstance(name, str) or not name:
        return None
    found = dsn_tcps_problem(name, options, what=f"DATABASES[{alias!r}]['NAME']")
    if found is None:
        return None
    if not found.certain:
        return Warning(
            f"{found.message}.",
            hint="Make sure the alias or provider resolves to (PROTOCOL=TCPS) addresses, "
            "or write NAME as 'tcps://host:port/service'.",
            id="deepsec.W002",
        )
    return Error(
        f"DATABASES[{alias!r}] has end_user_sec_params but NAME: {found.message}.",
        hint="Write NAME as 'tcps://host:port/service' (HOST and PORT empty), or set "
        "(PROTOCOL=TCPS) in the descriptor.",
        id="deepsec.E008",
    )


def database_messages(databases: object) -> list[CheckMessage]:
    """E005-E008, W001 for a ``DATABASES`` dict."""
    messages: list[CheckMessage] = []
    configured = 0
    for alias, db in databases.items() if isinstance(databases, Mapping) else ():
        if not isinstance(db, Mapping):
            continue
        options = db.get("OPTIONS") or {}
        extra = options.get("extra_auth_params") if isinstance(options, Mapping) else None
        if extra is None:
            continue
        if not isinstance(extra, Mapping):
            messages.append(
                Error(
                    f"DATABASES[{alias!r}]['OPTIONS']['extra_auth_params'] must be a dict, "
                    f"not {type(extra).__name__}.",
                    hint="Write extra_auth_params={'end_user_sec_params': {...}}.",
                    id="deepsec.E007",
                )
            )
            continue
        params = extra.get("end_user_sec_params")
        if params is None:
            continue
        configured += 1
        engine = db.get("ENGINE")
        if engine != ORACLE_ENGINE:
            messages.append(
                Error(
                    f"DATABASES[{alias!r}] has end_user_sec_params but ENGINE is {engine!r}; "
                    "only python-oracledb connections carry an end-user security context.",
                    hint=f"Use ENGINE '{ORACLE_ENGINE}' (python-oracledb in Thin mode; "
                    "deepsec refuses Thick mode).",
                    id="deepsec.E006",
                )
            )
        else:
            tcps = _tcps_message(alias, db, options)
            if tcps is not None:
                messages.append(tcps)
        try:
            parse_end_user_sec_params(params)
        except ConfigError as exc:
            messages.append(
                Error(
                    f"DATABASES[{alias!r}] end_user_sec_params are invalid: "
                    + "; ".join(exc.problems),
                    hint="See the end_user_sec_params keys in the deepsec documentation "
                    "(spi_type, auth_flow, authority, client_id, client_credential, scopes...).",
                    id="deepsec.E005",
                )
            )
    if configured == 0:
        messages.append(
            Warning(
                "no database in DATABASES has OPTIONS['extra_auth_params']"
                "['end_user_sec_params'], so no statement carries an end-user context.",
                hint="Add extra_auth_params={'end_user_sec_params': {...}} to the OPTIONS of "
                "the Oracle database that should enforce Deep Data Security.",
                id="deepsec.W001",
            )
        )
    return messages


def installed_app_messages(installed_apps: object) -> list[CheckMessage]:
    """E009: ``deepsec.django`` must be installed for the hook and these checks."""
    apps = _names(installed_apps)
    if APP_NAME in apps or any(a.startswith(f"{APP_NAME}.apps.") for a in apps):
        return []
    return [
        Error(
            f"'{APP_NAME}' is not in INSTALLED_APPS, so the python-oracledb hook is not "
            "installed (statements carry no end user) and manage.py check runs none of "
            "deepsec's checks.",
            hint=f"Add '{APP_NAME}' to INSTALLED_APPS.",
            id="deepsec.E009",
        )
    ]


def all_messages(
    *, installed_apps: object, middleware: object, deepsec: object, databases: object
) -> list[CheckMessage]:
    """Every deepsec check on these setting values (what the doctor runs)."""
    return [
        *installed_app_messages(installed_apps),
        *middleware_messages(middleware, deepsec),
        *settings_messages(deepsec),
        *database_messages(databases),
    ]


def check_middleware(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E001-E003: the middleware is installed, after authentication."""
    return middleware_messages(
        getattr(settings, "MIDDLEWARE", None) or [], getattr(settings, "DEEPSEC", None)
    )


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E004: ``DEEPSEC`` parses into valid adapter settings."""
    return settings_messages(getattr(settings, "DEEPSEC", None))


def check_databases(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E005-E008, W001: each database's ``end_user_sec_params``."""
    return database_messages(getattr(settings, "DATABASES", None) or {})


def register() -> None:
    """Register the checks (idempotent; ``DeepSecConfig.ready`` calls it)."""
    for check in (check_middleware, check_settings, check_databases):
        _register_check(check, _TAG, Tags.security)
