"""The typed errors of ``deepsec.celery`` (messages name the task, never the end user)."""

from __future__ import annotations

from ..errors import DeepSecError

__all__ = ["EndUserExpired", "EndUserHeaderRefused", "EndUserNotSigned"]


class EndUserExpired(DeepSecError):
    """The end user's token had expired (or had an invalid ``exp``) when the task started.

    Raised before the task body runs, so none of its statements reaches the
    database, and outside ``run()``, so ``autoretry_for`` never retries it.
    The message names the task, never the end user or the token.
    """


class EndUserHeaderRefused(DeepSecError):
    """Strict mode: the message's end-user header is missing, unsigned, tampered or foreign.

    Raised before the task body runs.  Without strict mode such a task runs
    with no end user and one WARNING is logged on ``deepsec.celery``.
    """


class EndUserNotSigned(DeepSecError):
    """The publisher's end user could not be signed into a message.

    Raised to the caller of ``apply_async()``/``delay()``.  When it comes
    from the publish signal the message has already gone out without an
    end-user header, so it runs with no end user (or fails in strict mode).
    """
