"""The publishing side: sign the current end user into every message of a deepsec app.

``before_task_publish`` gets the message's headers and body (args, kwargs and
the follow-up tasks); the header signed here binds the end user to both.
Celery's signals swallow a receiver's exceptions, so a signing failure is
recorded per thread and :class:`~deepsec.celery.EndUserTask` raises it to its
caller; it also checks what it can before publishing (:func:`precheck`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import celery

from ..context import current_context
from .errors import EndUserNotSigned
from .settings import (
    Settings,
    installed,
    is_end_user_task,
    known_apps,
    only_settings,
    settings_for_app,
)
from .signing import HEADER, body_digest, sign
from .worker import publishing_tainted

__all__ = ["collect_failures", "on_before_publish", "precheck", "raise_failures"]

log = logging.getLogger("deepsec.celery")
_local = threading.local()


def _publishing_settings(task_name: str) -> Settings | None:
    """The settings of the app that owns ``task_name``, if that app is ours."""
    apps = [*known_apps(), celery.current_app._get_current_object()]
    for app in apps:
        task = app._tasks.get(task_name)  # the registry as is: no finalize here
        if task is None:
            continue
        if app in installed:
            return installed[app]
        # Known to an app that is not ours: only its EndUserTask tasks are signed.
        return settings_for_app(app) if is_end_user_task(task) else None
    # send_task() by name, for a task this process does not import: only
    # unambiguous when every installed app signs the same way.
    return only_settings()


def precheck(args: Any, kwargs: Any) -> None:
    """Fail before publishing when the end user or arguments cannot be signed.

    Raises:
        TypeError: an argument has no canonical form (names its type only).
    """
    body_digest(args, kwargs, None)


@contextmanager
def collect_failures() -> Iterator[list[str]]:
    """Collect, in this thread, the ids of messages published without their header."""
    previous: list[str] | None = getattr(_local, "failures", None)
    failures: list[str] = []
    _local.failures = failures
    try:
        yield failures
    finally:
        _local.failures = previous


def on_before_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    body: Any = None,
    **_: Any,
) -> None:
    """``before_task_publish``: replace any end-user header with one signed for this message."""
    if headers is None or not sender:
        return
    # Never a caller's (apply_async(headers=...)): removed first, so that a
    # failure below leaves the message with no header rather than a forged one.
    headers.pop(HEADER, None)
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
    try:
        args, kwargs, embed = body
        # Inside a task whose own header was refused (or whose end user had
        # expired), what it publishes -- its errbacks too -- is marked
        # tainted: signing it as "no end user" would launder it.
        tainted = publishing_tainted()
        ctx = current_context()
        headers[HEADER] = sign(
            settings.key,
            str(task_id),
            str(task_name),
            ctx if ctx.identity is not None else None,
            body_digest(args, kwargs, embed),
            time.time(),
            tainted=tainted,
        )
    except Exception as exc:
        failures: list[str] | None = getattr(_local, "failures", None)
        if failures is not None:
            failures.append(str(task_id))
        log.error(
            "task %s[%s]: its end user could not be signed into the message (%s); "
            "it goes out with no end-user header",
            sender,
            task_id,
            type(exc).__name__,
        )


def raise_failures(failures: list[str], task_name: str) -> None:
    """Raise :class:`EndUserNotSigned` when a publish of this call failed to sign."""
    if failures:
        raise EndUserNotSigned(
            f"task {task_name}[{failures[0]}]: the end user could not be signed into the "
            "message, which went out without one (it runs with no end user, or fails "
            "in strict mode); see the ERROR on the deepsec.celery logger"
        )
