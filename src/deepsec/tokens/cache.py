"""The in-process token cache (L1) that every token source uses.

:class:`TokenCache` is shared by every token source (Entra ID, OCI IAM and
custom modules).  It gives:

* **expiry with a safety margin**: a token is served only while
  ``now < expires_at - min(skew, lifetime / 4)``, never about to expire;
* **refresh-ahead**: in the refresh window a hit still returns the valid
  token at once and schedules *one* background refresh; if it fails, the old
  token serves until it really expires;
* **single-flight**: N concurrent misses for one key, from threads
  (:meth:`TokenCache.get`) or asyncio tasks (:meth:`TokenCache.aget`), make
  one fetch and share its result (or its exception);
* **bounded size** (LRU) and a **lock-free hit path** (``bench/tokens.py``);
* **failure memory**: a failed fetch is never cached as success, but is
  re-raised per key for a short window (:data:`FAILURE_MEMORY`, or the
  provider's ``Retry-After`` within [:data:`MIN_RETRY_AFTER`,
  :data:`MAX_RETRY_AFTER`]); every :class:`~deepsec.errors.TokenAcquisitionError`
  says in ``retry_after`` when the cache will fetch again (other exceptions
  pass through unchanged).

Keys must hold no secret (build them with :func:`cache_key`).  The details,
with the numbers: ``docs/tokens.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import math
import threading
import time
from collections import OrderedDict

from .. import _jwt
from .. import telemetry as _telemetry
from ..errors import TokenAcquisitionError
from ._entry import Fetcher, FetchResult, _Entry, _Flight
from ._failures import FAILURE_MEMORY, MAX_RETRY_AFTER, MIN_RETRY_AFTER, FailureMemory
from ._keys import KeyMemo, cache_key
from ._pool import _fetch_executor, _refresher

__all__ = [
    "DEFAULT_REFRESH_AHEAD",
    "DEFAULT_SKEW",
    "FAILURE_MEMORY",
    "MAX_RETRY_AFTER",
    "MIN_RETRY_AFTER",
    "FetchResult",
    "Fetcher",
    "KeyMemo",
    "TokenCache",
    "cache_key",
    "jwt_expiry",
]

logger = logging.getLogger("deepsec.tokens")

#: Seconds before the provider's expiry at which a token stops being served
#: (capped at a quarter of the token's lifetime).
DEFAULT_SKEW = 30.0
#: Length of the refresh window before the (margin-adjusted) expiry, capped at
#: half the remaining lifetime.  With the default skew a refresh starts 270 s
#: before the provider's expiry, inside MSAL's 5-minute window in which it
#: treats a cached token as expired: so MSAL really goes to the network
#: instead of handing back the token we want to replace.
DEFAULT_REFRESH_AHEAD = 240.0

_time = time.time


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified), or ``None`` if it has none."""
    return _jwt.expiry(token)


