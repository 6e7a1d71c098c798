"""FastAPI dependency: the request's end user, scoped to the request.

::

    from fastapi import Depends, FastAPI
    from deepsec.fastapi import EndUser, end_user_identity

    app = FastAPI(dependencies=[Depends(end_user_identity)])   # every route

    @app.get("/me")
    async def me(user: EndUser):          # EndUserContext | None
        ...

:data:`end_user_identity` is an ``async def`` dependency *without* ``yield``
(FastAPI's ``yield`` machinery alone costs tens of microseconds a request):
it resolves and activates the request's :class:`~deepsec.EndUserContext`,
fetches the database-access tokens off the event loop
(:func:`deepsec.prepare`), and hands the activation to FastAPI's request exit
stack, which ends it after the response has been sent -- so a
``StreamingResponse`` body and background tasks still run as the end user,
and tasks or threads that outlive the request lose it then.  It must be
async: FastAPI runs a sync dependency in a worker thread, and a context
variable set there never reaches the endpoint.  ``async def`` endpoints and
``def`` endpoints (run in the thread pool, which copies the context) both see
the identity.

Errors get the same answers as in every other adapter (one mapping,
:mod:`deepsec.lifecycle`): a refused identity or a token failure while
resolving is an :class:`fastapi.HTTPException` (``WebSocketException`` on
WebSocket routes, code 1008 or 1013); ORA-52601, rejected user tokens,
provider failures and :class:`~deepsec.TokenNotReadyError` raised *inside
the endpoint* become that same ``HTTPException`` as they leave it (unless
the app has a handler for the error's class or one along its MRO; once a
streaming body has started they pass unchanged).  Bodies are
``{"detail": {...}}``, as FastAPI's own errors.

The ``HTTPBearer`` and ``APIKeyCookie`` security schemes appear in OpenAPI
and cost nothing per request: they are added to the document when FastAPI
builds it (this module wraps ``FastAPI.openapi``; see
:func:`add_security_schemes`), for the operations that depend on an
:class:`EndUserIdentity`.  As FastAPI security dependencies they would cost
on every request (a sub-dependency is solved; recent FastAPI computes a
scheme's OAuth scopes).
When the ASGI middleware (:class:`deepsec.asgi.EndUserSecMiddleware`)
already resolved the request by the same settings (its activation is the
current one), the dependency reuses that context.  Settings: the one table
in ``docs/settings.md``; use :class:`EndUserIdentity` to change them.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Annotated, Any

import fastapi.routing
from fastapi import Depends, FastAPI, HTTPException, WebSocketException
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, HTTPBearer
from fastapi.security.base import SecurityBase
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute

from .asgi import _lease_by_bytes, _remembered_by_bytes, _start_in_full
from .context import EndUserContext, _current_activation
from .lifecycle import TOKEN_CONFIGS, RequestLease, answer, fetch_tokens
from .web import Rejection, WebSettings

__all__ = ["EndUser", "EndUserIdentity", "add_security_schemes", "end_user_identity"]

_BEARER_DESCRIPTION = "End-user identity token (IAM access token)."
_COOKIE_DESCRIPTION = 'End-user identity: a token, or JSON ["name", key|null].'


class EndUserIdentity:
    """A configurable ``Depends()``-able identity dependency.

    Args:
        settings: a complete :class:`~deepsec.web.WebSettings`; or give its
            fields as keyword arguments (names in ``docs/settings.md``), not
            both.  The ``resolver``, ``data_roles`` and ``attributes``
            callables receive the Starlette ``HTTPConnection``.
        openapi: declare the ``HTTPBearer`` / ``APIKeyCookie`` security
            schemes in OpenAPI (``False`` hides them).

    Raises:
        ConfigError: an unknown setting or a bad value (all of them listed).
    """

    def __init__(
        self, settings: WebSettings | None = None, *, openapi: bool = True, **kwargs: Any
    ) -> None:
        if settings is not None and kwargs:
            raise TypeError("give either settings or individual settings, not both")
        self.settings = s = (
            settings
            if settings is not None
            else WebSettings.from_mapping(kwargs, where="EndUserIdentity settings")
        )
        params = [
            inspect.Parameter(
                "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
            )
        ]
        # The schemes FastAPI's document shows for the routes that depend on
        # this (add_security_schemes).  Not a SecurityBase dependency: recent
        # FastAPI computes a security scheme's OAuth scopes on every request.
        self.bearer_scheme: SecurityBase | None = None
        self.cookie_scheme: SecurityBase | None = None
        if openapi and s.resolver is None:
            # (FastAPI's own scheme objects, for their models and names only:
            # never a dependency, so never run.)
            if s.bearer:
                self.bearer_scheme = HTTPBearer(description=_BEARER_DESCRIPTION)
            if s.cookie_name is not None:
                self.cookie_scheme = APIKeyCookie(
                    name=s.cookie_name, description=_COOKIE_DESCRIPTION
                )
        # Where a repeat request is looked up by its raw header bytes (as in
        # the ASGI middleware).
        self._remembered = _remembered_by_bytes(s)
        # FastAPI reads the dependency's parameters from this signature.
        self.__signature__ = inspect.Signature(params, return_annotation=EndUserContext | None)

    def __repr__(self) -> str:
        s = self.settings
        return f"EndUserIdentity(strict={s.strict}, no_identity={s.no_identity!r})"

    async def __call__(self, connection: HTTPConnection) -> EndUserContext | None:
        """Resolve and activate the end-user context; FastAPI ends it after the response."""
        scope = connection.scope
        settings = self.settings
        current = _current_activation()
        if (
            isinstance(current, RequestLease)
            and current.active
            and current.scope is scope
            and (current.settings is settings or current.settings == settings)
        ):
            # This request was resolved already by the same rules (the ASGI
            # middleware, or this dependency declared twice).  A laxer
            # middleware's resolution is not reused: this dependency's
            # deny/strict/resolver choices hold.  Only a lease of *this*
            # request's scope: a request the endpoint makes to the app in
            # process (httpx.ASGITransport) runs with the outer request's
            # lease current, and must be resolved from its own headers.
            done = current.context
            return done if done.identity is not None else None
        # The hot path, as in the ASGI middleware: a repeat of earlier raw
        # header bytes is one lookup of the resolution they got.
        outcome, ctx, key = _lease_by_bytes(self._remembered, scope["headers"], _DependencyLease)
        if outcome is None:
            started, ctx = _start_in_full(
                settings, connection, scope["headers"], key, self._remembered, _DependencyLease
            )
            if type(started) is Rejection:
                raise _exception(scope, started)
            outcome = started
        if ctx is not None and TOKEN_CONFIGS:  # needs_tokens(), inlined
            fetched = await fetch_tokens(outcome, settings)
            if type(fetched) is Rejection:
                raise _exception(scope, fetched)
        stack = scope.get("fastapi_inner_astack")
        if stack is None:  # pragma: no cover - FastAPI older than 0.118
            outcome.end()
            raise RuntimeError("deepsec.fastapi needs FastAPI 0.118 or later")
        # FastAPI closes the endpoint's (function) stack when the endpoint
        # returned, then the request's stack after the response is sent (in
        # this task): the lease's __exit__ is called on both.  It notes the
        # first; on the second it answers endpoint errors, then ends the
        # identity.
        outcome.scope = scope
        outcome.settings = settings
        function_stack = scope.get("fastapi_function_astack")
        outcome.phase = _ENDPOINT if function_stack is not None else _ENDPOINT_FAILED
        if _DIRECT_PUSH:
            # What push(outcome) stores (checked at import), without its
            # three calls per push.
            callback = (True, outcome.__exit__)
            stack._exit_callbacks.append(callback)
            if function_stack is not None:
                function_stack._exit_callbacks.append(callback)
        else:  # a contextlib laid out otherwise
            stack.push(outcome)
            if function_stack is not None:
                function_stack.push(outcome)
        return ctx


def add_security_schemes(
    schema: dict[str, Any],
    routes: Sequence[BaseRoute],
    webhooks: Sequence[BaseRoute] = (),
) -> dict[str, Any]:
    """Show deepsec's security schemes in an OpenAPI ``schema`` built from ``routes``; return it.

    Every operation of an :class:`~fastapi.routing.APIRoute` that depends on
    an :class:`EndUserIdentity` (directly, through a router, or through a
    sub-dependency) lists its schemes -- ``HTTPBearer`` and ``APIKeyCookie``,
    either may be sent -- and ``components`` defines them; so do the route's
    callbacks, and the ``webhooks`` (``app.webhooks.routes``).  A definition
    of that name the document already has is used when it asks for the same
    thing (a bearer token; a cookie of the same name); else deepsec's is added
    under a free name (``APIKeyCookie_2``...).  Idempotent.
    ``FastAPI.openapi`` calls it (deepsec wraps it); an app that builds its
    document with its own function calls
    ``add_security_schemes(get_openapi(...), app.routes, app.webhooks.routes)``.
    """
    marks: list[tuple[dict[str, Any], list[SecurityBase]]] = []
    _find_operations(schema.get("paths"), routes, "path_format", marks)
    _find_operations(schema.get("webhooks"), webhooks, "path_format", marks)
    if not marks:
        return schema
    # (Not a document deepsec can add to: left as it is, never an error page.)
    components = schema.setdefault("components", {})
    if not isinstance(components, dict):
        return schema
    definitions = components.setdefault("securitySchemes", {})
    if not isinstance(definitions, dict):
        return schema
    names: dict[int, str] = {}  # id(scheme) -> its name in this document
    for operation, schemes in marks:
        security = operation.setdefault("security", [])
        if not isinstance(security, list):
            continue  # the app's own, not a list of requirements: left as it is
        for scheme in schemes:
            name = names.get(id(scheme))
            if name is None:
                name = names[id(scheme)] = _name_for(scheme, definitions)
            if {name: []} not in security:
                security.append({name: []})
    return schema


def _find_operations(
    paths: Any,
    routes: Iterable[BaseRoute],
    key: str,
    marks: list[tuple[dict[str, Any], list[SecurityBase]]],
) -> None:
    """Note each operation of ``paths`` whose route depends on an :class:`EndUserIdentity`."""
    if not isinstance(paths, dict):
        return
    for route in _route_contexts(routes):
        # (A route context of a lazily included router, FastAPI 0.138+,
        # reads as its effective route: router dependencies included.)
        if not isinstance(getattr(route, "original_route", route), APIRoute):
            continue
        operations = paths.get(getattr(route, key))
        if not route.include_in_schema or not isinstance(operations, dict):
            continue
        schemes = _schemes_of(route.dependant)
        # FastAPI documents a callback route under its name (the last one of a
        # name wins), then its path; it skips other routes.
        kept = {c.name: c for c in route.callbacks or () if isinstance(c, APIRoute)}
        for method in route.methods or ():
            operation = operations.get(method.lower())
            if not isinstance(operation, dict):
                continue
            if schemes:
                marks.append((operation, schemes))
            callbacks = operation.get("callbacks")
            if isinstance(callbacks, dict):
                for name, callback in kept.items():
                    _find_operations(callbacks.get(name), [callback], "path", marks)


def _name_for(scheme: SecurityBase, definitions: dict[str, Any]) -> str:
    """The name ``scheme`` has in ``definitions``: one that asks the same, else a free one."""
    definition = jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
    # What a client must send: a bearer token, or a cookie (header...) of this name.
    sends = ("type", "scheme") if definition.get("type") == "http" else ("type", "in", "name")
    base, number = scheme.scheme_name, 1
    while True:
        name = base if number == 1 else f"{base}_{number}"
        found = definitions.get(name)
        if found is None:
            definitions[name] = definition
            return name
        if isinstance(found, dict) and all(found.get(k) == definition.get(k) for k in sends):
            return name
        number += 1


#: The routes as FastAPI documents them: before 0.138, included routes are
#: copies in ``app.routes``, so the routes themselves.
_route_contexts: Callable[[Iterable[BaseRoute]], Iterable[Any]] = getattr(
    fastapi.routing, "iter_route_contexts", iter
)


def _schemes_of(dependant: Dependant) -> list[SecurityBase]:
    """The schemes of the :class:`EndUserIdentity` dependencies in ``dependant``'s tree."""
    found: list[SecurityBase] = []
    pending = [dependant]
    while pending:
        current = pending.pop()
        call = current.call
        if isinstance(call, EndUserIdentity):
            for scheme in (call.bearer_scheme, call.cookie_scheme):
                if scheme is not None and scheme not in found:
                    found.append(scheme)
        pending.extend(reversed(current.dependencies))
    return found


