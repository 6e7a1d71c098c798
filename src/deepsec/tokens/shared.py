"""A fleet-wide token cache: the in-process cache (L1) in front of Redis (L2).

With ``token_cache`` set, every token source's :class:`TokenCache` becomes a
:class:`SharedTokenCache`.  Its hit path *is* the L1 hit path (``get`` and
``peek`` are not overridden).  On an L1 miss:

1. the L2 entry is read (sealed with AES-GCM, see :mod:`.sealed`); a valid one
   is served and kept in L1;
2. else one process of the fleet takes a short Redis lock (``SET NX PX``
   with a random owner id) and asks the identity provider; the others poll
   L2 for its result, bounded by ``timeout``, then fetch themselves.  Only
   the owner releases the lock (a Lua compare-and-delete), and a holder that
   dies blocks nobody past the lock's expiry;
3. refresh-ahead goes through the same lock, so one process refreshes for the
   fleet and the others pick the new token up from L2.

Redis is an optimisation, never a dependency: any Redis failure (down, slow,
full, refusing) opens a circuit breaker, logs one WARNING per outage on
``deepsec.tokens``, and requests go on with L1 and direct fetches.  The
breaker lets one probe through after 1 s, then 2, 4, 8, at most 10 s, so L2
is used again within seconds of Redis coming back.

On asyncio, the L2 read of a miss uses ``redis.asyncio``; the fetch and its
lock run in a worker thread, like every fetch of :meth:`TokenCache.aget`: the
event loop never blocks.  Production advice: ``docs/production.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any

from .cache import FAILURE_MEMORY, Fetcher, FetchResult, TokenCache, _Entry

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from .sealed import Opened, Sealer

__all__ = [
    "CircuitBreaker",
    "RedisL2",
    "SharedTokenCache",
    "reset_shared_caches",
    "token_cache_for",
]

logger = logging.getLogger("deepsec.tokens")

#: Socket connect and read timeout (seconds) for Redis, unless the URL sets
#: ``socket_timeout`` / ``socket_connect_timeout``: a slow Redis must cost a
#: request little more than this, once per outage.
SOCKET_TIMEOUT = 0.5
#: First and longest pause (seconds) of the circuit breaker before a probe.
BREAKER_FIRST = 1.0
BREAKER_MAX = 10.0
#: First and longest pause (seconds) between polls of L2 while another
#: process holds the fetch lock.
_POLL_FIRST = 0.01
_POLL_MAX = 0.1

# Deletes KEYS[1] only if it still holds ARGV[1]: a lock is released only by
# its owner (never a lock that expired and was taken by another process), and
# an invalidated entry is deleted only if nobody replaced it meanwhile.
_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class _L2Down(Exception):
    """Redis failed (or the breaker is open): go on without L2."""


class CircuitBreaker:
    """Skips Redis while it is failing; one WARNING per outage.

    Closed: every call goes to Redis.  After a failure it opens for a pause
    (doubling up to :data:`BREAKER_MAX`); then one caller probes while the
    others still skip.  A success closes it.
    """

    def __init__(self, where: str) -> None:
        self.where = where
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

    def allow(self) -> bool:
        """Whether this call may use Redis (cheap when closed)."""
        if self._open_until == 0.0:
            return True
        with self._lock:
            if self._open_until == 0.0:
                return True
            if self._probing or time.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """A Redis call worked."""
        if self._open_until == 0.0:
            return
        with self._lock:
            if self._open_until == 0.0:
                return
            self._open_until = 0.0
            self._pause = BREAKER_FIRST
            self._probing = False
        logger.info("shared token cache at %s is reachable again; using it", self.where)

    def abandon(self) -> None:
        """A probe ended without an answer (cancelled): let another caller probe."""
        with self._lock:
            self._probing = False

    def failure(self, exc: BaseException) -> bool:
        """A Redis call failed; returns True when this opened the breaker."""
        with self._lock:
            opened = self._open_until == 0.0
            if opened:
                self._pause = BREAKER_FIRST
                self.outages += 1
            else:
                self._pause = min(self._pause * 2, BREAKER_MAX)
            self._open_until = time.monotonic() + self._pause
            self._probing = False
        if opened:
            # The exception's type only: its text may name hosts or echo replies.
            logger.warning(
                "shared token cache at %s is unavailable (%s); serving tokens from the "
                "in-process cache and the identity provider until it is back",
                self.where,
                type(exc).__name__,
            )
        return opened


class RedisL2:
    """Sealed token entries and fetch locks in one Redis, behind a breaker."""

    def __init__(self, url: str, sealer: Sealer, *, lock_ttl: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from ..config import redact_url

        self.url = url
        self.where = redact_url(url)
        self.sealer = sealer
        self.lock_ttl_ms = max(1, int(lock_ttl * 1000))
        self.breaker = CircuitBreaker(self.where)
        # No retries inside redis-py: the breaker decides when to try again.
        self._options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "retry_on_timeout": False,
        }
        self._client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **self._options)
        self._cad = self._client.register_script(_COMPARE_AND_DELETE)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._aerrors = (*self._errors, asyncio.TimeoutError)
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._alock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisL2({self.where!r}, breaker={'closed' if self.breaker.closed else 'open'})"

    @staticmethod
    def entry_name(digest: str) -> str:
        """The Redis key of an entry (see :mod:`.sealed` for the digest)."""
        from .sealed import ENTRY_PREFIX

        return ENTRY_PREFIX + digest

    @staticmethod
    def lock_name(digest: str) -> str:
        """The Redis key of an entry's fetch lock."""
        from .sealed import LOCK_PREFIX

        return LOCK_PREFIX + digest

    # --- sync operations: raise _L2Down, or swallow where a failure changes nothing ----

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.breaker.allow():
            raise _L2Down
        try:
            result = fn(*args, **kwargs)
        except self._errors as exc:
            if self.breaker.failure(exc):
                self._client.connection_pool.disconnect(inuse_connections=False)
            raise _L2Down from None
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return result

    def read(self, digest: str, avoid: str | None = None) -> Opened | None:
        """The valid entry for ``digest`` (not the token ``avoid``), or ``None``."""
        name = self.entry_name(digest)
        opened = self.sealer.open(name, self._call(self._client.get, name))
        if opened is None or opened.token == avoid or opened.expires_at <= time.time():
            return None
        return opened

    def write(self, digest: str, result: FetchResult, usable_until: float) -> None:
        """Store ``result`` until ``usable_until`` (before the token's expiry)."""
        ttl_ms = int((usable_until - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        name = self.entry_name(digest)
        blob = self.sealer.seal(name, result.token, result.expires_at, result.exact)
        # On failure the fleet misses this one; this process has the token in L1.
        with contextlib.suppress(_L2Down):
            self._call(self._client.set, name, blob, px=ttl_ms)

    def acquire(self, digest: str) -> str | None:
        """Take the fetch lock: its owner id, or ``None`` if another holds it."""
        owner = uuid.uuid4().hex
        taken = self._call(
            self._client.set, self.lock_name(digest), owner, nx=True, px=self.lock_ttl_ms
        )
        return owner if taken else None

    def release(self, digest: str, owner: str) -> None:
        """Release the lock if ``owner`` still holds it (else it expired: leave it)."""
        with contextlib.suppress(_L2Down):  # on failure it expires by itself
            self._call(self._cad, keys=[self.lock_name(digest)], args=[owner])

    def delete(self, digest: str, token: str) -> None:
        """Delete the entry for ``digest`` if it still holds ``token``."""
        name = self.entry_name(digest)
        try:
            blob = self._call(self._client.get, name)
            opened = self.sealer.open(name, blob)
            if blob is not None and (opened is None or opened.token == token):
                self._call(self._cad, keys=[name], args=[blob])
        except _L2Down:
            pass

    def close(self) -> None:
        """Close the sync client's connections (async clients close with their loop)."""
        self._client.connection_pool.disconnect()

    def ping(self) -> None:
        """Raise redis-py's error if Redis does not answer (for the doctor)."""
        self._client.ping()

    # --- asyncio ------------------------------------------------------------------

    def _aclient(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            with self._alock:
                client = self._aclients.get(loop)
                if client is None:
                    client = redis.asyncio.Redis.from_url(
                        self.url, retry=Retry(NoBackoff(), 0), **self._options
                    )
                    self._aclients[loop] = client
        return client

    async def aread(self, digest: str, avoid: str | None = None) -> Opened | None:
        """Like :meth:`read` on ``redis.asyncio``; ``None`` on any Redis failure."""
        if not self.breaker.allow():
            return None
        name = self.entry_name(digest)
        try:
            blob = await self._aclient().get(name)
        except self._aerrors as exc:
            self.breaker.failure(exc)
            return None
        except BaseException:  # cancelled: a probe must not stay taken forever
            self.breaker.abandon()
            raise
        self.breaker.success()
        opened = self.sealer.open(name, blob)
        if opened is None or opened.token == avoid or opened.expires_at <= time.time():
            return None
        return opened


class _Through:
    """A fetch that goes through L2 and the fleet lock (see the module docstring)."""

    __slots__ = ("cache", "inner", "key", "stale")

    def __init__(self, cache: SharedTokenCache, key: str, inner: Fetcher, stale: str | None):
        self.cache = cache
        self.key = key
        self.inner = inner
        self.stale = stale

    def __call__(self) -> FetchResult:
        return self.cache._fetch_through(self.key, self.inner, self.stale)


def _inner(fetch: Fetcher) -> Fetcher:
    return fetch.inner if isinstance(fetch, _Through) else fetch


class SharedTokenCache(TokenCache):
    """A :class:`TokenCache` (L1) backed by a :class:`RedisL2` shared by the fleet.

    Args:
        l2: the Redis layer.
        maxsize: L1 entries kept.
        wait: longest wait (seconds) for another process's fetch before
            fetching here (the config's ``timeout``).
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

    def _run_fetch(self, key: str, fetch: Fetcher, future: Any) -> None:
        super()._run_fetch(key, _Through(self, key, _inner(fetch), None), future)

    def _refresh(self, key: str, entry: _Entry) -> None:
        # Accept from L2 only a token other than the one being replaced.
        entry.fetch = _Through(self, key, _inner(entry.fetch), entry.token)
        super()._refresh(key, entry)

    async def aget(self, key: str, fetch: Fetcher) -> str:
        """Like :meth:`TokenCache.aget`; an L1 miss first reads L2 with ``redis.asyncio``."""
        if self.peek(key) is None and key not in self._inflight:
            opened = await self.l2.aread(self._digest(key), self._rejected.get(key))
            if opened is not None:
                with self._lock:  # not peek(): it may take this lock itself
                    entry = self._data.get(key)
                    if entry is None or time.time() >= entry.expires_at:
                        self._store(key, FetchResult(*opened), fetch)
                        self.l2_hits += 1
        return await super().aget(key, fetch)

    def _fetch_through(self, key: str, fetch: Fetcher, stale: str | None) -> FetchResult:
        """L2, else the fleet lock and ``fetch``; ``fetch`` alone when Redis fails."""
        digest = self._digest(key)
        avoid = stale or self._rejected.get(key)
        try:
            opened = self.l2.read(digest, avoid)
            if opened is not None:
                self.l2_hits += 1
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
                            self.l2_hits += 1
                            return FetchResult(*opened)
                        result = fetch()
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
                    self.l2_hits += 1
                    return FetchResult(*opened)
        except _L2Down:
            pass
        result = fetch()
        self._rejected.pop(key, None)
        if self.l2.breaker.closed:
            self.l2.write(digest, result, self._usable_until(result))
        return result

    # --- invalidation -------------------------------------------------------------

    def invalidate(self, key: str) -> None:
        """Forget ``key`` here and (if it still holds the same token) in Redis."""
        entry = self._data.get(key)
        super().invalidate(key)
        if entry is None:
            return
        if len(self._rejected) >= self.maxsize:
            self._rejected.clear()
        self._rejected[key] = entry.token
        digest = self._digest(key)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.l2.delete(digest, entry.token)
        else:  # never a blocking Redis call on the event loop
            threading.Thread(target=self.l2.delete, args=(digest, entry.token), daemon=True).start()


_l2s: dict[tuple[str, bytes], RedisL2] = {}
_l2s_lock = threading.Lock()


def _l2_for(config: EndUserSecConfig) -> RedisL2:
    """One :class:`RedisL2` (one connection pool) per URL and key in the process."""
    from .sealed import Sealer, cache_secret

    assert config.token_cache is not None
    secret = cache_secret(config)
    lock_ttl = config.timeout * (config.max_retries + 2)
    with _l2s_lock:
        l2 = _l2s.get((config.token_cache, secret))
        if l2 is None:
            l2 = _l2s[(config.token_cache, secret)] = RedisL2(
                config.token_cache, Sealer(secret), lock_ttl=lock_ttl
            )
        return l2


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
    # (see TokenCache), with or without the shared level.
    options: dict[str, Any] = {
        "name": name,
        "failure_backoff": FAILURE_MEMORY,
        "wait_timeout": config.timeout,
    }
    if config.token_cache is None:
        return TokenCache(config.cache_size, **options)
    return SharedTokenCache(_l2_for(config), config.cache_size, wait=config.timeout, **options)
