"""The ``DEEPSEC`` Django setting, validated into :class:`deepsec.web.WebSettings`.

``DEEPSEC`` is an optional dict; its keys are the settings of every deepsec
adapter (case-insensitive), documented once in ``docs/settings.md``.

``resolver``, ``data_roles`` and ``attributes`` take the request; they may be
given as the callable itself or as a dotted import path
(``"deepsec.django.resolvers.django_user"``).  The parsed settings are
cached and rebuilt when the setting changes (``override_settings``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from ..errors import ConfigError
from ..web import WebSettings

__all__ = ["CALLABLE_KEYS", "SETTING_NAME", "get_settings", "parse_settings", "reset"]

#: The name of the Django setting.
SETTING_NAME = "DEEPSEC"
#: Keys whose value may be a dotted import path of a callable.
CALLABLE_KEYS = ("resolver", "data_roles", "attributes")
_WHERE = "settings.DEEPSEC"

_cache: WebSettings | None = None
_lock = threading.Lock()


def parse_settings(raw: object) -> WebSettings:
    """Validate a ``DEEPSEC`` value and return the adapter settings.

    Dotted paths in ``resolver``, ``data_roles`` and ``attributes`` are
    imported.  This is the one validation of ``DEEPSEC``: the middleware,
    ``manage.py check`` (E004) and ``python -m deepsec doctor`` all call it.

    Raises:
        ConfigError: listing every problem, not the first (unknown keys,
            paths that cannot be imported, bad values of the known keys).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"DEEPSEC must be a dict, not {type(raw).__name__}", where=_WHERE)
    known = WebSettings.field_names()
    values: dict[str, Any] = {}
    problems: list[str] = []
    unknown = sorted(str(key) for key in raw if str(key).lower() not in known)
    if unknown:
        problems.append(
            f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    for key, value in raw.items():
        name = str(key).lower()
        if name not in known:
            continue
        if name in CALLABLE_KEYS and isinstance(value, str):
            try:
                value = import_string(value)
            except Exception as exc:  # the imported module may raise anything
                # The class only: an import error's text may quote the module's source.
                problems.append(f"{name}: cannot import {value!r} ({exc.__class__.__name__})")
                continue
        values[name] = value
    try:
        settings = WebSettings(**values)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems, where=_WHERE)
    return settings


def get_settings() -> WebSettings:
    """The current, validated adapter settings (parsed once, then cached).

    Raises:
        ConfigError: ``DEEPSEC`` is invalid.
    """
    global _cache
    cached = _cache
    if cached is None:
        with _lock:
            cached = _cache
            if cached is None:
                cached = _cache = parse_settings(getattr(django_settings, SETTING_NAME, None))
    return cached


def reset() -> None:
    """Forget the cached settings; the next :func:`get_settings` parses them again."""
    global _cache
    with _lock:
        _cache = None


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="deepsec.django.conf")