_fastapi_openapi = FastAPI.openapi


def _openapi(self: FastAPI) -> dict[str, Any]:
    # FastAPI.openapi, plus deepsec's schemes.  Installed on the class when
    # deepsec.fastapi is imported (before any app that uses it exists), so the
    # document shows them from the first time it is built, without a request.
    # The app keeps the document it was last given with them, so that serving
    # FastAPI's cached document does not walk every route again (in the app's
    # own __dict__: an app class need not be hashable).
    schema = _fastapi_openapi(self)
    kept = self.__dict__
    if kept.get(_DOCUMENTED) is not schema:
        add_security_schemes(schema, self.routes, self.webhooks.routes)
        kept[_DOCUMENTED] = schema
    return schema


_DOCUMENTED = "_deepsec_openapi_document"


FastAPI.openapi = _openapi  # type: ignore[method-assign]


class _DependencyLease(RequestLease):
    """One request's identity lease that also answers deepsec's endpoint errors.

    Pushed on the endpoint's (function) stack, which tells it the endpoint
    returned, and on FastAPI's request stack (that ``__exit__`` runs after
    the response): an error the endpoint raised (ORA-52601, a provider failure,
    ``TokenNotReadyError``) becomes the same ``HTTPException`` a resolution
    failure is, which Starlette answers; the identity ends either way.
    Nothing is added to the app's exception handlers, so the app's own
    handler for the error's class, or any class along its MRO
    (``oracledb.Error``, ``ValueError``), keeps answering it; and an error
    raised once the response is streaming passes unchanged (Starlette turns
    a *handled* error after the response started into a RuntimeError).
    """

    __slots__ = ("phase",)

    #: Where the request is: :data:`_ENDPOINT`, :data:`_ENDPOINT_FAILED` or
    #: :data:`_RESPONSE` (an error now may come from a started response).
    phase: int

    def __exit__(self, et: object = None, exc: object = None, tb: object = None) -> None:
        phase = self.phase
        if phase == _ENDPOINT:  # the endpoint's stack closes (the request's stays)
            self.phase = _RESPONSE if et is None else _ENDPOINT_FAILED
            return
        try:
            if exc is not None and phase == _ENDPOINT_FAILED and isinstance(exc, Exception):
                self._answer(exc)
        finally:
            self.end()
            self.scope = None  # tasks that outlive the request keep no scope

    def _answer(self, exc: Exception) -> None:
        handlers = self.scope.get("starlette.exception_handlers")
        if handlers is not None and _handler_for(handlers[0], type(exc).__mro__) is not None:
            return  # the app's own handler answers it
        rejection = answer(exc, self.settings)
        if rejection is not None:
            raise _exception(self.scope, rejection) from exc


