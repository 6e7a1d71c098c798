"""Settings of the test project (``settings.configure`` copies the upper-case names)."""

from __future__ import annotations

from typing import Any

SECRET_KEY = "django-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "deepsec.django",
]
MIDDLEWARE = [
    "django_project.middleware.header_user",
    "deepsec.django.middleware.EndUserSecMiddleware",
]
ROOT_URLCONF = "django_project.urls"
# Filled by django_project.configure_databases() once the wire server runs.
DATABASES: dict[str, Any] = {}
# The tests send local [name, key] users in cookies: opt in (off by default).
DEEPSEC: dict[str, Any] = {"client_local_users": True}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None
