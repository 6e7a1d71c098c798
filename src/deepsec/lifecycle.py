"""One request lifecycle for every web adapter.

An adapter translates its framework's request into raw header values and its
response machinery into "send this :class:`~deepsec.web.Rejection`"; the
steps in between live here once:

1. :func:`start` (or :func:`start_async`, which also fetches the tokens off
   the event loop): resolve the identity (:func:`deepsec.web.resolve`) and
   activate it -- also "no end user", so a request never inherits a context --
   or refuse the request;
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
from typing import Any

from . import hook as _hook
from . import telemetry
from .context import Activation, EndUserContext, activate
from .errors import DeepSecError, TokenAcquisitionError
from .hook import prepare
from .web import Rejection, Resolution, WebSettings, rejection_for_error, resolve

__all__ = ["answer", "begin", "rejected", "start", "start_async"]

log = logging.getLogger("deepsec.web")

Headers = str | Sequence[str] | None


def rejected(rejection: Rejection) -> Rejection:
    """The one place every refused request passes; returns ``rejection``.

    Counts it (``deepsec.requests.rejected``, by status and ``reason``).
    """
    telemetry.record_rejection(rejection)
    return rejection


def _activate(resolution: Resolution, settings: WebSettings | None) -> Activation:
    # The opt-in pseudonym goes on the request's (server) span here, where the
    # resolved end user becomes the request's: a keyed hash, never the identity.
    if settings is not None and settings.record_end_user:
        telemetry.record_end_user(settings.record_end_user, resolution.context)
    return activate(resolution.context)


def begin(resolution: Resolution, settings: WebSettings | None = None) -> Activation | Rejection:
    """Activate a resolution's context (``None`` too), or return its rejection.

    ``settings`` (those it was resolved with) apply ``record_end_user``.
    """
    if resolution.rejection is not None:
        return rejected(resolution.rejection)
    return _activate(resolution, settings)


def start(
    settings: WebSettings, request: Any, *, cookie_header: Headers, authorization: Headers
) -> Activation | Rejection:
    """Resolve and activate one request's end user (sync frameworks)."""
    return begin(
        resolve(settings, request, cookie_header=cookie_header, authorization=authorization),
        settings,
    )


async def start_async(
    settings: WebSettings, request: Any, *, cookie_header: Headers, authorization: Headers
) -> Activation | Rejection:
    """:func:`start`, then fetch the end user's tokens off the event loop.

    asyncio connections never fetch a token inside a statement, so the
    tokens must be cached before the app runs; a failure is answered now.
    """
    resolution = resolve(
        settings, request, cookie_header=cookie_header, authorization=authorization
    )
    if resolution.rejection is not None:
        return rejected(resolution.rejection)
    outcome = _activate(resolution, settings)
    if outcome.context.identity is not None and _may_need_tokens():
        try:
            await prepare(outcome.context)
        except DeepSecError as exc:
            outcome.end()
            rejection = answer(exc, settings)
            if rejection is None:
                raise
            return rejection
    return outcome


def _may_need_tokens() -> bool:
    # prepare() has nothing to do before any connection used end_user_sec_params
    # (the driver hook registers each configuration it serves); skipping the
    # call saves a coroutine per request.  Unknown internals: always prepare.
    configs = getattr(_hook, "_configs_in_use", None)
    return configs is None or bool(configs)


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


def context_of(outcome: Activation | Rejection) -> EndUserContext | None:
    """The end user of a started request (``None``: none, or refused)."""
    if type(outcome) is Activation and outcome.context.identity is not None:
        return outcome.context
    return None
