"""FastAPI dependency: the request's end user, scoped to the request.

::

    from fastapi import Depends, FastAPI
    from deepsec.fastapi import EndUser, end_user_identity

    app = FastAPI(dependencies=[Depends(end_user_identity)])   # every route

    @app.get("/me")
    async def me(user: EndUser):          # EndUserContext | None
        ...

:data:`end_user_identity` is an ``async def`` dependency *with* ``yield``: it
activates the request's :class:`~deepsec.EndUserContext` before the endpoint
runs, fetches the database-access tokens off the event loop
(:func:`deepsec.prepare`), and restores the previous context when FastAPI
exits the dependency.  It must be async: FastAPI runs a sync dependency in a
worker thread, and a context variable set there never reaches the endpoint.
Both ``async def`` endpoints and ``def`` endpoints (run in the thread pool,
which copies the context) see the identity.

Exit timing (FastAPI 0.118+, checked on 0.165): a dependency with ``yield``
in the default ``"request"`` scope exits after the response has been sent, so
a ``StreamingResponse`` body and background tasks still run as the end user.
With ``Depends(end_user_identity, scope="function")`` it exits before the
response is sent, and a streaming body then runs with *no* end user
(least privilege, never another user's identity).

It also declares the ``HTTPBearer`` and ``APIKeyCookie`` security schemes, so
OpenAPI shows how to send the identity.  When the ASGI middleware
(:class:`deepsec.asgi.EndUserSecMiddleware`) already resolved the request, the
dependency reuses that context and does nothing else.  Rejections become
:class:`fastapi.HTTPException` (with ``WWW-Authenticate`` for 401) and, on
WebSocket routes, :class:`fastapi.WebSocketException` (code 1008, or 1013 for a
token failure).  Use :class:`EndUserIdentity` for other settings.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Security, WebSocketException
from fastapi.security import APIKeyCookie, HTTPBearer
from starlette.requests import HTTPConnection

from .asgi import SCOPE_KEY, SETTINGS_KEY
from .context import EndUserContext, activate, deactivate
from .errors import DeepSecError
from .hook import prepare
from .web import Rejection, WebSettings, parse_cookie_header, rejection_for_error, resolve

__all__ = ["EndUser", "EndUserIdentity", "end_user_identity"]


class EndUserIdentity:
    """A configurable ``Depends()``-able identity dependency.

    Args:
        settings: a complete :class:`~deepsec.web.WebSettings`; or give its
            fields as keyword arguments (``cookie_name``, ``bearer``,
            ``resolver``, ``strict``, ``no_identity``...), not both.  The
            ``resolver``, ``data_roles`` and ``attributes`` callables receive
            the Starlette ``HTTPConnection`` (a ``Request`` or ``WebSocket``).
        openapi: declare the ``HTTPBearer`` / ``APIKeyCookie`` security schemes
            (sub-dependencies FastAPI runs on every request; ``False`` saves
            about 20 us per request and hides them from OpenAPI).

    Raises:
        ConfigError: an unknown setting or a bad value (all of them listed).
    """

    def __init__(
        self, settings: WebSettings | None = None, *, openapi: bool = True, **kwargs: Any
    ) -> None:
        if settings is not None and kwargs:
            raise TypeError("give either settings or individual settings, not both")
        self.settings = (
            settings
            if settings is not None
            else WebSettings.from_mapping(kwargs, where="EndUserIdentity settings")
        )
        params = [
            inspect.Parameter(
                "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
            )
        ]
        # Declared only for OpenAPI: the raw cookie and header are read below,
        # so that deepsec.web decides what is valid (not FastAPI's parsers).
        declare = openapi and self.settings.resolver is None
        if declare and self.settings.bearer:
            self.bearer_scheme: HTTPBearer | None = HTTPBearer(
                auto_error=False,
                description="End-user identity token (IAM access token).",
            )
            params.append(_scheme_param("_bearer", self.bearer_scheme))
        else:
            self.bearer_scheme = None
        if declare and self.settings.cookie_name is not None:
            self.cookie_scheme: APIKeyCookie | None = APIKeyCookie(
                name=self.settings.cookie_name,
                auto_error=False,
                description='End-user identity: a token, or JSON ["name", key|null].',
            )
            params.append(_scheme_param("_cookie", self.cookie_scheme))
        else:
            self.cookie_scheme = None
        # FastAPI reads the dependency's parameters from this signature.
        self.__signature__ = inspect.Signature(
            params, return_annotation=AsyncIterator[EndUserContext | None]
        )

    def __repr__(self) -> str:
        s = self.settings
        return f"EndUserIdentity(strict={s.strict}, no_identity={s.no_identity!r})"

    async def __call__(
        self, connection: HTTPConnection, **_schemes: Any
    ) -> AsyncIterator[EndUserContext | None]:
        """Resolve, activate and (after the response) reset the end-user context."""
        scope = connection.scope
        settings = self.settings
        if SCOPE_KEY in scope and scope.get(SETTINGS_KEY) == settings:
            # The ASGI middleware already resolved this request by the same rules.
            yield scope[SCOPE_KEY]
            return
        # Otherwise this dependency's own settings decide (its deny, strict,
        # cookie and resolver choices must not be lost behind a laxer middleware).
        cookie = None
        if settings.cookie_name is not None:
            cookie = parse_cookie_header(connection.headers.get("cookie"), settings.cookie_name)
        resolution = resolve(
            settings,
            connection,
            cookie=cookie,
            authorization=connection.headers.get("authorization"),
        )
        if resolution.rejection is not None:
            raise _exception(scope, resolution.rejection, close_code=1008)
        ctx = resolution.context
        token = activate(ctx)
        try:
            if ctx is not None:
                try:
                    await prepare(ctx)
                except DeepSecError as exc:
                    rejection = rejection_for_error(exc, settings)
                    if rejection is None:
                        raise
                    close_code = 1008 if rejection.status == 401 else 1013
                    raise _exception(scope, rejection, close_code=close_code) from None
            yield ctx
        finally:
            try:
                deactivate(token)
            except ValueError:  # exited from another context: clear this one
                activate(None)


def _scheme_param(name: str, scheme: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=Security(scheme),
        annotation=Any,
    )


def _exception(scope: Any, rejection: Rejection, *, close_code: int) -> Exception:
    if scope.get("type") == "websocket":
        return WebSocketException(code=close_code, reason=rejection.body.get("error"))
    return HTTPException(
        status_code=rejection.status,
        detail=dict(rejection.body),
        headers=dict(rejection.headers) or None,
    )


#: The default dependency: cookie ``identity``, else ``Authorization: Bearer``;
#: malformed input is ignored; no identity runs least-privileged.
end_user_identity = EndUserIdentity()

#: ``user: EndUser`` in an endpoint: the request's context, or ``None``.
EndUser = Annotated[EndUserContext | None, Depends(end_user_identity)]
