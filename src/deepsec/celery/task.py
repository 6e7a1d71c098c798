"""``EndUserTask``: the base class of tasks that run as the end user who published them."""

from __future__ import annotations

from typing import Any

import celery
from celery.utils import uuid

from .publish import collect_failures, precheck, raise_failures
from .settings import settings_for_app
from .worker import eager_run, pending_error

__all__ = ["EndUserTask"]


class EndUserTask(celery.Task):  # type: ignore[misc]  # celery is untyped
    """Base class of tasks that run as the end user who published them.

    Without :func:`~deepsec.celery.install`, the signing key comes from the
    app's ``deepsec_signing_key`` setting (else Django's ``SECRET_KEY``),
    strict mode from ``deepsec_strict`` and the maximum header age from
    ``deepsec_max_age``.  ``before_start`` raises
    :class:`~deepsec.celery.EndUserExpired` or
    :class:`~deepsec.celery.EndUserHeaderRefused` before the body runs; it is
    outside ``run()``, so ``autoretry_for`` never sees them.
    """

    #: Tells deepsec.celery's signal handlers this is an EndUserTask.
    _deepsec_end_user_task = True

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        """Publish as Celery does; what cannot be signed fails here, in the caller.

        Raises:
            deepsec.ConfigError: no signing key for the app.
            TypeError: an argument has no canonical form (nothing is published).
            EndUserNotSigned: signing failed while publishing.
        """
        settings_for_app(self.app)
        precheck(args, kwargs)
        with collect_failures() as failures:
            result = super().apply_async(args, kwargs, *rest, **options)
        raise_failures(failures, str(self.name))
        return result

    def apply(
        self,
        args: Any = None,
        kwargs: Any = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        """Run eagerly in the caller's thread and scope (marked here, not by the message)."""
        task_id = task_id or uuid()
        with eager_run(task_id):
            return super().apply(
                args, kwargs, link=link, link_error=link_error, task_id=task_id, **options
            )

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Fail the task before its body when its end user was refused."""
        error = pending_error(task_id)
        if error is not None:
            raise error
        super().before_start(task_id, args, kwargs)
