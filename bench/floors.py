"""Hand-written floors: the minimal adapter a competent developer writes by hand.

Each one reads the ``Authorization: Bearer`` header, else the ``identity``
cookie, sets a context variable for the request and resets it at the end --
no validation, no policies, no error mapping.  ``bench/adapters.py`` measures
deepsec's adapters against these (issue 9: at most 1.5x the cost a floor adds
over the bare app; the FastAPI dependency at most 5 us above its floor).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.requests import Request

#: What the floors set: the raw identity (a token), or None.
current_identity: ContextVar[str | None] = ContextVar("floor_identity", default=None)


def _from_authorization(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


# -- Flask: before_request / teardown_request ---------------------------------------


def install_flask_floor(app: Any) -> None:
    """Set the identity in ``before_request``, reset it in ``teardown_request``."""
    from flask import g, request

    @app.before_request
    def _set_identity() -> None:
        identity = _from_authorization(request.headers.get("Authorization"))
        if identity is None:
            identity = request.cookies.get("identity")
        g.identity_token = current_identity.set(identity)

    @app.teardown_request
    def _reset_identity(exc: BaseException | None) -> None:
        token = g.pop("identity_token", None)
        if token is not None:
            current_identity.reset(token)


# -- Django: a function middleware ---------------------------------------------------


def django_floor(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``MIDDLEWARE = ["floors.django_floor"]``."""

    def middleware(request: Any) -> Any:
        identity = _from_authorization(request.META.get("HTTP_AUTHORIZATION"))
        if identity is None:
            identity = request.COOKIES.get("identity")
        token = current_identity.set(identity)
        try:
            return get_response(request)
        finally:
            current_identity.reset(token)

    return middleware


# -- ASGI (Starlette, FastAPI): a pure ASGI middleware --------------------------------


class ASGIFloor:
    """``Middleware(ASGIFloor)`` / ``app.add_middleware(ASGIFloor)``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identity = None
        cookie = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                identity = _from_authorization(value.decode("latin-1"))
            elif name == b"cookie":
                cookie = value.decode("latin-1")
        if identity is None and cookie:
            for part in cookie.split(";"):
                key, _, val = part.strip().partition("=")
                if key == "identity":
                    identity = val
        token = current_identity.set(identity)
        try:
            await self.app(scope, receive, send)
        finally:
            current_identity.reset(token)


# -- FastAPI: a minimal dependency, async def without yield ---------------------------


async def fastapi_floor_dependency(request: Request) -> str | None:
    """``Depends(fastapi_floor_dependency)``."""
    identity = _from_authorization(request.headers.get("authorization"))
    if identity is None:
        identity = request.cookies.get("identity")
    current_identity.set(identity)
    return identity