#: The endpoint runs (its stack is open).
_ENDPOINT = 2
#: The endpoint raised (or, without an endpoint stack, it may have): answer.
_ENDPOINT_FAILED = 0
#: The endpoint returned: an error comes from sending the response, which may
#: have started, so it passes unchanged.
_RESPONSE = 1


class _Probe:
    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - never called
        pass


def _direct_push_works() -> bool:
    """Whether ``AsyncExitStack.push(cm)`` stores ``(True, cm.__exit__)`` in ``_exit_callbacks``.

    Checked once, on the contextlib in use: then the dependency appends that
    itself (``push`` costs three Python calls per request); else it pushes.
    """
    probe = _Probe()
    stack = AsyncExitStack()
    callbacks = getattr(stack, "_exit_callbacks", None)
    if not isinstance(callbacks, deque):
        return False
    stack.push(probe)  # type: ignore[type-var]
    return list(callbacks) == [(True, probe.__exit__)]


_DIRECT_PUSH = _direct_push_works()


def _handler_for(by_type: Any, mro: tuple[type, ...]) -> Any:
    # Starlette's own lookup: the first class along the MRO with a handler.
    for cls in mro:
        handler = by_type.get(cls)
        if handler is not None:
            return handler
    return None


def _exception(scope: Any, rejection: Rejection) -> Exception:
    if scope.get("type") == "websocket":
        return WebSocketException(code=rejection.close_code, reason=rejection.body.get("error"))
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
