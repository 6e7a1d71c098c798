"""A fleet-wide token cache: the in-process cache (L1) in front of Redis (L2).

With ``token_cache`` set, every token source's :class:`TokenCache` becomes a
:class:`SharedTokenCache`.  Its hit path *is* the L1 hit path (``get`` and
``peek`` are not overridden).  On an L1 miss:

1. the L2 entry is read (sealed with AES-GCM, see :mod:`.sealed`); a valid one
   is served and kept in L1;
2. else one process of the fleet takes a short Redis lock (``SET NX PX``
   with a random owner id; it lives ``timeout`` + :data:`LOCK_MARGIN`) and
   asks the identity provider; the others poll L2 for its result until that
   lock is released or expires, then take it themselves.  Only the owner
   releases the lock (a Lua compare-and-delete), and a holder that dies
   blocks nobody past the lock's expiry;
3. refresh-ahead goes through the same lock, so one process refreshes for the
   fleet and the others pick the new token up from L2.

An entry is sealed with the moment its writer's L1 stops serving it (the
safety margin applied) and read back as ``min(that, now + its Redis TTL)``.

Redis is an optimisation, never a dependency: a Redis that does not answer
opens a circuit breaker, one that refuses writes (full, read-only, ACL) opens
a second one that only a working write closes; each logs one WARNING per
outage on ``deepsec.tokens``, and requests go on with L1 and direct fetches.
A breaker lets one probe through after 1 s, then 2, 4, 8, at most 10 s, so
L2 is used again within seconds of Redis coming back.

On asyncio, the L2 read of a miss and the fetch with its lock run in
deepsec's worker threads (see :meth:`RedisL2.aread` for why not
``redis.asyncio``): the event loop never blocks.  Production advice:
``docs/production.md``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import telemetry as _telemetry

# Re-exported: this module was their home (tests and callers import them from here).
from ._breaker import BREAKER_FIRST as BREAKER_FIRST
from ._breaker import BREAKER_MAX as BREAKER_MAX
from ._breaker import CircuitBreaker
from ._entry import Fetcher, FetchResult, _Entry, _Flight
from ._failures import FAILURE_MEMORY
from ._pool import _background
from ._redis_l2 import SOCKET_TIMEOUT, RedisL2, _L2Down
from .cache import TokenCache

if TYPE_CHECKING:
    from ..config import EndUserSecConfig

__all__ = [
    "LOCK_MARGIN",
    "CircuitBreaker",
    "RedisL2",
    "SharedTokenCache",
    "reset_shared_caches",
    "token_cache_for",
]

logger = logging.getLogger("deepsec.tokens")

#: First and longest pause (seconds) between polls of L2 while another
#: process holds the fetch lock.
_POLL_FIRST = 0.01
_POLL_MAX = 0.1
#: Seconds the fleet lock outlives its holder's fetch (bounded by ``timeout``):
#: room for the holder's L2 read and write around the fetch.
LOCK_MARGIN = 2.0


class _Through:
    """A fetch that goes through L2 and the fleet lock (see the module docstring)."""

    __slots__ = ("cache", "flight", "inner", "key", "stale")

    def __init__(
        self,
        cache: SharedTokenCache,
        key: str,
        inner: Fetcher,
        stale: str | None,
        flight: _Flight | None = None,
    ):
        self.cache = cache
        self.key = key
        self.inner = inner
        self.stale = stale
        #: The lookup this fetch answers (None for a refresh): told when L2 did.
        self.flight = flight

    def __call__(self) -> FetchResult:
        return self.cache._fetch_through(self.key, self.inner, self.stale, self.flight)


def _inner(fetch: Fetcher) -> Fetcher:
    return fetch.inner if isinstance(fetch, _Through) else fetch


class SharedTokenCache(TokenCache):
    """A :class:`TokenCache` (L1) backed by a :class:`RedisL2` shared by the fleet.

    Args:
        l2: the Redis layer.
        maxsize: L1 entries kept.
        wait: longest wait (seconds) for another process's fetch before
            fetching here (:func:`fleet_wait`: past the lock's expiry).
        kwargs: passed to :class:`TokenCache`.
    """

    def __init__(self, l2: RedisL2, maxsize: int = 10_000, *, wait: float, **kwargs: Any):
        super().__init__(maxsize, **kwargs)
        self.l2 = l2
        self.wait = wait
        # Tokens the database rejected (ORA-52602), per key: never taken back
        # from L2 by this process, even before the L2 delete has landed.
        self._rejected: dict[str, str] = {}
        self._digests: dict[str, str] = {}
        #: Tokens this process took from L2 instead of the identity provider.
        self.l2_hits = 0

    def __repr__(self) -> str:
        return f"Shared{super().__repr__()[:-1]}, l2={self.l2!r})"

    def _digest(self, key: str) -> str:
        digest = self._digests.get(key)
        if digest is None:
            if len(self._digests) >= 4 * self.maxsize:
                self._digests.clear()
            digest = self._digests[key] = self.l2.sealer.digest(key)
        return digest

    def _usable_until(self, result: FetchResult) -> float:
        """When L1 would stop serving ``result`` (its margin applied): the L2 TTL."""
        if result.exact:
            return result.expires_at
        lifetime = max(result.expires_at - time.time(), 0.0)
        return result.expires_at - min(self.skew, lifetime / 4)

    # --- hooks into TokenCache's miss and refresh paths ------------------------------

    def _run_fetch(self, key: str, fetch: Fetcher, future: _Flight) -> None:
        super()._run_fetch(key, _Through(self, key, _inner(fetch), None, future), future)

    def _call(self, fetch: Fetcher) -> FetchResult:
        # Through L2: only its identity-provider call (in _fetch_through) is one.
        if isinstance(fetch, _Through):
            return fetch()
        return super()._call(fetch)

    def _from_l2(self, flight: _Flight | None) -> None:
        """A token came from Redis instead of the identity provider."""
        self.l2_hits += 1
        if flight is not None:  # counted by the lookup waiting for it, as ``l2``
            flight.source = "l2"

    def _refresh(self, key: str, entry: _Entry) -> None:
        # Accept from L2 only a token other than the one being replaced.
        entry.fetch = _Through(self, key, _inner(entry.fetch), entry.token)
        super()._refresh(key, entry)

    async def aget(self, key: str, fetch: Fetcher) -> str:
        """Like :meth:`TokenCache.aget`; an L1 miss first reads L2 in a worker thread."""
        entry = self._data.get(key)
        # Not peek(): that would count an l1 lookup for this one.
        if (entry is None or time.time() >= entry.expires_at) and key not in self._inflight:
            opened = await self.l2.aread(self._digest(key), self._rejected.get(key))
            if opened is not None:
                with self._lock:  # not peek(): it may take this lock itself
                    entry = self._data.get(key)
                    # Rejected (ORA-52602) while the read was in flight: not taken.
                    stored = (
                        opened.token != self._rejected.get(key)
                        and (entry is None or time.time() >= entry.expires_at)
                        and self._store(key, FetchResult(*opened), fetch)
                    )
                    if stored:
                        self.l2_hits += 1
                if stored:
                    if self.telemetry.enabled:
                        self.telemetry.hit("l2")
                    return opened.token
        return await super().aget(key, fetch)

    def _fetch_through(
        self, key: str, fetch: Fetcher, stale: str | None, flight: _Flight | None = None
    ) -> FetchResult:
        """L2, else the fleet lock and ``fetch``; ``fetch`` alone when Redis fails.

        A process waits for another's fetch until that holder's lock expires
        (the holder's fetch is bounded by ``timeout``, the lock outlives it by
        :data:`LOCK_MARGIN`), then takes the lock itself: a holder that dies
        costs the others the lock's life, and the fleet still makes one call.
        """
        digest = self._digest(key)
        avoid = stale or self._rejected.get(key)
        try:
            opened = self.l2.read(digest, avoid)
            if opened is not None:
                self._from_l2(flight)
                return FetchResult(*opened)
            deadline = time.monotonic() + self.wait
            pause = _POLL_FIRST
            while True:
                owner = self.l2.acquire(digest)
                if owner is not None:
                    try:
                        # Written between our read and the lock?
                        opened = self.l2.read(digest, avoid)
                        if opened is not None:
                            self._from_l2(flight)
                            return FetchResult(*opened)
                        result = self._call(fetch)
                        self._rejected.pop(key, None)
                        self.l2.write(digest, result, self._usable_until(result))
                        return result
                    finally:
                        self.l2.release(digest, owner)
                if time.monotonic() >= deadline:
                    logger.debug(
                        "%s: gave up waiting for the fleet's fetch of %s…", self.name, key[:8]
                    )
                    break
                time.sleep(pause)
                pause = min(pause * 1.5, _POLL_MAX)
                opened = self.l2.read(digest, avoid)
                if opened is not None:
                    self._from_l2(flight)
                    return FetchResult(*opened)
        except _L2Down:
            pass
        result = self._call(fetch)
        self._rejected.pop(key, None)
        if self.l2.breaker.closed:
            self.l2.write(digest, result, self._usable_until(result))
        return result

    # --- invalidation -------------------------------------------------------------

    def invalidate(self, key: str, token: str | None = None) -> None:
        """Forget ``key`` here and (if it still holds the same token) in Redis.

        With ``token``, that token is the rejected one: the L1 entry goes only
        if it still holds it, and Redis is compared against it too, so a fresh
        token that replaced it is never marked rejected.
        """
        entry = self._data.get(key)
        super().invalidate(key, token)
        rejected = token if token is not None else (entry.token if entry is not None else None)
        if rejected is None:
            return
        if len(self._rejected) >= self.maxsize:
            self._rejected.clear()
        self._rejected[key] = rejected
        digest = self._digest(key)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Bounded by the socket timeout and skipped while the breaker is
            # open: a thread can wait for it (only the event loop must not).
            self.l2.delete(digest, rejected)
        else:  # never a blocking Redis call on the event loop
            _background(self.l2.delete, digest, rejected)


_l2s: dict[tuple[str, bytes], RedisL2] = {}
_l2s_lock = threading.Lock()


def _l2_for(config: EndUserSecConfig) -> RedisL2:
    """One :class:`RedisL2` (one connection pool) per URL and key in the process."""
    from .sealed import Sealer, cache_secret

    assert config.token_cache is not None
    secret = cache_secret(config)
    with _l2s_lock:
        l2 = _l2s.get((config.token_cache, secret))
        if l2 is None:
            l2 = _l2s[(config.token_cache, secret)] = RedisL2(
                config.token_cache, Sealer(secret), lock_ttl=lock_ttl(config.timeout)
            )
        return l2


def lock_ttl(timeout: float) -> float:
    """The fleet lock's life: the holder's fetch (bounded by ``timeout``) and a margin."""
    return timeout + LOCK_MARGIN


def fleet_wait(timeout: float) -> float:
    """Longest a process polls L2 for another's fetch: until the lock has surely expired."""
    return lock_ttl(timeout) + _POLL_MAX


def leader_bound(timeout: float) -> float:
    """Longest a miss can take with L2: two reads, the fleet wait, a fetch and a write.

    In-process waiters wait this long (not ``timeout``): the caller that
    leads a miss may legitimately wait out another process's fetch before
    fetching itself, and giving up earlier failed requests that were about to
    get their token.
    """
    return fleet_wait(timeout) + timeout + 3 * SOCKET_TIMEOUT


def reset_shared_caches() -> None:
    """Forget every Redis client and breaker (``clear_token_sources`` calls this)."""
    with _l2s_lock:
        l2s = list(_l2s.values())
        _l2s.clear()
    for l2 in l2s:
        l2.close()


def token_cache_for(config: EndUserSecConfig, name: str) -> TokenCache:
    """The cache a token source uses: L1 only, or L1 + Redis when ``token_cache`` is set."""
    # Failures are remembered briefly and waiters give up after ``timeout``
    # (see TokenCache), or after the fleet wait too with the shared level.
    options: dict[str, Any] = {"name": name, "failure_backoff": FAILURE_MEMORY}
    cache: TokenCache
    if config.token_cache is None:
        cache = TokenCache(config.cache_size, wait_timeout=config.timeout, **options)
    else:
        cache = SharedTokenCache(
            _l2_for(config),
            config.cache_size,
            wait=fleet_wait(config.timeout),
            wait_timeout=leader_bound(config.timeout),
            **options,
        )
    cache.telemetry = _telemetry.for_source(config)
    return cache
