"""Django settings for django_hr, read from ``HR_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from hr_common.settings import HRSettings

BASE_DIR = Path(__file__).resolve().parent
HR = HRSettings.from_env()

SECRET_KEY = os.environ.get("HR_DJANGO_SECRET_KEY") or "django-hr-example-not-a-secret"
DEBUG = os.environ.get("HR_DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "deepsec.django",
    "django_hr",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    # Every view (and middleware below this one) runs as the request's end user.
    "deepsec.django.middleware.EndUserSecMiddleware",
]
ROOT_URLCONF = "django_hr.urls"
WSGI_APPLICATION = "django_hr.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.oracle",
        "NAME": HR.db_dsn,  # an Easy Connect string: tcps://host:port/service
        "USER": HR.db_user,
        "PASSWORD": HR.db_password,
        # Persistent connections: safe, deepsec attaches per round trip.
        "CONN_MAX_AGE": 60,
        "OPTIONS": {
            "ssl_context": HR.db_ssl_context(),
            "extra_auth_params": {"end_user_sec_params": HR.end_user_sec_params()},
        },
    }
}
# deepsec's adapter settings (deepsec.web.WebSettings fields).
DEEPSEC = {"attributes": "django_hr.views.request_attributes"}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = os.environ.get("HR_HTTPS") == "1"