class TokenCache:
    """A bounded, single-flight token cache with refresh-ahead.

    Args:
        maxsize: most entries kept; the least recently used is evicted first.
        skew: safety margin in seconds before the provider's expiry (capped at
            a quarter of the token's lifetime, so short-lived tokens work).
        refresh_ahead: length of the refresh window in seconds (capped at half
            the usable lifetime).  ``0`` disables refresh-ahead.
        failure_backoff: seconds a failed fetch is remembered (per key) and
            re-raised without a new fetch; ``0`` (default) remembers nothing.
            A :class:`~deepsec.errors.TokenAcquisitionError` whose
            ``retry_after`` was set by the source (the provider's
            ``Retry-After``) is remembered that long instead, within
            ``[MIN_RETRY_AFTER, MAX_RETRY_AFTER]``.
        wait_timeout: most seconds a caller waits for a fetch it did not start
            (``None``: no limit); then ``TokenAcquisitionError(error="timeout")``.
        name: shown in ``repr`` and log messages.

    Thread-safe and asyncio-safe.  Keys must be non-secret strings (use
    :func:`cache_key`).
    """

    #: Where lookups and provider calls are reported (:func:`token_cache_for` sets it).
    telemetry: _telemetry.TokenTelemetry = _telemetry.NO_TOKEN_TELEMETRY

    def __init__(
        self,
        maxsize: int = 10_000,
        *,
        skew: float = DEFAULT_SKEW,
        refresh_ahead: float = DEFAULT_REFRESH_AHEAD,
        failure_backoff: float = 0.0,
        wait_timeout: float | None = None,
        name: str = "tokens",
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.skew = skew
        self.refresh_ahead = refresh_ahead
        self.failure_backoff = failure_backoff
        self.wait_timeout = wait_timeout
        self.name = name
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, _Flight] = {}
        self._failures = FailureMemory()
        self._lock = threading.Lock()
        #: Number of fetches started (misses + background refreshes).
        self.fetches = 0
        #: Number of background refreshes that failed.
        self.refresh_failures = 0

    def __repr__(self) -> str:
        return f"TokenCache(name={self.name!r}, size={len(self._data)}, maxsize={self.maxsize})"

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    # --- the hit path: no lock ------------------------------------------------

    def peek(self, key: str, record: bool = True) -> str | None:
        """The cached token for ``key`` if still valid, else ``None``.

        Never does I/O and takes no lock.  It does not start a refresh (it has
        no fetch function of its own), except that an entry stored by
        :meth:`get`/:meth:`aget` and inside its refresh window is refreshed
        in the background with the fetch function it was stored with.
        ``record=False``: not a lookup of its own (a re-read right after
        :meth:`get` counted one), so no ``l1`` hit is recorded.
        """
        entry = self._data.get(key)
        if entry is None:
            return None
        now = _time()
        if now < entry.refresh_at:
            try:  # noqa: SIM105  (hot path: suppress() costs ~10x more)
                self._data.move_to_end(key)
            except KeyError:  # evicted meanwhile: still a valid token
                pass
            if record and self.telemetry.enabled:
                self.telemetry.hit()
            return entry.token
        if now < entry.expires_at:
            self._schedule_refresh(key, entry, now)
            if record and self.telemetry.enabled:
                self.telemetry.hit()
            return entry.token
        return None

    def peek_entry(self, key: str, record: bool = True) -> tuple[str, float] | None:
        """Like :meth:`peek`, with when the token stops being served (epoch seconds).

        Callers that keep the token a while (the hook, per connection) learn
        its usable life here instead of decoding the token again.
        """
        token = self.peek(key, record)
        entry = self._data.get(key)
        if token is None or entry is None or entry.token is not token:
            return None
        return token, entry.expires_at

    def get(self, key: str, fetch: Fetcher) -> str:
        """Return the token for ``key``, calling ``fetch`` on a miss (blocking).

        Concurrent misses for one key share a single ``fetch`` call; its
        exception, if any, is raised to every waiter.
        """
        entry = self._data.get(key)
        if entry is not None:
            now = _time()
            if now < entry.refresh_at:
                try:  # noqa: SIM105  (hot path: suppress() costs ~10x more)
                    self._data.move_to_end(key)
                except KeyError:  # evicted meanwhile: still a valid token
                    pass
                if self.telemetry.enabled:
                    self.telemetry.hit()
                return entry.token
            if now < entry.expires_at:
                entry.fetch = fetch
                self._schedule_refresh(key, entry, now)
                if self.telemetry.enabled:
                    self.telemetry.hit()
                return entry.token
        started = time.monotonic()
        future, leader = self._join(key, fetch)
        if not self.telemetry.enabled:
            return self._get_miss(key, fetch, future, leader, started)
        with self.telemetry.lookup(future):
            return self._get_miss(key, fetch, future, leader, started)

    def _get_miss(
        self, key: str, fetch: Fetcher, future: _Flight, leader: bool, started: float
    ) -> str:
        if leader:
            self._run_fetch(key, fetch, future)
            return future.result()
        if self.wait_timeout is None or future.done():
            return future.result()
        try:
            return future.result(timeout=self.wait_timeout - (time.monotonic() - started))
        except concurrent.futures.TimeoutError:
            raise self._wait_timed_out() from None

    async def aget(self, key: str, fetch: Fetcher) -> str:
        """Like :meth:`get`, but a miss runs ``fetch`` in a worker thread.

        The event loop is never blocked.  Concurrent tasks (and threads) share
        one fetch.  Cancelling a waiting task does not cancel the fetch that
        other callers wait on.
        """
        entry = self._data.get(key)
        if entry is not None:
            now = _time()
            if now < entry.refresh_at:
                try:  # noqa: SIM105  (hot path: suppress() costs ~10x more)
                    self._data.move_to_end(key)
                except KeyError:
                    pass
                if self.telemetry.enabled:
                    self.telemetry.hit()
                return entry.token
            if now < entry.expires_at:
                entry.fetch = fetch
                self._schedule_refresh(key, entry, now)
                if self.telemetry.enabled:
                    self.telemetry.hit()
                return entry.token
        future, leader = self._join(key, fetch)
        if not self.telemetry.enabled:
            return await self._aget_miss(key, fetch, future, leader)
        with self.telemetry.lookup(future):
            return await self._aget_miss(key, fetch, future, leader)

    async def _aget_miss(self, key: str, fetch: Fetcher, future: _Flight, leader: bool) -> str:
        if future.done():
            return future.result()
        if leader:
            loop = asyncio.get_running_loop()
            try:
                # Not the loop's default executor: slow fetches must not starve
                # the app's own run_in_executor work (or asyncio's getaddrinfo).
                # The caller's context goes along: the fetch's span joins its trace.
                run = contextvars.copy_context().run
                loop.run_in_executor(_fetch_executor(), run, self._run_fetch, key, fetch, future)
            except BaseException as exc:  # executor shut down: nobody would finish it
                with self._lock:
                    self._inflight.pop(key, None)
                future.set_exception(exc)
                raise
        # The future is already running, so a waiter's cancellation (or
        # timeout) cannot cancel it for the others.
        if self.wait_timeout is None:
            return await asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.wait_timeout)
        except asyncio.TimeoutError:
            raise self._wait_timed_out() from None

    def _wait_timed_out(self) -> TokenAcquisitionError:
        # The fetch this caller waited for is still running and, bounded by
        # the same timeout, about to end; if it fails it is remembered for
        # failure_backoff: the longest the next caller can be refused.
        return TokenAcquisitionError(
            f"no database-access token within {self.wait_timeout:g} s "
            "(the identity provider is slow to answer)",
            error="timeout",
            retry_after=self.failure_backoff if self.failure_backoff > 0 else None,
        )

    # --- misses -----------------------------------------------------------------

    def _join(self, key: str, fetch: Fetcher) -> tuple[_Flight, bool]:
        """The in-flight future for ``key`` and whether the caller must run it."""
        with self._lock:
            entry = self._data.get(key)
            future: _Flight
            if entry is not None and _time() < entry.expires_at:
                future = _Flight()
                future.source = "l1"
                future.set_result(entry.token)
                return future, False
            failure = self._failures.recall(key, _time)
            if failure is not None:
                future = _Flight()
                future.set_exception(failure)
                return future, False
            inflight = self._inflight.get(key)
            if inflight is not None:
                return inflight, False
            future = _Flight()
            # Running from the start: a waiter's cancellation cannot cancel it.
            future.set_running_or_notify_cancel()
            self._inflight[key] = future
            self.fetches += 1
            return future, True

    def _run_fetch(self, key: str, fetch: Fetcher, future: _Flight) -> None:
        try:
            result = self._call(fetch)
            if not math.isfinite(result.expires_at):  # NaN would be stored yet never served
                raise TokenAcquisitionError(
                    "the token source gave a token an expiry that is not a finite number",
                    error="invalid_response",
                )
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
                self._remember(key, exc)
            logger.debug(
                "%s: fetch for key %s… failed (%s)", self.name, key[:8], type(exc).__name__
            )
            future.set_exception(exc)
            return
        with self._lock:
            self._inflight.pop(key, None)
            stored = self._store(key, result, fetch)
            if not stored:
                expired = TokenAcquisitionError(
                    "the identity provider issued a token that has already expired",
                    error="expired_token",
                )
                self._remember(key, expired)
        if not stored:
            future.set_exception(expired)
            return
        future.set_result(result.token)

    def _call(self, fetch: Fetcher) -> FetchResult:
        """One call of ``fetch`` (the identity provider): traced and timed when recording."""
        if not self.telemetry.enabled:
            return fetch()
        with self.telemetry.fetch():
            return fetch()

    def _remember(self, key: str, exc: BaseException) -> None:
        """Remember a failed fetch for ``key`` (under ``self._lock``; see :mod:`._failures`)."""
        self._failures.remember(key, exc, self.failure_backoff, self.maxsize, _time)

    # --- refresh-ahead ---------------------------------------------------------

    def _schedule_refresh(self, key: str, entry: _Entry, now: float) -> None:
        with self._lock:
            if now < entry.refresh_at or self._data.get(key) is not entry:
                return  # another caller got here first, or the entry was replaced
            # Not before a retry interval: a failing provider is not hammered.
            # Invariant: refresh_at <= expires_at, since the hit path checks
            # refresh_at alone.
            entry.refresh_at = min(
                entry.expires_at, now + self._retry_interval(entry.expires_at - now)
            )
            self.fetches += 1
        logger.debug("%s: refresh-ahead scheduled for key %s…", self.name, key[:8])
        _refresher.submit(lambda: self._refresh(key, entry))

    @staticmethod
    def _retry_interval(remaining: float) -> float:
        return min(10.0, max(0.2, remaining / 4))

    def _refresh(self, key: str, entry: _Entry) -> None:
        try:
            result = self._call(entry.fetch)
        except BaseException as exc:
            with self._lock:
                self.refresh_failures += 1
            logger.debug(
                "%s: refresh for key %s… failed (%s); the cached token serves until it expires",
                self.name,
                key[:8],
                type(exc).__name__,
            )
            return
        with self._lock:
            current = self._data.get(key)
            if current is entry:  # not replaced, invalidated or cleared meanwhile
                self._store(key, result, entry.fetch)

    # --- storage ----------------------------------------------------------------

    def _store(self, key: str, result: FetchResult, fetch: Fetcher) -> bool:
        """Insert under ``self._lock``; evicts the least recently used entries.

        Returns False (and stores nothing) for a token with no usable life.
        """
        now = _time()
        lifetime = result.expires_at - now
        margin = 0.0 if result.exact else min(self.skew, max(lifetime, 0.0) / 4)
        expires_at = result.expires_at - margin
        usable = expires_at - now
        if usable <= 0:
            logger.debug("%s: token for key %s… is already expired; not cached", self.name, key[:8])
            self._data.pop(key, None)
            return False
        refresh_at = expires_at - min(self.refresh_ahead, usable / 2)
        self._data[key] = _Entry(result.token, expires_at, refresh_at, fetch)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        logger.debug("%s: cached token for key %s…, usable for %.1f s", self.name, key[:8], usable)
        return True

    def put(self, key: str, token: str, expires_at: float, fetch: Fetcher | None = None) -> None:
        """Store ``token`` for ``key`` until ``expires_at`` (less the margin).

        Without ``fetch`` the entry is never refreshed ahead of time.
        """

        def _no_refresh() -> FetchResult:
            raise LookupError("entry was stored with put() and has no fetch function")

        with self._lock:
            self._store(key, FetchResult(token, expires_at), fetch or _no_refresh)

    def expires_at(self, key: str) -> float | None:
        """When the entry for ``key`` stops being served (epoch seconds), or ``None``."""
        entry = self._data.get(key)
        return None if entry is None else entry.expires_at

    def invalidate(self, key: str, token: str | None = None) -> None:
        """Forget ``key`` (and any remembered failure for it).

        With ``token``: only if ``key`` still holds that token (compare-and-drop),
        so a rejection of an old token never drops the fresh one that replaced it.
        """
        with self._lock:
            if token is not None:
                entry = self._data.get(key)
                if entry is None or entry.token != token:
                    return
            self._data.pop(key, None)
            self._failures.forget(key)

    def clear(self) -> None:
        """Forget every entry and remembered failure (in-flight fetches finish)."""
        with self._lock:
            self._data.clear()
            self._failures.clear()
