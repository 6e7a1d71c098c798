"""fastapi_hr: a small HR app whose every query runs as the signed-in end user.

FastAPI idiom: an ``AsyncConnectionPool`` opened in the lifespan, the
``deepsec.fastapi`` identity dependency on every route, Jinja2 templates.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
