"""Celery tasks that run as the end user who queued them (extra ``celery``).

``deepsec.celery.install(app, signing_key=...)`` makes every task of ``app``
carry the end user current when it is published (identity, data roles,
attributes) in a signed message header, and run inside that end user's scope
on the worker.  :class:`EndUserTask` does the same for the tasks that use it
as their base.  See ``docs/background-jobs.md`` for the whole story: signing
keys, token lifetimes, strict mode, eager tasks and asyncio task bodies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

try:
    import celery
    from celery import signals
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "deepsec.celery needs Celery: pip install 'oracledb-deepsec[celery]'"
    ) from exc

from ..context import (
    Activation,
    EndUserContext,
    _current,
    activate,
    current_context,
    deactivate,
)
from ..errors import ConfigError, DeepSecError
from ..hook import prepare
from ..tokens.cache import jwt_expiry
from .signing import HEADER, MIN_KEY_BYTES, HeaderRefused, derive_key, sign, verify

__all__ = [
    "HEADER",
    "EndUserExpired",
    "EndUserHeaderRefused",
    "EndUserTask",
    "install",
    "run_async",
]

log = logging.getLogger("deepsec.celery")
T = TypeVar("T")


class EndUserExpired(DeepSecError):
    """The end user's token had expired when the task started.

    Raised before the task body runs, so none of its statements reaches the
    database, and outside ``run()``, so ``autoretry_for`` never retries it.
    The message names the task, never the end user or the token.
    """


class EndUserHeaderRefused(DeepSecError):
    """Strict mode: the message's end-user header is missing, unsigned, tampered or foreign.

    Raised before the task body runs.  Without strict mode such a task runs
    with no end user and one WARNING is logged on ``deepsec.celery``.
    """


@dataclass(frozen=True)
class _Settings:
    key: bytes = field(repr=False)
    strict: bool


# Apps set up with install(); and apps whose EndUserTask tasks read their
# settings from the app's configuration (resolved once per app).
_installed: weakref.WeakKeyDictionary[Any, _Settings] = weakref.WeakKeyDictionary()
_from_conf: weakref.WeakKeyDictionary[Any, _Settings] = weakref.WeakKeyDictionary()


def _django_secret_key() -> str | bytes | None:
    """Django's ``SECRET_KEY`` when Django is configured in this process, else ``None``."""
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return None
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    try:
        key = getattr(settings, "SECRET_KEY", None)
    except ImproperlyConfigured:
        return None
    return key if isinstance(key, (str, bytes)) and key else None


def _settings(app: Any, signing_key: str | bytes | None, strict: bool) -> _Settings:
    """Resolve the signing key: explicit, else ``deepsec_signing_key``, else Django's."""
    candidates = (
        ("signing_key", signing_key),
        ("deepsec_signing_key", app.conf.get("deepsec_signing_key")),
        ("Django SECRET_KEY", _django_secret_key()),
    )
    for name, value in candidates:
        if value is None:
            continue
        if not isinstance(value, (str, bytes)):
            raise ConfigError(
                f"{name} must be a str or bytes, not {type(value).__name__}", where="deepsec.celery"
            )
        size = len(value.encode("utf-8") if isinstance(value, str) else value)
        if size < MIN_KEY_BYTES:
            # The length only: the value is a secret.
            raise ConfigError(
                f"{name} is {size} bytes long; use a random key of at least "
                f"{MIN_KEY_BYTES} bytes (32 or more recommended)",
                where="deepsec.celery",
            )
        return _Settings(derive_key(value), strict)
    raise ConfigError(
        "no signing key for end-user headers: pass install(app, signing_key=...), set "
        "the app's deepsec_signing_key setting, or configure Django (its SECRET_KEY is used)",
        where="deepsec.celery",
    )


def _settings_for_app(app: Any) -> _Settings:
    found = _installed.get(app) or _from_conf.get(app)
    if found is None:
        found = _settings(app, None, bool(app.conf.get("deepsec_strict", False)))
        _from_conf[app] = found
    return found


