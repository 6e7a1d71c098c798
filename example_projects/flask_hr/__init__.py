"""flask_hr: a small HR app whose every query runs as the signed-in end user.

Flask idiom: an application factory, the ``deepsec.flask.DeepSec`` extension,
a python-oracledb ``ConnectionPool`` kept in ``app.extensions``, Jinja2
templates.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
