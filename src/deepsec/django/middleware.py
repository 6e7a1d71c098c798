"""``EndUserSecMiddleware``: one request, one end-user context.

For each request the middleware reads the raw ``Cookie`` and
``Authorization`` headers (``request.META``), or calls the configured resolver,
and hands them to :func:`deepsec.web.resolve` — the policy shared by every
deepsec adapter.  The resulting :class:`~deepsec.EndUserContext` is current
while the view (and every middleware inside this one) runs; the driver hook
attaches it to whatever connection each statement uses.

Streaming responses: a ``StreamingHttpResponse`` body is produced after the
middleware returns.  Its iterator (sync or async) is wrapped so the request's
context is current while each chunk is produced and while the response's
closers run (a generator's ``finally``), and at no other time.  Nothing
stays current once the response is finished, also when the view or the body
raises.

Errors raised by a view get the answer every adapter gives
(:mod:`deepsec.lifecycle`): a token the library could not obtain a JSON 503
with ``Retry-After`` (``token_error_status``), ORA-52601 or a rejected
end-user token a 401 with ``WWW-Authenticate``; never a token or secret.
Settings: the one table in ``docs/settings.md``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase, JsonResponse

from ..context import EndUserContext, activate
from ..lifecycle import _start, answer, begin
from ..web import Rejection, Resolution, WebSettings, resolve
from . import conf
from .conf import get_settings

__all__ = ["EndUserSecMiddleware", "process_exception", "rejection_response"]


GetResponse = Callable[[HttpRequest], HttpResponseBase]
AsyncGetResponse = Callable[[HttpRequest], Awaitable[HttpResponseBase]]
#: What the factory returns: Django calls it with each request.
Middleware = Callable[[HttpRequest], Any]


def rejection_response(rejection: Rejection) -> JsonResponse:
    """A Django ``JsonResponse`` for a :class:`~deepsec.web.Rejection`."""
    response = JsonResponse(rejection.body, status=rejection.status)
    for name, value in rejection.headers:
        response[name] = value
    return response


def _resolve(settings: WebSettings, request: HttpRequest) -> Resolution:
    # The raw header values, as every adapter hands them over: Django's
    # request.COOKIES decodes, unquotes and picks the last of two cookies its
    # own way, so the same bytes would name another end user than elsewhere.
    meta = request.META
    return resolve(
        settings,
        request,
        cookie_header=meta.get("HTTP_COOKIE"),
        authorization=meta.get("HTTP_AUTHORIZATION"),
    )


def _uses_request_callables(settings: WebSettings) -> bool:
    # App callables may touch request.user (a database query): under ASGI
    # they must run in a thread, like any other sync code.
    return (
        settings.resolver is not None
        or settings.data_roles is not None
        or settings.attributes is not None
    )


class _Scoped:
    """Shared part of the streaming wrappers: the context and the closers."""

    __slots__ = ("_closers", "_context")

    def __init__(self, context: EndUserContext | None, closers: list[Callable[[], Any]]) -> None:
        self._context = context
        self._closers = closers

    def close(self) -> None:
        """Run the response's original closers under the request's context."""
        closers, self._closers = self._closers, []
        with activate(self._context):
            for closer in closers:
                closer()


class _ScopedIterator(_Scoped):
    """A sync streaming body whose every chunk is produced under one context."""

    __slots__ = ("_iterator",)

    def __init__(
        self,
        iterator: Iterator[bytes],
        context: EndUserContext | None,
        closers: list[Callable[[], Any]],
    ) -> None:
        super().__init__(context, closers)
        self._iterator = iterator

    def __iter__(self) -> _ScopedIterator:
        return self

    def __next__(self) -> bytes:
        with activate(self._context):
            return next(self._iterator)


class _ScopedAsyncIterator(_Scoped):
    """An async streaming body whose every chunk is produced under one context.

    ``activate`` and ``deactivate`` run in the same coroutine call, so the
    reset always happens in the context that made it, whichever task
    iterates the body.
    """

    __slots__ = ("_iterator",)

    def __init__(
        self,
        iterator: AsyncIterator[bytes],
        context: EndUserContext | None,
        closers: list[Callable[[], Any]],
    ) -> None:
        super().__init__(context, closers)
        self._iterator = iterator

    def __aiter__(self) -> _ScopedAsyncIterator:
        return self

    async def __anext__(self) -> bytes:
        with activate(self._context):
            return await self._iterator.__anext__()


def _scope_streaming(response: HttpResponseBase, context: EndUserContext | None) -> None:
    """Make a streaming body run under ``context``, chunk by chunk."""
    # Take over the closers registered so far (the view's generator close()):
    # they run from our close(), under the context.  Django registers our
    # wrapper's close() when streaming_content is assigned.
    registered = getattr(response, "_resource_closers", None)
    closers: list[Callable[[], Any]] = []
    if isinstance(registered, list):
        closers = list(registered)
        registered.clear()
    content = response.streaming_content  # type: ignore[attr-defined]
    wrapper: _ScopedIterator | _ScopedAsyncIterator
    if getattr(response, "is_async", False):
        wrapper = _ScopedAsyncIterator(content, context, closers)
    else:
        wrapper = _ScopedIterator(iter(content), context, closers)
    response.streaming_content = wrapper  # type: ignore[attr-defined]


def _require_app() -> None:
    # Without the app the python-oracledb hook is never installed: requests
    # would resolve their end user and every statement would still run as
    # the application alone.  Refuse to start rather than fail open.
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    from . import APP_NAME, MIDDLEWARE_PATH

    if not apps.is_installed(APP_NAME):
        raise ImproperlyConfigured(
            f"{MIDDLEWARE_PATH} is in MIDDLEWARE but '{APP_NAME}' is not in INSTALLED_APPS: "
            f"add '{APP_NAME}' to INSTALLED_APPS (it installs the python-oracledb hook and "
            "deepsec's system checks)."
        )


def EndUserSecMiddleware(
    get_response: GetResponse | AsyncGetResponse,
) -> Middleware:
    """Make each request's end user current for the database work it does.

    A middleware factory, sync and async capable, as Django documents them
    (the name is the one ``MIDDLEWARE`` has always held).
    A function rather than a class: Django calls what this returns on every
    request, and calling a class instance makes CPython look ``__call__`` up
    on its type each time, through a small cache shared with everything else
    the process runs (measured: up to a few thousand instructions a request
    when its entries collide).  Put it after
    ``django.contrib.auth.middleware.AuthenticationMiddleware`` (the system
    checks say so) so a resolver can use ``request.user``.
    """
    _require_app()
    middleware: Middleware
    if iscoroutinefunction(get_response):
        serve_async = cast(AsyncGetResponse, get_response)

        async def middleware(request: HttpRequest) -> HttpResponseBase:
            """Serve one request under an ASGI handler."""
            settings = conf._cache or get_settings()
            if _uses_request_callables(settings):
                resolution = await sync_to_async(_resolve, thread_sensitive=True)(settings, request)
                outcome = begin(resolution, settings)
            else:
                meta = request.META
                outcome = _start(
                    settings,
                    request,
                    meta.get("HTTP_COOKIE"),  # (cookie, then authorization)
                    meta.get("HTTP_AUTHORIZATION"),
                )
            if type(outcome) is Rejection:
                return rejection_response(outcome)
            try:
                response = await serve_async(request)
            finally:
                outcome.end()
            try:
                streaming = response.streaming
            except AttributeError:  # a response class of the app's own
                streaming = False
            if streaming:
                _scope_streaming(response, outcome.context)
            return response

    else:
        serve = cast(GetResponse, get_response)

        def middleware(request: HttpRequest) -> HttpResponseBase:
            """Serve one request (sync)."""
            # The raw header values, as every adapter hands them over: Django's
            # request.COOKIES decodes, unquotes and picks the last of two
            # cookies its own way, so the same bytes would name another end
            # user than elsewhere.  (_resolve() inlined: the per-request hot path.)
            meta = request.META
            outcome = _start(
                conf._cache or get_settings(),  # (the parsed settings, read without a call)
                request,
                meta.get("HTTP_COOKIE"),  # (cookie, then authorization)
                meta.get("HTTP_AUTHORIZATION"),
            )
            if type(outcome) is Rejection:
                return rejection_response(outcome)
            try:
                response = serve(request)
            finally:
                outcome.end()
            # (An attribute read, not getattr(): a builtin call per request.)
            try:
                streaming = response.streaming
            except AttributeError:  # a response class of the app's own
                streaming = False
            if streaming:
                _scope_streaming(response, outcome.context)
            return response

    # Django finds it on what the factory returns and calls it when a view raises.
    middleware.process_exception = process_exception  # type: ignore[union-attr]
    return middleware


# Django reads both from the factory (django.utils.decorators'
# sync_and_async_middleware sets the same, untyped).
EndUserSecMiddleware.sync_capable = True  # type: ignore[attr-defined]
EndUserSecMiddleware.async_capable = True  # type: ignore[attr-defined]


def process_exception(request: HttpRequest, exception: Exception) -> JsonResponse | None:
    """Answer an end-user failure raised by a view (401/503), as every adapter does."""
    rejection = answer(exception, get_settings())
    return None if rejection is None else rejection_response(rejection)