def install(app: Any, *, signing_key: str | bytes | None = None, strict: bool = False) -> None:
    """Make every task of ``app`` carry its publisher's end user and run as them.

    Args:
        app: the Celery application (publishers and workers both call this).
        signing_key: the secret that signs end-user headers; every publisher
            and worker of the app needs the same one.  Default: the app's
            ``deepsec_signing_key`` setting, else Django's ``SECRET_KEY`` when
            Django is configured.
        strict: fail a task whose end-user header is missing, unsigned,
            tampered or foreign (:class:`EndUserHeaderRefused`) instead of
            running it with no end user and logging a WARNING.

    Tasks created after this call get :class:`EndUserTask` as their base, so
    an expired end user fails them before their body runs.  Call it right
    after creating the app, before tasks are defined or the app is finalized.

    Raises:
        ConfigError: no signing key, or one that is too short (never echoed).
    """
    _installed[app] = _settings(app, signing_key, strict)
    base = app.Task
    if not (isinstance(base, type) and issubclass(base, EndUserTask)):
        app.Task = type("Task", (EndUserTask, base), {"__module__": base.__module__})
    if app.finalized:
        log.warning(
            "deepsec.celery.install() ran after the Celery app was finalized; tasks created "
            "before it carry end users but do not fail early on an expired one"
        )
    _connect()


# -- publishing ------------------------------------------------------------------


def _current_app() -> Any:
    return celery.current_app._get_current_object()


def _publishing_settings(task_name: str) -> _Settings | None:
    """The settings of the app that owns ``task_name``, if that app is ours."""
    # EndUserTask.apply_async() registered its app in _from_conf already.
    apps = [*list(_installed.keys()), *list(_from_conf.keys()), _current_app()]
    for app in apps:
        task = app._tasks.get(task_name)  # the registry as is: no finalize here
        if task is None:
            continue
        if app in _installed:
            return _installed[app]
        # Known to an app that is not ours: only its EndUserTask tasks are signed.
        return _settings_for_app(app) if isinstance(task, EndUserTask) else None
    # send_task() by name, for a task this process does not import.
    installed = list(_installed.values())
    return installed[0] if len(installed) == 1 else None


def _on_before_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **_: Any,
) -> None:
    if headers is None or not sender:
        return
    settings = _publishing_settings(sender)
    if settings is None:
        return
    task_id, task_name = headers.get("id"), headers.get("task")
    if not task_id or not task_name:
        log.warning(
            "task %s is published with Celery task protocol 1; deepsec.celery needs "
            "protocol 2 (the default), so it runs with no end user",
            sender,
        )
        return
    ctx = current_context()
    # Always replace: a header passed in apply_async(headers=...) is not ours.
    headers[HEADER] = sign(settings.key, task_id, task_name, ctx if ctx.identity else None)


# -- running -----------------------------------------------------------------------


@dataclass
class _Run:
    task_id: str
    #: Restores the context that was current before the task.
    end: Callable[[], None]
    #: The task's own scope (None for an eager task: it runs in its caller's).
    activation: Activation | None
    error: DeepSecError | None


_local = threading.local()
_running: dict[str, Activation] = {}  # task id -> activation, for revoke
_running_lock = threading.Lock()


def _stack() -> list[_Run]:
    stack: list[_Run] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _running_settings(task: Any) -> _Settings | None:
    app = task.app
    if app in _installed:
        return _installed[app]
    if isinstance(task, EndUserTask):
        return _settings_for_app(app)
    return None


