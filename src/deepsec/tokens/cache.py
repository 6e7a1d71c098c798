"""An in-process token cache built for load.

:class:`TokenCache` is shared by every token source (Entra ID, OCI IAM and
custom modules).  It gives:

* **expiry with a safety margin**: a token is served only while
  ``now < expires_at - margin`` where ``margin = min(skew, lifetime / 4)``, so
  no caller ever receives a token that is about to expire on the wire;
* **refresh-ahead**: once an entry enters its refresh window (the last
  ``refresh_ahead`` seconds of its usable life, at most half of it), a hit
  still returns the valid token at once and schedules *one* background
  refresh on a daemon worker thread.  If that refresh fails, the old token
  keeps serving until it really expires, and another refresh is tried a
  little later;
* **single-flight**: N concurrent misses for one key, from threads
  (:meth:`TokenCache.get`) or asyncio tasks (:meth:`TokenCache.aget`), make
  exactly one fetch; the others wait for its result (or its exception);
* **bounded size** with least-recently-used eviction (``maxsize``);
* a **lock-free hit path**: :meth:`TokenCache.peek` and the hit path of
  :meth:`TokenCache.get` are one dict lookup, one clock read and a float
  compare (well under a microsecond; see ``bench/tokens.py``).

Keys must hold no secret: callers pass sha256 hex digests, built with
:func:`cache_key`, never a raw client secret or user token.  (python-oracledb's
plugin keyed its cache by tuples holding the client secret and the user's
token.)

Failures are never cached as success.  With ``failure_backoff > 0`` (the
token sources use :data:`FAILURE_MEMORY`) a failed fetch is remembered *per
key* and re-raised to callers at once, without calling the provider: requests
queued behind a failing fetch fail fast instead of fetching again in waves,
and a provider that is already failing is spared.  A provider's
``Retry-After`` lengthens (or shortens) the window for that key only, capped
at :data:`MAX_RETRY_AFTER`.  Every :class:`~deepsec.errors.TokenAcquisitionError`
raised carries in ``retry_after`` the seconds until the cache will fetch
again.  With ``wait_timeout`` a caller waiting for another caller's fetch
gives up after that many seconds (``error="timeout"``).  Other exceptions
pass through unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import hashlib
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from .. import _jwt
from .. import telemetry as _telemetry
from ..errors import TokenAcquisitionError

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

_time = time.time


class FetchResult(NamedTuple):
    """What a fetch returns: the token and its absolute expiry (epoch seconds).

    With ``exact=True`` the safety margin is not applied: ``expires_at`` is
    already the moment the token stops being served (opaque tokens with a
    fixed lifetime).
    """

    token: str
    expires_at: float
    exact: bool = False


#: A blocking callable returning a fresh token; it may raise.
Fetcher = Callable[[], FetchResult]


def cache_key(*parts: object) -> str:
    """A cache key for ``parts`` that holds no secret: a sha256 hex digest.

    Each part is length-prefixed with its type name, so ``("ab", "c")`` and
    ``("a", "bc")`` differ, as do ``1`` and ``"1"``.
    """
    h = hashlib.sha256()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else repr(part).encode()
        h.update(f"{type(part).__name__}:{len(raw)}:".encode())
        h.update(raw)
    return h.hexdigest()


class KeyMemo:
    """Remembers the cache key derived from recently seen identity objects.

    Deriving a key hashes the identity (a user token can be kilobytes: a few
    microseconds), and ``cached_token`` runs before every database operation.
    The memo is keyed by ``id(obj)`` and checked with ``is``: each entry keeps
    its object alive, so the id cannot be reused by another object while the
    entry exists, and identities (``str`` or tuples of ``str``) are immutable.
    Bounded: cleared when ``maxsize`` is reached.
    """

    __slots__ = ("_data", "_derive", "_maxsize")

    def __init__(self, derive: Callable[[Any], str], maxsize: int = 4096) -> None:
        self._derive = derive
        self._maxsize = maxsize
        self._data: dict[int, tuple[object, str]] = {}

    def key(self, obj: object) -> str:
        """The key for ``obj`` (derived once per object while remembered)."""
        hit = self._data.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        key = self._derive(obj)
        if len(self._data) >= self._maxsize:
            self._data.clear()
        self._data[id(obj)] = (obj, key)
        return key


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified), or ``None`` if it has none."""
    return _jwt.expiry(token)


class _Entry:
    """A cached token.  ``refresh_at`` is moved forward when a refresh starts."""

    __slots__ = ("expires_at", "fetch", "refresh_at", "token")

    def __init__(self, token: str, expires_at: float, refresh_at: float, fetch: Fetcher) -> None:
        self.token = token
        self.expires_at = expires_at
        self.refresh_at = refresh_at
        self.fetch = fetch

    def __repr__(self) -> str:  # never show the token
        return f"_Entry(expires_at={self.expires_at:.3f}, refresh_at={self.refresh_at:.3f})"


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


class _Flight(concurrent.futures.Future[str]):
    """A lookup's in-flight (or settled) fetch; ``source`` tells telemetry who answered."""

    #: ``idp``; ``l2`` when a shared cache answered; ``l1`` for a race lost to a store.
    source = "idp"


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
        self._failures: dict[str, tuple[float, BaseException]] = {}
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
            failure = self._failures.get(key)
            if failure is not None:
                left = failure[0] - _time()
                if left > 0:
                    future = _Flight()
                    future.set_exception(_recalled(failure[1], left))
                    return future, False
                del self._failures[key]
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
        """Remember a failed fetch for ``key`` (under ``self._lock``).

        Sets ``retry_after`` of a :class:`TokenAcquisitionError` to the window
        really applied (``None`` when nothing is remembered), so what clients
        are told matches what the cache does.
        """
        if not isinstance(exc, Exception) or self.failure_backoff <= 0:
            if isinstance(exc, TokenAcquisitionError):
                exc.retry_after = None
            return
        window = self.failure_backoff
        if isinstance(exc, TokenAcquisitionError):
            hint = exc.retry_after
            if hint is not None and math.isfinite(hint):
                window = min(max(hint, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            exc.retry_after = window
        now = _time()
        if len(self._failures) >= self.maxsize:  # bounded like the tokens
            for stale in [k for k, (until, _) in self._failures.items() if until <= now]:
                del self._failures[stale]
            while len(self._failures) >= self.maxsize:
                del self._failures[next(iter(self._failures))]
        self._failures.pop(key, None)
        self._failures[key] = (now + window, exc)

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
            self._failures.pop(key, None)

    def clear(self) -> None:
        """Forget every entry and remembered failure (in-flight fetches finish)."""
        with self._lock:
            self._data.clear()
            self._failures.clear()
