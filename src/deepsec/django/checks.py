"""System checks for deepsec's Django integration (``manage.py check``).

======== ===========================================================================
id       problem
======== ===========================================================================
E001     ``EndUserSecMiddleware`` is not in ``MIDDLEWARE``.
E002     ``EndUserSecMiddleware`` comes before ``AuthenticationMiddleware``.
E003     the resolver uses ``request.user`` but ``AuthenticationMiddleware`` is missing.
E004     ``DEEPSEC`` is invalid (unknown keys, bad values, unimportable paths).
E005     a database's ``end_user_sec_params`` are invalid.
E006     a database with ``end_user_sec_params`` does not use ``django.db.backends.oracle``.
E007     ``OPTIONS["extra_auth_params"]`` is not a dict.
W001     no database has ``OPTIONS["extra_auth_params"]["end_user_sec_params"]``.
======== ===========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning
from django.core.checks import register as _register_check

from ..config import parse_end_user_sec_params
from ..errors import ConfigError
from . import MIDDLEWARE_PATH
from .conf import parse_settings
from .resolvers import django_user

__all__ = [
    "AUTH_MIDDLEWARE",
    "ORACLE_ENGINE",
    "check_databases",
    "check_middleware",
    "check_settings",
    "register",
]

AUTH_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
ORACLE_ENGINE = "django.db.backends.oracle"
_TAG = "deepsec"


def _middleware() -> list[str]:
    value = getattr(settings, "MIDDLEWARE", None) or []
    return [str(m) for m in value]


def _resolver_uses_user() -> bool:
    raw = getattr(settings, "DEEPSEC", None)
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


def check_middleware(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E001-E003: the middleware is installed, after authentication."""
    middleware = _middleware()
    if MIDDLEWARE_PATH not in middleware:
        return [
            Error(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE, so no request runs as its end user.",
                hint=f"Add '{MIDDLEWARE_PATH}' to MIDDLEWARE, after {AUTH_MIDDLEWARE}.",
                id="deepsec.E001",
            )
        ]
    messages: list[CheckMessage] = []
    ours = middleware.index(MIDDLEWARE_PATH)
    if AUTH_MIDDLEWARE in middleware:
        if middleware.index(AUTH_MIDDLEWARE) > ours:
            messages.append(
                Error(
                    f"{MIDDLEWARE_PATH} comes before {AUTH_MIDDLEWARE}; request.user is not "
                    "set yet when the end user is resolved.",
                    hint=f"Move '{MIDDLEWARE_PATH}' below '{AUTH_MIDDLEWARE}' in MIDDLEWARE.",
                    id="deepsec.E002",
                )
            )
    elif _resolver_uses_user():
        messages.append(
            Error(
                "DEEPSEC['resolver'] uses request.user but AuthenticationMiddleware is not "
                "installed, so every request would run without an end user.",
                hint=f"Add '{AUTH_MIDDLEWARE}' to MIDDLEWARE before '{MIDDLEWARE_PATH}'.",
                id="deepsec.E003",
            )
        )
    return messages


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E004: ``DEEPSEC`` parses into valid adapter settings."""
    try:
        parse_settings(getattr(settings, "DEEPSEC", None))
    except ConfigError as exc:
        return [
            Error(
                f"settings.DEEPSEC is invalid: {'; '.join(exc.problems)}",
                hint="Use the keys documented in deepsec.django.conf (case-insensitive); "
                "resolver, data_roles and attributes take a callable or a dotted path.",
                id="deepsec.E004",
            )
        ]
    return []


def check_databases(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E005-E007, W001: each database's ``end_user_sec_params``."""
    messages: list[CheckMessage] = []
    databases = getattr(settings, "DATABASES", None) or {}
    configured = 0
    for alias, db in databases.items():
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
                    hint=f"Use ENGINE '{ORACLE_ENGINE}' (python-oracledb, thin or thick mode).",
                    id="deepsec.E006",
                )
            )
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


def register() -> None:
    """Register the checks (idempotent; ``DeepSecConfig.ready`` calls it)."""
    for check in (check_middleware, check_settings, check_databases):
        _register_check(check, _TAG, Tags.security)
