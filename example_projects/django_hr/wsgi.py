"""WSGI entry point: ``waitress-serve django_hr.wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_hr.settings")
application = get_wsgi_application()
