"""Hand-written floors: the minimal adapter a competent developer writes by hand.

Each one reads the ``Authorization: Bearer`` header, else the ``identity``
cookie, sets a context variable for the request and resets it at the end --
no validation, no policies, no error mapping.  ``bench/adapters.py`` measures
deepsec's adapters against these (issue 9: at most 1.5x the cost a floor adds
over the bare app; the FastAPI dependency at most 5 us above its floor).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

from starlette.exceptions import HTTPException
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


# -- Safe floors: the floors plus the safety properties deepsec keeps ----------------
#
# Issue 9 keeps two properties that the floors above lack:
#
# 1. the identity ends when the request ends, also for asyncio tasks and
#    threads spawned from it, which hold a copy of the contextvar: so the
#    contextvar holds a per-request lease, emptied when the request ends
#    (a cost on every request);
# 2. an end-user error raised before the response started (a rejected token,
#    strict mode) is answered 401, not 500.  Flask's errorhandler and Django's
#    process_exception cost nothing per request.  A pure ASGI middleware, which
#    must work around any ASGI app (as deepsec's does), sees whether the
#    response started only through a send wrapper (a Starlette app alone could
#    register an exception handler instead); a FastAPI dependency must run code
#    after the endpoint (a ``yield`` dependency, in FastAPI's documented API).
#
# Written the way a competent developer writes them (the ``async def`` send
# wrapper of Starlette's own middlewares; FastAPI's documented ``yield``), so
# that bench/adapters.py --safe-floor can show how much of deepsec's cost
# above a floor is these properties, and how much is deepsec's own.


class Lease:
    """What the safe floors put in the contextvar: emptied when the request ends."""

    __slots__ = ("identity",)

    def __init__(self, identity: str | None) -> None:
        self.identity = identity


#: What the safe floors set: the request's lease (its identity None once ended).
current_lease: ContextVar[Lease | None] = ContextVar("safe_floor_lease", default=None)


class EndUserError(Exception):
    """Stands for the end-user errors answered 401 (a rejected token, strict mode)."""


def install_flask_safe_floor(app: Any) -> None:
    """The Flask floor with a lease; ``EndUserError`` answered 401 by an error handler."""
    from flask import g, request

    @app.before_request
    def _set_identity() -> None:
        identity = _from_authorization(request.headers.get("Authorization"))
        if identity is None:
            identity = request.cookies.get("identity")
        lease = Lease(identity)
        g.identity_lease = (lease, current_lease.set(lease))

    @app.teardown_request
    def _reset_identity(exc: BaseException | None) -> None:
        held = g.pop("identity_lease", None)
        if held is not None:
            lease, token = held
            lease.identity = None
            current_lease.reset(token)

    @app.errorhandler(EndUserError)
    def _unauthorized(exc: EndUserError) -> Any:
        return {"error": "invalid_token"}, 401


def django_safe_floor(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``MIDDLEWARE = ["floors.django_safe_floor"]`` (``process_exception`` answers 401)."""
    from django.http import JsonResponse

    def middleware(request: Any) -> Any:
        identity = _from_authorization(request.META.get("HTTP_AUTHORIZATION"))
        if identity is None:
            identity = request.COOKIES.get("identity")
        lease = Lease(identity)
        token = current_lease.set(lease)
        try:
            return get_response(request)
        finally:
            lease.identity = None
            current_lease.reset(token)

    def process_exception(request: Any, exception: Exception) -> Any:
        if isinstance(exception, EndUserError):
            return JsonResponse({"error": "invalid_token"}, status=401)
        return None

    middleware.process_exception = process_exception  # type: ignore[attr-defined]
    return middleware


class ASGISafeFloor(ASGIFloor):
    """The ASGI floor with a lease and a send wrapper: 401 unless the response started."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # (The floor's parsing, repeated rather than shared: the floor's body is
        # the targets' baseline and stays as it was measured, without a call.)
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
        started = False

        async def send_wrapper(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        lease = Lease(identity)
        token = current_lease.set(lease)
        try:
            await self.app(scope, receive, send_wrapper)
        except EndUserError:
            if started:
                raise
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        finally:
            lease.identity = None
            current_lease.reset(token)


async def fastapi_safe_floor_dependency(request: Request) -> AsyncIterator[str | None]:
    """``Depends(fastapi_safe_floor_dependency)``: a ``yield`` dependency, ended after the response.

    (FastAPI's default scope for a ``yield`` dependency, "request", runs the
    code after ``yield`` once the response is sent; an error the endpoint
    raised is thrown in before any response started.)
    """
    identity = _from_authorization(request.headers.get("authorization"))
    if identity is None:
        identity = request.cookies.get("identity")
    lease = Lease(identity)
    token = current_lease.set(lease)
    try:
        yield identity
    except EndUserError as exc:
        raise HTTPException(status_code=401) from exc
    finally:
        lease.identity = None
        current_lease.reset(token)