def _verdict(
    task: Any, request: Any, settings: _Settings
) -> tuple[EndUserContext | None, DeepSecError | None]:
    """Who the task runs as, or the error that fails it (message never has a secret)."""
    task_id, name = str(request.id), str(task.name)
    try:
        # The task that actually runs is what the signature must cover.
        ctx = verify(settings.key, request.get(HEADER), task_id, name)
    except HeaderRefused as exc:
        if settings.strict:
            return None, EndUserHeaderRefused(
                f"task {name}[{task_id}] refused: its end-user header {exc}"
            )
        # A broker writer cannot make a task run as anyone: it runs as no one.
        log.warning("task %s[%s]: end-user header %s; it runs with no end user", name, task_id, exc)
        return None, None
    if ctx is not None and isinstance(ctx.identity, str):
        exp = jwt_expiry(ctx.identity)
        now = time.time()
        if exp is not None and exp <= now:
            return None, EndUserExpired(
                f"the end user's token expired {int(now - exp)} s before task "
                f"{name}[{task_id}] started; size token lifetimes and queues so tasks "
                "start before their publisher's token expires"
            )
    return ctx, None


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None or task_id is None:
        return
    settings = _running_settings(task)
    if settings is None:
        return
    request = task.request
    if request.is_eager:
        # Same process, no broker: the task runs in its caller's scope, exactly
        # as it is (whatever kind of scope that is), and whatever the task
        # changes in it (set_end_user_identity...) is undone when it ends.
        token = _current.set(_current.get())
        _stack().append(_Run(task_id, lambda: _current.reset(token), None, None))
        return
    try:
        ctx, error = _verdict(task, request, settings)
        # The header holds the token: keep it out of task.request, which task
        # code and error reporters read and log.
        request.__dict__.pop(HEADER, None)
    except Exception:
        # Whatever went wrong while judging the header, it is not trusted.
        log.warning("task %s[%s]: end-user header could not be verified", task.name, task_id)
        ctx, error = None, None
        if settings.strict:
            error = EndUserHeaderRefused(f"task {task.name}[{task_id}] refused: unverifiable")
    if error is not None and not isinstance(task, EndUserTask):
        log.error(
            "task %s[%s]: %s; its base class is not deepsec.celery.EndUserTask, so it "
            "cannot be failed early and runs with no end user",
            task.name,
            task_id,
            type(error).__name__,
        )
    activation = activate(ctx)
    _stack().append(_Run(task_id, lambda: deactivate(activation), activation, error))
    with _running_lock:
        _running[task_id] = activation


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    stack = _stack()
    if not any(run.task_id == task_id for run in stack):
        return
    while stack:
        run = stack.pop()
        with _running_lock:
            if run.activation is not None and _running.get(run.task_id) is run.activation:
                del _running[run.task_id]
        run.end()
        if run.task_id == task_id:
            return


def _on_revoked(request: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    with _running_lock:
        activation = _running.get(task_id) if task_id else None
    if activation is not None:
        # Called from the worker's main thread: end the scope's lease (the
        # task's thread sees no end user from now on); postrun restores the
        # contextvar in the task's own thread.
        activation.end()  # from another thread: only the lease ends


def _pending_error(task_id: str) -> DeepSecError | None:
    for run in reversed(_stack()):
        if run.task_id == task_id:
            return run.error
    return None


_connected = False
_connect_lock = threading.Lock()


def _connect() -> None:
    global _connected
    with _connect_lock:
        if _connected:
            return
        # weak=False: module-level functions, connected once per process.
        signals.before_task_publish.connect(_on_before_publish, weak=False)
        signals.task_prerun.connect(_on_prerun, weak=False)
        signals.task_postrun.connect(_on_postrun, weak=False)
        signals.task_revoked.connect(_on_revoked, weak=False)
        _connected = True


class EndUserTask(celery.Task):  # type: ignore[misc]  # celery is untyped
    """Base class of tasks that run as the end user who published them.

    Without :func:`install`, the signing key comes from the app's
    ``deepsec_signing_key`` setting (else Django's ``SECRET_KEY``) and strict
    mode from ``deepsec_strict``.  ``before_start`` raises
    :class:`EndUserExpired` or :class:`EndUserHeaderRefused` before the body
    runs; it is outside ``run()``, so ``autoretry_for`` never sees them.
    """

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        """Publish as Celery does; a missing signing key fails here, not on the worker."""
        _settings_for_app(self.app)
        return super().apply_async(*args, **kwargs)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Fail the task before its body when its end user was refused."""
        error = _pending_error(task_id)
        if error is not None:
            raise error
        super().before_start(task_id, args, kwargs)


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


_connect()
