"""Which apps use deepsec.celery, and with what key, strictness and maximum header age."""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .signing import MIN_KEY_BYTES, derive_key

__all__ = [
    "DEFAULT_MAX_AGE",
    "Settings",
    "installed",
    "is_end_user_task",
    "known_apps",
    "only_settings",
    "resolve",
    "settings_for_app",
    "settings_for_task",
]

#: Default maximum age of an end-user header, in seconds, from publish to
#: task start (queue wait, ``countdown``/``eta``).  Bounds how long a copied
#: message can be replayed.
DEFAULT_MAX_AGE = 6 * 3600.0


@dataclass(frozen=True)
class Settings:
    """An app's resolved deepsec.celery settings (the key never shows in ``repr``)."""

    key: bytes = field(repr=False)
    strict: bool
    max_age: float


# Apps set up with install(); and apps whose EndUserTask tasks read their
# settings from the app's configuration (resolved once per app).
installed: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()
_from_conf: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()


def is_end_user_task(task: object) -> bool:
    """True for an instance of ``EndUserTask`` (a class marker: no import cycle)."""
    return bool(getattr(task, "_deepsec_end_user_task", False))


def _django_secret_key() -> str | bytes | None:
    """Django's ``SECRET_KEY`` when Django is configured in this process, else ``None``."""
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return None
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    try:
        key = getattr(settings, "SECRET_KEY", None)
    except ImproperlyConfigured:
        return None
    return key if isinstance(key, (str, bytes)) and key else None


def _max_age(app: Any, max_age: float | None) -> float:
    name, value = "max_age", max_age
    if value is None:
        name, value = "deepsec_max_age", app.conf.get("deepsec_max_age")
    if value is None:
        return DEFAULT_MAX_AGE
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds", where="deepsec.celery")
    return float(value)


def resolve(
    app: Any, signing_key: str | bytes | None, strict: bool, max_age: float | None = None
) -> Settings:
    """Resolve the signing key: explicit, else ``deepsec_signing_key``, else Django's."""
    candidates = (
        ("signing_key", signing_key),
        ("deepsec_signing_key", app.conf.get("deepsec_signing_key")),
        ("Django SECRET_KEY", _django_secret_key()),
    )
    for name, value in candidates:
        if value is None:
            continue
        if not isinstance(value, (str, bytes)):
            raise ConfigError(
                f"{name} must be a str or bytes, not {type(value).__name__}", where="deepsec.celery"
            )
        size = len(value.encode("utf-8") if isinstance(value, str) else value)
        if size < MIN_KEY_BYTES:
            # The length only: the value is a secret.
            raise ConfigError(
                f"{name} is {size} bytes long; use a random key of at least "
                f"{MIN_KEY_BYTES} bytes (32 or more recommended)",
                where="deepsec.celery",
            )
        return Settings(derive_key(value), strict, _max_age(app, max_age))
    raise ConfigError(
        "no signing key for end-user headers: pass install(app, signing_key=...), set "
        "the app's deepsec_signing_key setting, or configure Django (its SECRET_KEY is used)",
        where="deepsec.celery",
    )


def settings_for_app(app: Any) -> Settings:
    """The app's settings: from ``install()``, else from its configuration (cached)."""
    found = installed.get(app) or _from_conf.get(app)
    if found is None:
        found = resolve(app, None, bool(app.conf.get("deepsec_strict", False)))
        _from_conf[app] = found
    return found


def settings_for_task(task: Any) -> Settings | None:
    """The settings a task runs under: its app's if installed, or as an ``EndUserTask``."""
    app = task.app
    if app in installed:
        return installed[app]
    if is_end_user_task(task):
        return settings_for_app(app)
    return None


def known_apps() -> list[Any]:
    """Apps set up with ``install()`` or used by an ``EndUserTask``."""
    return [*list(installed.keys()), *list(_from_conf.keys())]


def only_settings() -> Settings | None:
    """The settings every known app shares, if there is exactly one such set."""
    distinct = {(s.key, s.strict, s.max_age): s for s in installed.values()}
    return next(iter(distinct.values())) if len(distinct) == 1 else None
