"""The token cache's worker threads: background refreshes and asyncio fetches.

Internal module.  Refresh-ahead jobs run on a few daemon threads fed from a
queue (:class:`_Refresher`), so a hit never waits for one.  Fetches started
by :meth:`~deepsec.tokens.cache.TokenCache.aget` (and the shared cache's
Redis calls on asyncio) run on a dedicated pool, not the loop's default
executor: slow fetches must not starve the app's own ``run_in_executor`` work.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("deepsec.tokens")


class _Refresher:
    """A few daemon threads running background refreshes from a queue."""

    def __init__(self, max_workers: int = 4) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._max = max_workers
        self._workers = 0
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0 and self._workers < self._max
            if spawn:
                self._workers += 1
        self._queue.put(job)
        if spawn:
            threading.Thread(target=self._run, name="deepsec-token-refresh", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._queue.get(timeout=30.0)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if not self._queue.empty():
                        # submit() saw this worker idle and queued a job for it.
                        continue
                    self._workers -= 1
                return
            with self._lock:
                self._idle -= 1
            if job is None:  # pragma: no cover - not used
                return
            try:
                job()
            except BaseException:  # pragma: no cover - jobs handle their own errors
                logger.exception("background token refresh crashed")


_refresher = _Refresher()

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _fetch_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run :meth:`TokenCache.aget` fetches (created on first use)."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=32, thread_name_prefix="deepsec-token-fetch"
                )
    return _executor


def _background(fn: Any, *args: Any) -> None:
    """Run ``fn`` in deepsec's worker threads; never on the caller's path."""
    with contextlib.suppress(RuntimeError):  # interpreter shutting down
        _fetch_executor().submit(fn, *args)
