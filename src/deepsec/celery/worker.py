"""The worker side: verify a task's end-user header and run the task in that end user's scope.

``task_prerun`` judges the header and opens the scope; ``task_postrun`` (sent
by Celery's tracer after success, failure and retry alike) ends it.  A task
that is revoked before it starts never starts, so it never gets a scope.  An
eager run (``EndUserTask.apply()``) is marked here by the task itself: the
message body can set ``request.is_eager``, so that flag is never trusted.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..context import EndUserContext, activate, deactivate, restore_point
from ..errors import DeepSecError
from ..tokens.cache import jwt_expiry
from .errors import EndUserExpired, EndUserHeaderRefused
from .settings import Settings, is_end_user_task, settings_for_task
from .signing import CLOCK_SKEW, EMBED_KEYS, HEADER, HeaderRefused, body_digest, verify

__all__ = ["eager_run", "on_postrun", "on_prerun", "pending_error", "publishing_tainted"]

log = logging.getLogger("deepsec.celery")


@dataclass
class _Run:
    task_id: str
    #: Restores the context that was current before the task.
    end: Callable[[], None]
    #: The header was refused or the end user expired: what the task
    #: publishes (errbacks included) is marked tainted, never signed as trusted.
    refused: bool
    error: DeepSecError | None


_local = threading.local()
# The id of the task EndUserTask.apply() is running eagerly in this context.
_eager_task: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "deepsec_celery_eager", default=None
)


def _stack() -> list[_Run]:
    stack: list[_Run] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextmanager
def eager_run(task_id: str) -> Iterator[None]:
    """Mark ``task_id`` as run eagerly, in the caller's scope, while the block runs."""
    token = _eager_task.set(task_id)
    try:
        yield
    finally:
        _eager_task.reset(token)


def publishing_tainted() -> bool:
    """Whether this thread runs inside a task whose header was refused or end user expired."""
    return any(run.refused for run in _stack())


def _expiry_error(ctx: EndUserContext | None, name: str, task_id: str) -> DeepSecError | None:
    if ctx is None or not isinstance(ctx.identity, str):
        return None
    try:
        exp = jwt_expiry(ctx.identity)
    except (OverflowError, ValueError):  # an integer too big for a float
        exp = math.nan
    if exp is None:
        return None
    if not math.isfinite(exp):
        return EndUserExpired(
            f"task {name}[{task_id}] refused: the end user's token has an invalid expiry"
        )
    now = time.time()
    if exp + CLOCK_SKEW <= now:
        return EndUserExpired(
            f"the end user's token expired {int(now - exp)} s before task "
            f"{name}[{task_id}] started; size token lifetimes and queues so tasks "
            "start before their publisher's token expires"
        )
    return None


def _verdict(
    task: Any, request: Any, settings: Settings
) -> tuple[EndUserContext | None, DeepSecError | None, bool]:
    """Who the task runs as, the error that fails it, and whether it was refused."""
    task_id, name = str(request.id), str(task.name)
    try:
        # What actually runs -- this task id and name, these arguments and
        # follow-up tasks, as decoded here -- is what the signature must cover.
        embed = {key: getattr(request, key, None) for key in EMBED_KEYS}
        try:
            body = body_digest(request.args, request.kwargs, embed)
        except TypeError:
            raise HeaderRefused("cannot be checked against the message body") from None
        ctx = verify(
            settings.key,
            request.get(HEADER),
            task_id,
            name,
            body,
            now=time.time(),
            max_age=settings.max_age,
        )
    except HeaderRefused as exc:
        if settings.strict:
            refusal = f"task {name}[{task_id}] refused: its end-user header {exc}"
            return None, EndUserHeaderRefused(refusal), True
        # A broker writer cannot make a task run as anyone: it runs as no one.
        log.warning("task %s[%s]: end-user header %s; it runs with no end user", name, task_id, exc)
        return None, None, True
    error = _expiry_error(ctx, name, task_id)
    if error is not None:
        return None, error, True
    return ctx, None, False


def on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """``task_prerun``: open the task's scope (or, eagerly, a layer of the caller's)."""
    if task is None or task_id is None:
        return
    settings = settings_for_task(task)
    if settings is None:
        return
    if _eager_task.get() == task_id:
        # Same process, no broker: the task runs in its caller's scope, exactly
        # as it is, and whatever the task changes in it (set_end_user_identity
        # ...) is undone when it ends.
        _stack().append(_Run(task_id, restore_point(), False, None))
        return
    request = task.request
    try:
        ctx, error, refused = _verdict(task, request, settings)
    except Exception:
        # Whatever went wrong while judging the header, it is not trusted.
        log.warning("task %s[%s]: end-user header could not be verified", task.name, task_id)
        ctx, error, refused = None, None, True
        if settings.strict:
            error = EndUserHeaderRefused(f"task {task.name}[{task_id}] refused: unverifiable")
    finally:
        # The header holds the token: keep it out of task.request, which task
        # code and error reporters read and log.
        request.__dict__.pop(HEADER, None)
    if error is not None and not is_end_user_task(task):
        log.error(
            "task %s[%s]: %s; its base class is not deepsec.celery.EndUserTask, so it "
            "cannot be failed early and runs with no end user",
            task.name,
            task_id,
            type(error).__name__,
        )
    activation = activate(ctx)
    _stack().append(_Run(task_id, lambda: deactivate(activation), refused, error))


def on_postrun(task_id: str | None = None, **_: Any) -> None:
    """``task_postrun``: end the task's scope (and any left open inside it)."""
    stack = _stack()
    if not any(run.task_id == task_id for run in stack):
        return
    while stack:
        run = stack.pop()
        run.end()
        if run.task_id == task_id:
            return


def pending_error(task_id: str) -> DeepSecError | None:
    """The error that must fail ``task_id`` before its body, if any."""
    for run in reversed(_stack()):
        if run.task_id == task_id:
            return run.error
    return None
