"""Failure memory: a failed fetch is re-raised per key for a short window.

Internal module; the constants are public through :mod:`deepsec.tokens.cache`.
Requests queued behind a failing fetch fail fast instead of fetching again in
waves, and a provider that is already failing is spared.  A provider's
``Retry-After`` sets the window for that key only, within
[:data:`MIN_RETRY_AFTER`, :data:`MAX_RETRY_AFTER`], and every remembered
:class:`~deepsec.errors.TokenAcquisitionError` says in ``retry_after`` how
long is left.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

from ..errors import TokenAcquisitionError

__all__ = ["FAILURE_MEMORY", "MAX_RETRY_AFTER", "MIN_RETRY_AFTER", "FailureMemory"]

#: Seconds a failed fetch is remembered per key by the token sources (when
#: the provider sent no ``Retry-After``).
FAILURE_MEMORY = 5.0
#: Longest a provider's ``Retry-After`` is honoured (seconds).  MSAL honours
#: up to an hour: one throttled answer then failed every request long after
#: the provider had recovered.
MAX_RETRY_AFTER = 10.0
#: Shortest window a provider's ``Retry-After`` can set (seconds), so a queue
#: of callers behind a failed fetch still fails fast.
MIN_RETRY_AFTER = 1.0


def _recalled(exc: BaseException, left: float) -> BaseException:
    """A remembered failure to raise again: a copy with ``retry_after`` = time left.

    A copy, because concurrent callers raise it at the same time (each raise
    would otherwise add to one shared traceback).
    """
    if not isinstance(exc, TokenAcquisitionError):
        return exc
    try:
        again = copy.copy(exc)
    except Exception:  # a subclass that cannot be copied: share the original
        return exc
    again.retry_after = left
    again.__traceback__ = None
    return again


class FailureMemory:
    """Failed fetches per key, each until its window ends; bounded like the tokens.

    Not thread-safe: the cache calls it under its own lock.  ``clock`` is the
    cache's clock, passed on each call (tests move the cache's clock).
    """

    __slots__ = ("_failures",)

    def __init__(self) -> None:
        self._failures: dict[str, tuple[float, BaseException]] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def recall(self, key: str, clock: Callable[[], float]) -> BaseException | None:
        """The failure to raise for ``key`` (``retry_after``: time left), or ``None``."""
        failure = self._failures.get(key)
        if failure is not None:
            left = failure[0] - clock()
            if left > 0:
                return _recalled(failure[1], left)
            del self._failures[key]
        return None

    def remember(
        self,
        key: str,
        exc: BaseException,
        backoff: float,
        maxsize: int,
        clock: Callable[[], float],
    ) -> None:
        """Remember a failed fetch for ``key``: ``backoff`` seconds, or its ``Retry-After``.

        Sets ``retry_after`` of a :class:`TokenAcquisitionError` to the window
        really applied (``None`` when nothing is remembered), so what clients
        are told matches what the cache does.
        """
        if not isinstance(exc, Exception) or backoff <= 0:
            if isinstance(exc, TokenAcquisitionError):
                exc.retry_after = None
            return
        window = backoff
        if isinstance(exc, TokenAcquisitionError):
            hint = exc.retry_after
            if hint is not None and math.isfinite(hint):
                window = min(max(hint, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            exc.retry_after = window
        now = clock()
        if len(self._failures) >= maxsize:  # bounded like the tokens
            for stale in [k for k, (until, _) in self._failures.items() if until <= now]:
                del self._failures[stale]
            while len(self._failures) >= maxsize:
                del self._failures[next(iter(self._failures))]
        self._failures.pop(key, None)
        self._failures[key] = (now + window, exc)

    def forget(self, key: str) -> None:
        """Forget the failure remembered for ``key``, if any."""
        self._failures.pop(key, None)

    def clear(self) -> None:
        """Forget every remembered failure."""
        self._failures.clear()
