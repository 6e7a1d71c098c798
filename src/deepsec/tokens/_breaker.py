"""A circuit breaker for the shared token cache's Redis: skip it while it fails.

Internal module; :class:`CircuitBreaker` is public through
:mod:`deepsec.tokens.shared`.  Redis is an optimisation, never a dependency:
while it fails, requests go on with the in-process cache and direct fetches,
one WARNING is logged per outage, and probes at growing intervals (from
:data:`BREAKER_FIRST`, doubling up to :data:`BREAKER_MAX`) find it again
within seconds of its return.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["BREAKER_FIRST", "BREAKER_MAX", "DENY", "PASS", "PROBE", "CircuitBreaker"]

logger = logging.getLogger("deepsec.tokens")

#: First and longest pause (seconds) of the circuit breaker before a probe.
BREAKER_FIRST = 1.0
BREAKER_MAX = 10.0


class CircuitBreaker:
    """Skips Redis while it is failing; one WARNING per outage.

    Closed: every call goes to Redis.  After a failure it opens for a pause;
    then one caller probes while the others still skip.  A failed probe
    doubles the pause (up to :data:`BREAKER_MAX`); calls that were already in
    flight when it opened do not (a burst of them would otherwise push the
    next probe out to the maximum at once).  Only the probe's success closes
    it, not the late success of a call sent before it opened: that says
    nothing of Redis now, and closing on it would log a second outage when
    the next call fails.

    ``problem`` and ``fixed`` are the log messages (``%s``: where, then the
    exception's type name), so one class serves "unreachable" and "refuses
    writes".
    """

    def __init__(
        self,
        where: str,
        problem: str = "shared token cache at %s is unavailable (%s); serving tokens from "
        "the in-process cache and the identity provider until it is back",
        fixed: str = "shared token cache at %s is reachable again; using it",
    ) -> None:
        self.where = where
        self._problem = problem
        self._fixed = fixed
        self._lock = threading.Lock()
        self._open_until = 0.0  # 0.0: closed
        self._pause = BREAKER_FIRST
        self._probing = False
        #: Number of outages seen (closed -> open transitions).
        self.outages = 0

    @property
    def closed(self) -> bool:
        """True while Redis is believed healthy."""
        return self._open_until == 0.0

    def admit(self) -> int:
        """:data:`PASS` (closed), :data:`PROBE` (this call probes) or :data:`DENY`."""
        if self._open_until == 0.0:
            return PASS
        with self._lock:
            if self._open_until == 0.0:
                return PASS
            if self._probing or time.monotonic() < self._open_until:
                return DENY
            self._probing = True
            return PROBE

    def success(self, probe: bool = False) -> None:
        """A Redis call worked; ``probe``: it was this breaker's probe (see :meth:`admit`)."""
        if not probe or self._open_until == 0.0:
            return  # (closed, or a late call's answer: see the class docstring)
        with self._lock:
            if self._open_until == 0.0 or not self._probing:
                return
            self._open_until = 0.0
            self._pause = BREAKER_FIRST
            self._probing = False
        logger.info(self._fixed, self.where)

    def abandon(self) -> None:
        """A probe ended without an answer (cancelled): let another caller probe."""
        with self._lock:
            self._probing = False

    def failure(self, exc: BaseException, probe: bool = False) -> bool:
        """A Redis call failed; returns True when this opened the breaker.

        ``probe``: the call was this breaker's probe (see :meth:`admit`).
        """
        with self._lock:
            opened = self._open_until == 0.0
            if opened:
                self._pause = BREAKER_FIRST
                self.outages += 1
                self._open_until = time.monotonic() + self._pause
            elif probe:
                self._pause = min(self._pause * 2, BREAKER_MAX)
                self._open_until = time.monotonic() + self._pause
                self._probing = False
            # else: a call in flight when the breaker opened; changes nothing.
        if opened:
            # The exception's type only: its text may name hosts or echo replies.
            logger.warning(self._problem, self.where, type(exc).__name__)
        return opened


#: :meth:`CircuitBreaker.admit` answers.
DENY, PASS, PROBE = 0, 1, 2
