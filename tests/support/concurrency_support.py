"""Shared helper of the concurrency tests: start many threads at once, wait for all."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any


def run_threads(
    target: Callable[..., object],
    *,
    count: int | None = None,
    each: Iterable[Any] | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``target()`` in ``count`` threads, or ``target(item)`` in one thread per item.

    Every thread is started before any is joined (each join waits up to
    ``timeout`` seconds).  Workers report their own failures: an exception in
    a thread does not reach the caller.
    """
    if (count is None) == (each is None):
        raise TypeError("give count or each")
    args = [()] * count if count is not None else [(item,) for item in each or ()]
    threads = [threading.Thread(target=target, args=a) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
