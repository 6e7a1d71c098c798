"""One request lifecycle for every web adapter.

An adapter translates its framework's request into raw header values and its
response machinery into "send this :class:`~deepsec.web.Rejection`"; the
steps in between live here once:

1. :func:`start`: resolve the identity (:func:`deepsec.web.resolve`; a
   repeat of earlier raw header values is one dict lookup) and activate it --
   also "no end user", so a request never inherits a context -- or refuse the
   request; async adapters then await :func:`fetch_tokens` when
   :func:`needs_tokens` (:func:`start_async` does both);
2. the app runs; an error it raises goes through :func:`answer`, the one
   mapping from errors to responses (ORA-52601, rejected user tokens,
   provider failures, :class:`~deepsec.TokenNotReadyError`);
3. the adapter ends the :class:`~deepsec.context.Activation` when the
   response is done; tasks and threads spawned from the request lose the end
   user at that moment.

Every refused request passes through :func:`rejected`, the single place
to observe rejections (by ``Rejection.reason``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from . import telemetry
from .context import Activation, _check_lease_class, _current, new_activation
from .errors import DeepSecError, TokenAcquisitionError
from .prefetch import configs_in_use, prepare
from .web import Rejection, Resolution, WebSettings, _activated, rejection_for_error, resolve

__all__ = [
    "TOKEN_CONFIGS",
    "RequestLease",
    "answer",
    "begin",
    "fetch_tokens",
    "needs_tokens",
    "rejected",
    "start",
    "start_async",
]

log = logging.getLogger("deepsec.web")

#: The configurations the driver hook serves (filled in place as connections
#: use ``end_user_sec_params``): while empty, prepare() has nothing to fetch.
TOKEN_CONFIGS = configs_in_use

Headers = str | Sequence[str] | None


def rejected(rejection: Rejection) -> Rejection:
    """The one place every refused request passes; returns ``rejection``.

    Counts it (``deepsec.requests.rejected``, by status and ``reason``).
    """
    telemetry.record_rejection(rejection)
    return rejection


def begin(resolution: Resolution, settings: WebSettings | None = None) -> Activation | Rejection:
    """Activate a resolution's context (``None`` too), or return its rejection.

    ``settings`` (those it was resolved with) apply ``record_end_user``.
    """
    target = _activated(resolution)
    if type(target) is Rejection:
        return rejected(target)
    if settings is not None and settings.record_end_user:
        telemetry.record_end_user(settings.record_end_user, target)
    # resolve() only yields validated contexts: skip activate()'s type check.
    return new_activation(target)


class RequestLease(Activation):
    """An adapter's activation for one request, with its scope and the settings it was resolved by.

    A later deepsec layer of the same request (the FastAPI dependency behind
    the ASGI middleware) that finds one active as the current activation, of
    the same ASGI scope and resolved by equal settings, reuses it instead of
    resolving again.  The scope is set while the request runs, and ``None``
    after (tasks that outlive the request keep no scope).
    """

    __slots__ = ("scope", "settings")

    scope: Any
    settings: WebSettings


Lease = TypeVar("Lease", bound=Activation)


def start(
    settings: WebSettings,
    request: Any,
    *,
    cookie_header: Headers,
    authorization: Headers,
    lease: type[Lease] = Activation,  # type: ignore[assignment]
) -> Lease | Rejection:
    """Resolve and activate one request's end user (:func:`begin` of :func:`resolve`).

    A repeat of earlier raw header values (the common request) is one dict
    lookup in the resolutions :func:`~deepsec.web.resolve` remembered (only
    valid inputs within ``max_size`` are; anything malformed goes through
    ``resolve`` and warns every time).  ``lease``: the
    :class:`~deepsec.context.Activation` subclass to activate with (an
    adapter may keep its per-request state in the same object); it is made
    as :func:`~deepsec.context.new_activation` makes one, calling the class
    without arguments (a lease class has no ``__init__`` or ``__new__`` but
    object's), and a class it refuses is refused here (``TypeError``).
    The two header values are keyword-only: swapped, they would name
    another end user without any error.
    """
    _check_lease_class(lease)  # (off the adapters' request paths: they call _start)
    return _start(settings, request, cookie_header, authorization, lease)


def _start(
    settings: WebSettings,
    request: Any,
    cookie_header: Headers,
    authorization: Headers,
    lease: type[Lease] = Activation,  # type: ignore[assignment]
) -> Lease | Rejection:
    """:func:`start` for deepsec's adapters, which call it on every request.

    Positional, because CPython 3.11 sets up the frame of a call that passes
    keywords, or leaves a keyword-only default, more slowly (about 700
    instructions a Django request).  The hot path, hence inlined.
    """
    try:
        target = settings._by_raw.get((cookie_header, authorization))
    except TypeError:  # a repeated field is a list: not hashable, not remembered
        target = None
    if target is None:
        # (No end user is activated too: a request never inherits a context.)
        target = _activated(
            resolve(settings, request, cookie_header=cookie_header, authorization=authorization)
        )
    if type(target) is Rejection:
        return rejected(target)
    # The opt-in pseudonym goes on the request's (server) span here, where the
    # resolved end user becomes the request's: a keyed hash, never the identity.
    if settings.record_end_user:
        telemetry.record_end_user(settings.record_end_user, target)
    # resolve() only yields validated contexts: skip activate()'s type check.
    # new_activation(target, lease), written out: one Python call fewer on
    # every adapter's request (docs/performance.md).  The lease classes given
    # here are deepsec's own, or checked by start().
    activation = lease()
    activation.context = target
    activation.active = True
    activation._children = None
    activation._token = _current.set(activation)
    return activation


async def start_async(
    settings: WebSettings, request: Any, *, cookie_header: Headers, authorization: Headers
) -> Activation | Rejection:
    """:func:`start`, then :func:`fetch_tokens` when :func:`needs_tokens`."""
    outcome = _start(settings, request, cookie_header, authorization)
    if isinstance(outcome, Activation) and needs_tokens(outcome):
        return await fetch_tokens(outcome, settings)
    return outcome


def needs_tokens(outcome: Activation) -> bool:
    """Whether an async adapter must await :func:`fetch_tokens` before the app runs.

    A plain function, so the common cases (no end user; no connection used
    ``end_user_sec_params`` yet, so ``prepare()`` has nothing to do) cost no
    coroutine.  The driver hook registers each configuration it serves.
    """
    return outcome.context.identity is not None and bool(TOKEN_CONFIGS)


async def fetch_tokens(outcome: Lease, settings: WebSettings) -> Lease | Rejection:
    """Fetch the end user's tokens off the event loop; a failure ends ``outcome``.

    asyncio connections never fetch a token inside a statement, so the
    tokens must be cached before the app runs; a failure is answered now.
    """
    try:
        await prepare(outcome.context)
    except DeepSecError as exc:
        outcome.end()
        rejection = answer(exc, settings)
        if rejection is None:
            raise
        return rejection
    except BaseException:
        # Cancelled, or a custom token source's own error: the request does
        # not run, so its end user must not stay current in this task.
        outcome.end()
        raise
    return outcome


def answer(exc: BaseException, settings: WebSettings) -> Rejection | None:
    """The response for an error raised while serving a request; ``None``: not ours.

    Logs one WARNING without any token or secret: deepsec's messages never
    hold one, and the driver's ORA-52601 text is not logged at all.
    """
    rejection = rejection_for_error(exc, settings)
    if rejection is None:
        return None
    if isinstance(exc, TokenAcquisitionError):
        # The provider's fields only: its error_description may name the end user.
        log.warning(
            "answering %s (%s): %s error=%s status=%s correlation_id=%s",
            rejection.status,
            rejection.reason,
            type(exc).__name__,
            exc.error,
            exc.status,
            exc.correlation_id,
        )
    elif isinstance(exc, DeepSecError):
        log.warning("answering %s (%s): %s", rejection.status, rejection.reason, exc)
    else:
        log.warning("answering %s: the database rejected the end user's token", rejection.status)
    return rejected(rejection)
