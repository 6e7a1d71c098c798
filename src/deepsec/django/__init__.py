"""Django integration: the end user of each request, carried into Oracle Deep Data Security.

Add ``"deepsec.django"`` to ``INSTALLED_APPS`` and
``"deepsec.django.middleware.EndUserSecMiddleware"`` to ``MIDDLEWARE`` (after
``AuthenticationMiddleware``), and give the Oracle database
``OPTIONS["extra_auth_params"]["end_user_sec_params"]``.  Every statement a
request runs — through the ORM, raw cursors, persistent connections
(``CONN_MAX_AGE``) or a connection pool (``OPTIONS["pool"]``) — then carries
that request's end-user security context, and none once the response is done.

Optional settings live in ``DEEPSEC = {...}`` (see :mod:`deepsec.django.conf`);
``python manage.py check`` validates them (see :mod:`deepsec.django.checks`).
"""

from __future__ import annotations

__all__ = ["APP_NAME", "MIDDLEWARE_PATH"]

#: The application to put in ``INSTALLED_APPS``.
APP_NAME = "deepsec.django"
#: The dotted path to put in ``MIDDLEWARE``.
MIDDLEWARE_PATH = "deepsec.django.middleware.EndUserSecMiddleware"
