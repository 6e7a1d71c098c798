"""The doctor's Django part: import a settings module, set Django up, run deepsec's checks.

A settings module that fails to import (or ``django.setup()`` that fails) is
reported by the exception's class and the file and line where it happened,
never by its message: a message may quote a value the settings read from
the environment (``int(os.environ.get("PORT", "hunter2"))`` puts ``hunter2``
in a ``ValueError``).  ``KeyError`` and ``ModuleNotFoundError`` keep the
key or module name, which is the cause to fix.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from .report import (
    EXIT_CONFIG,
    EXIT_OK,
    SECRET_PARAM_KEYS,
    Out,
    Target,
    UsageError,
    web_settings_lines,
)

__all__ = [
    "add_settings_secrets",
    "django_check_lines",
    "error_cause",
    "import_settings",
    "targets_from_settings",
]


def _location(frames: traceback.StackSummary, settings_file: str | None) -> str:
    """`` (at FILE, line N)``: the settings file's frame, else the innermost real one."""
    chosen = None
    if settings_file:
        wanted = os.path.normcase(os.path.abspath(settings_file))
        chosen = next(
            (
                f
                for f in reversed(frames)
                if os.path.normcase(os.path.abspath(f.filename)) == wanted
            ),
            None,
        )
    if chosen is None:
        # Skip the import machinery (importlib's own __init__.py and bootstrap).
        chosen = next(
            (
                f
                for f in reversed(frames)
                if not f.filename.startswith("<")
                and os.path.basename(os.path.dirname(f.filename)) != "importlib"
            ),
            None,
        )
    if chosen is None:
        return ""
    parent = os.path.basename(os.path.dirname(chosen.filename))
    name = os.path.basename(chosen.filename)
    shown = name if chosen.filename == settings_file or not parent else f"{parent}/{name}"
    return f" (at {shown}, line {chosen.lineno})"


def error_cause(exc: BaseException, settings_file: str | None) -> str:
    """Why importing settings (or ``django.setup()``) failed, without the exception's text."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = _location(frames, settings_file)
    name = exc.__class__.__name__
    if isinstance(exc, KeyError) and exc.args:
        key = exc.args[0]
        # os.environ[...] raised it: the innermost frame is os.py ("<frozen os>" on 3.11+).
        if frames and frames[-1].filename.replace("<frozen os>", "os.py").endswith("os.py"):
            return (
                f"KeyError {key!r}{where}: the environment variable {key} is not set; set it "
                f"(export {key}=...) or read it with os.environ.get() and a default"
            )
        return f"KeyError {key!r}{where}: the settings read a key that is missing"
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"ModuleNotFoundError{where}: no module named {exc.name!r}; install the package "
            "that provides it (pip install ...), or, if it is part of your project, run from "
            "the project directory (the one holding manage.py) or add it to PYTHONPATH"
        )
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) or exc.code is None else "with a message"
        return f"SystemExit{where}: the settings module called sys.exit() ({code})"
    return (
        f"{name}{where}; its message is not shown, as it may hold a value the settings "
        "read (import the module yourself to see it)"
    )


def _settings_file(module_name: str, frames: traceback.StackSummary) -> str | None:
    """The settings module's file, found among the frames by its dotted name."""
    path = module_name.replace(".", os.sep)
    for frame in frames:
        stem = os.path.splitext(os.path.normcase(frame.filename))[0]
        if stem.endswith(os.sep + path) or stem.endswith(os.path.join(path, "__init__")):
            return frame.filename
    return None


def import_settings(module_name: str) -> Any:
    """Import a settings module from the working directory (as ``manage.py`` would).

    Raises:
        UsageError: the module cannot be imported (its cause, never a value).
    """
    import importlib

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # SystemExit: a settings module may call sys.exit()
        frames = traceback.extract_tb(exc.__traceback__)
        cause = error_cause(exc, _settings_file(module_name, frames))
        raise UsageError(f"cannot import settings module {module_name!r}: {cause}") from None


