"""Celery tasks that run as the end user who queued them (extra ``celery``).

``deepsec.celery.install(app, signing_key=...)`` makes every task of ``app``
carry the end user current when it is published (identity, data roles,
attributes) in a signed message header bound to the message body, and run
inside that end user's scope on the worker.  :class:`EndUserTask` does the
same for the tasks that use it as their base.  See ``docs/background-jobs.md``
for the whole story: signing keys, header age, token lifetimes, strict mode,
eager tasks and asyncio task bodies.

Modules: :mod:`.signing` (the header), :mod:`.settings` (keys and options),
:mod:`.publish` (publisher side), :mod:`.worker` (worker side), :mod:`.task`
(``EndUserTask``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    from celery import signals
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "deepsec.celery needs Celery: pip install 'oracledb-deepsec[celery]'"
    ) from exc

from ..prefetch import prepare
from .errors import EndUserExpired, EndUserHeaderRefused, EndUserNotSigned
from .publish import on_before_publish
from .settings import DEFAULT_MAX_AGE, installed, resolve
from .signing import CLOCK_SKEW, HEADER
from .task import EndUserTask
from .worker import on_postrun, on_prerun

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_MAX_AGE",
    "HEADER",
    "EndUserExpired",
    "EndUserHeaderRefused",
    "EndUserNotSigned",
    "EndUserTask",
    "install",
    "run_async",
]

log = logging.getLogger("deepsec.celery")
T = TypeVar("T")


def install(
    app: Any,
    *,
    signing_key: str | bytes | None = None,
    strict: bool = False,
    max_age: float | None = None,
) -> None:
    """Make every task of ``app`` carry its publisher's end user and run as them.

    Args:
        app: the Celery application (publishers and workers both call this).
        signing_key: the secret that signs end-user headers; every publisher
            and worker of the app needs the same one.  Default: the app's
            ``deepsec_signing_key`` setting, else Django's ``SECRET_KEY`` when
            Django is configured.
        strict: fail a task whose end-user header is missing, unsigned,
            tampered, foreign or too old (:class:`EndUserHeaderRefused`)
            instead of running it with no end user and logging a WARNING.
        max_age: seconds a header stays valid after publishing (default: the
            app's ``deepsec_max_age``, else :data:`DEFAULT_MAX_AGE`); it
            bounds how long a copied message can be replayed.

    Tasks created after this call, Celery's own built-in ones
    (``celery.chord_unlock``...) included, get :class:`EndUserTask` as their
    base, so an expired end user fails them before their body runs and what
    they publish keeps the end user.  Call it right after creating the app,
    before tasks are defined or the app is finalized.

    Raises:
        ConfigError: no signing key, one that is too short (never echoed),
            or a bad ``max_age``.
    """
    installed[app] = resolve(app, signing_key, strict, max_age)
    base = app.Task
    if not (isinstance(base, type) and issubclass(base, EndUserTask)):
        app.Task = type("Task", (EndUserTask, base), {"__module__": base.__module__})
    if app.finalized:
        log.warning(
            "deepsec.celery.install() ran after the Celery app was finalized; tasks created "
            "before it carry end users but do not fail early on an expired one"
        )
    _connect()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run an async task body with ``asyncio.run``, as the task's end user.

    Like ``async with deepsec.end_user(...)``, it first fetches the end
    user's database-access tokens off the event loop (``await
    deepsec.prepare()``), so asyncio connections find them cached.
    """

    async def prepared() -> T:
        try:
            await prepare()
        except BaseException:
            coro.close()
            raise
        return await coro

    return asyncio.run(prepared())


_connected = False
_connect_lock = threading.Lock()


def _connect() -> None:
    global _connected
    with _connect_lock:
        if _connected:
            return
        # weak=False: module-level functions, connected once per process.
        signals.before_task_publish.connect(on_before_publish, weak=False)
        signals.task_prerun.connect(on_prerun, weak=False)
        signals.task_postrun.connect(on_postrun, weak=False)
        _connected = True


_connect()
