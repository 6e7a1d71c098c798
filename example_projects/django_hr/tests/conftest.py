"""Fixtures of the django_hr tests (run in their own pytest process: see scripts/test-all).

``client`` comes from ``example_projects/conftest.py``; ``hr_env`` here replaces
its module-scoped one, because Django can be set up only once a process.

Django settings are process-wide, so this suite configures ``django_hr.settings``
only when nothing else configured Django first, and skips with the reason
otherwise (the repository's own Django tests use another settings module).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from deepsec.demo import DemoEnvironment, ServedApp, serve_wsgi


@pytest.fixture(scope="session")
def hr_env(django_db_blocker: Any) -> Iterator[DemoEnvironment]:
    """The demo's servers, with Django configured from their HR_* values."""
    from django.conf import settings

    if settings.configured and os.environ.get("DJANGO_SETTINGS_MODULE") != "django_hr.settings":
        pytest.skip(
            "Django is already configured by another suite in this process; run "
            "`python -m pytest example_projects/django_hr/tests` on its own"
        )
    with DemoEnvironment() as env:
        saved = {k: os.environ.get(k) for k in env.environ()}
        os.environ.update(env.environ())
        os.environ["DJANGO_SETTINGS_MODULE"] = "django_hr.settings"
        import django

        django.setup()
        blocker = django_db_blocker.unblock() if django_db_blocker is not None else None
        if blocker is not None:
            blocker.__enter__()
        try:
            yield env
        finally:
            if blocker is not None:
                blocker.__exit__(None, None, None)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def served(hr_env: DemoEnvironment) -> Iterator[ServedApp]:
    """The Django project under waitress."""
    from django.core.wsgi import get_wsgi_application
    from django.db import connections

    server = serve_wsgi(get_wsgi_application(), label="django_hr")
    try:
        yield server
    finally:
        server.stop()
        connections.close_all()