def targets_from_settings(module: Any, module_name: str, database: str | None) -> list[Target]:
    """One :class:`Target` per database with ``end_user_sec_params`` (or the one named)."""
    databases = getattr(module, "DATABASES", None)
    if not isinstance(databases, Mapping):
        raise UsageError(f"{module_name} has no DATABASES dict")
    if database is not None and database not in databases:
        raise UsageError(f"{module_name}.DATABASES has no alias {database!r}")
    targets = []
    for alias, db in databases.items():
        if database is not None and alias != database:
            continue
        options = db.get("OPTIONS", {}) if isinstance(db, Mapping) else {}
        extra = options.get("extra_auth_params") if isinstance(options, Mapping) else None
        if not isinstance(extra, Mapping) or extra.get("end_user_sec_params") is None:
            if database is not None:
                raise UsageError(
                    f"DATABASES[{alias!r}]['OPTIONS'] has no "
                    "extra_auth_params['end_user_sec_params']"
                )
            continue
        # ENGINE, DSN and DEEPSEC problems are the system checks' job (reported once).
        targets.append(Target(f"DATABASES[{alias!r}]", extra["end_user_sec_params"]))
    if not targets:
        raise UsageError(
            f"no database in {module_name}.DATABASES has "
            "OPTIONS['extra_auth_params']['end_user_sec_params']"
        )
    return targets


def _setup_django(module: Any, module_name: str) -> str | None:
    """Set Django up from ``module`` unless something already did; a problem or None.

    Dotted paths in ``DEEPSEC`` may import models, which needs the app
    registry.  No database is touched: the deepsec checks read settings only.
    """
    import django
    from django.conf import settings

    if settings.configured:
        return None
    os.environ["DJANGO_SETTINGS_MODULE"] = module_name
    try:
        django.setup()
    except (Exception, SystemExit) as exc:  # an installed app's code may raise anything
        return f"django.setup() failed: {error_cause(exc, getattr(module, '__file__', None))}"
    return None


def django_check_lines(module: Any, module_name: str, out: Out) -> int:
    """Run deepsec's Django system checks on a settings module (E001-E009, W001-W002).

    The checks run as plain functions of the module's values, so they run
    also when ``deepsec.django`` is missing from ``INSTALLED_APPS`` (then
    ``manage.py check`` would run none of them).  A failing ``django.setup()``
    (an app in ``INSTALLED_APPS`` that cannot be imported) is an error too:
    ``manage.py`` would fail the same way.
    """
    out(f"Django system checks (deepsec) on {module_name}:")
    try:
        import django  # noqa: F401
    except ImportError:
        out("  skipped: Django is not installed")
        return EXIT_OK
    code = EXIT_OK
    problem = _setup_django(module, module_name)
    if problem is not None:
        code = EXIT_CONFIG
        out(f"  ERROR: {problem}")
        out(
            "      fix: make every entry of INSTALLED_APPS importable; `python manage.py "
            "check` shows Django's own message"
        )
    from ..django.checks import all_messages

    deepsec_setting = getattr(module, "DEEPSEC", None)
    messages = all_messages(
        installed_apps=getattr(module, "INSTALLED_APPS", None),
        middleware=getattr(module, "MIDDLEWARE", None),
        deepsec=deepsec_setting,
        databases=getattr(module, "DATABASES", None),
    )
    for message in messages:
        level = "ERROR" if message.is_serious() else "WARNING"
        if message.is_serious():
            code = EXIT_CONFIG
        out(f"  {message.id} {level}: {message.msg}")
        if message.hint:
            out(f"      fix: {message.hint}")
    if not messages and problem is None:
        out("  OK: INSTALLED_APPS, MIDDLEWARE, DEEPSEC and DATABASES")
    if isinstance(deepsec_setting, Mapping) and not any(m.id == "deepsec.E004" for m in messages):
        web_settings_lines(deepsec_setting, out)
    return code


def add_settings_secrets(module: Any, out: Out) -> None:
    """Scrub database passwords and client secrets of a settings module from the report."""
    databases = getattr(module, "DATABASES", None)
    for db in databases.values() if isinstance(databases, Mapping) else ():
        if not isinstance(db, Mapping):
            continue
        out.add_secret(db.get("PASSWORD"))
        options = db.get("OPTIONS")
        extra = options.get("extra_auth_params") if isinstance(options, Mapping) else None
        params = extra.get("end_user_sec_params") if isinstance(extra, Mapping) else None
        if isinstance(params, Mapping):
            for key in SECRET_PARAM_KEYS:
                out.add_secret(params.get(key))
