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
import contextlib
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from .. import telemetry as _telemetry
from ._entry import Fetcher, FetchResult, _Entry, _Flight
from ._failures import FAILURE_MEMORY
from ._pool import _fetch_executor
from .cache import TokenCache

if TYPE_CHECKING:
    from ..config import EndUserSecConfig
    from .sealed import Opened, Sealer

__all__ = [
    "LOCK_MARGIN",
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
#: Seconds the fleet lock outlives its holder's fetch (bounded by ``timeout``):
#: room for the holder's L2 read and write around the fetch.
LOCK_MARGIN = 2.0

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
    """Redis failed (or the breaker is open): go on without L2.

    ``maybe_ran``: the command timed out, so Redis may still have run it.
    """

    def __init__(self, maybe_ran: bool = False) -> None:
        super().__init__()
        self.maybe_ran = maybe_ran


class CircuitBreaker:
    """Skips Redis while it is failing; one WARNING per outage.

    Closed: every call goes to Redis.  After a failure it opens for a pause;
    then one caller probes while the others still skip.  A failed probe
    doubles the pause (up to :data:`BREAKER_MAX`); calls that were already in
    flight when it opened do not (a burst of them would otherwise push the
    next probe out to the maximum at once).  A success closes it.

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

    def allow(self) -> bool:
        """Whether this call may use Redis (cheap when closed)."""
        return self.admit() != DENY

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


class RedisL2:
    """Sealed token entries and fetch locks in one Redis, behind two breakers.

    ``breaker`` opens when Redis does not answer (down, slow, TLS or network
    failure); ``writes`` opens when it answers but refuses a write (full,
    read-only replica, ACL).  A refused write is not cleared by a read that
    works: only a write that works closes ``writes``.  So a full Redis keeps
    serving what it holds, logs one WARNING, and costs no lock attempt per
    miss.
    """

    def __init__(self, url: str, sealer: Sealer, *, lock_ttl: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from ..config import redact_url

        self.url = url
        self.where = redact_url(url)
        self.sealer = sealer
        self.lock_ttl = lock_ttl
        self.lock_ttl_ms = max(1, int(lock_ttl * 1000))
        self.breaker = CircuitBreaker(self.where)
        self.writes = CircuitBreaker(
            self.where,
            "shared token cache at %s refuses writes (%s: full, read-only or not "
            "permitted); tokens are fetched without the fleet lock until it accepts them",
            "shared token cache at %s accepts writes again",
        )
        # No retries inside redis-py: the breaker decides when to try again.
        self._client = redis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry_on_timeout=False,
        )
        self._cad = self._client.register_script(_COMPARE_AND_DELETE)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # The server answered, but refused (OOM, READONLY, NOPERM, ...).
        self._refused: tuple[type[BaseException], ...] = (redis.ResponseError,)
        self._timeouts: tuple[type[BaseException], ...] = (redis.TimeoutError, TimeoutError)

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

    def _call(
        self, fn: Any, *args: Any, write: bool = False, cleanup: bool = False, **kwargs: Any
    ) -> Any:
        """``fn`` through the breakers.

        ``write``: a write a full Redis refuses (gated by ``writes``).
        ``cleanup``: a delete of our own lock or of a rejected entry: never
        gated by ``writes`` (a lock we hold must be released even when our
        entry could not be written) and a refusal changes no breaker.
        """
        wrote = PASS
        if write:
            wrote = self.writes.admit()
            if wrote == DENY:
                raise _L2Down
        reached = self.breaker.admit()
        if reached == DENY:
            if wrote == PROBE:
                self.writes.abandon()
            raise _L2Down
        try:
            result = fn(*args, **kwargs)
        except self._refused as exc:
            if cleanup:
                self.breaker.success()
            elif write:  # Redis answered: reachable, but it refuses writes
                self.breaker.success()
                self.writes.failure(exc, wrote == PROBE)
            else:  # a read refused (ACL): Redis is of no use until that changes
                self.breaker.failure(exc, reached == PROBE)
            raise _L2Down from None
        except self._errors as exc:
            if wrote == PROBE:
                self.writes.abandon()
            if self.breaker.failure(exc, reached == PROBE):
                self._client.connection_pool.disconnect(inuse_connections=False)
            # A timed-out command may still have run.
            raise _L2Down(isinstance(exc, self._timeouts)) from None
        except BaseException:
            self.breaker.abandon()
            self.writes.abandon()
            raise
        self.breaker.success()
        if write:
            self.writes.success()
        return result

    def _get_with_ttl(self, name: str) -> tuple[Any, int]:
        pipe = self._client.pipeline(transaction=False)
        pipe.get(name)
        pipe.pttl(name)
        blob, pttl = pipe.execute()
        return blob, int(pttl)

    def read(self, digest: str, avoid: str | None = None) -> Opened | None:
        """The valid entry for ``digest`` (not the token ``avoid``), or ``None``.

        An entry is served until the moment its writer sealed (when L1 there
        stops serving it, the safety margin applied) and never past its Redis
        TTL: the TTL is counted by Redis, so a reader whose clock is behind
        the writer's still stops in time.
        """
        from .sealed import Opened

        name = self.entry_name(digest)
        blob, pttl = self._call(self._get_with_ttl, name)
        opened = self.sealer.open(name, blob)
        now = time.time()
        if opened is None or opened.token == avoid or pttl == -2:
            return None
        expires_at = opened.expires_at
        if opened.exact and pttl >= 0:
            expires_at = min(expires_at, now + pttl / 1000)
        if expires_at <= now:
            return None
        return Opened(opened.token, expires_at, opened.exact)

    def read_quietly(self, digest: str, avoid: str | None = None) -> Opened | None:
        """Like :meth:`read`; ``None`` when Redis fails."""
        try:
            return self.read(digest, avoid)
        except _L2Down:
            return None

    def write(self, digest: str, result: FetchResult, usable_until: float) -> None:
        """Store ``result`` until ``usable_until`` (its writer's margin applied).

        Sealed as exact: a reader serves it until that moment, without
        recomputing a margin from what is left of the token's life.
        """
        ttl_ms = int((usable_until - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        name = self.entry_name(digest)
        blob = self.sealer.seal(name, result.token, usable_until, True)
        # On failure the fleet misses this one; this process has the token in L1.
        with contextlib.suppress(_L2Down):
            self._call(self._client.set, name, blob, px=ttl_ms, write=True)

    def acquire(self, digest: str) -> str | None:
        """Take the fetch lock: its owner id, or ``None`` if another holds it."""
        owner = uuid.uuid4().hex
        name = self.lock_name(digest)
        try:
            taken = self._call(
                self._client.set, name, owner, nx=True, px=self.lock_ttl_ms, write=True
            )
        except _L2Down as down:
            if down.maybe_ran:
                # The SET may have landed with its reply lost: that lock would
                # be an orphan every process waits on.  Delete it (best effort,
                # off this request's path) if it holds our owner id.
                _background(self._drop_orphan, name, owner)
            raise
        return owner if taken else None

    def _drop_orphan(self, name: str, owner: str) -> None:
        with contextlib.suppress(*self._errors):
            self._cad(keys=[name], args=[owner])

    def release(self, digest: str, owner: str) -> None:
        """Release the lock if ``owner`` still holds it (else it expired: leave it)."""
        with contextlib.suppress(_L2Down):  # on failure it expires by itself
            self._call(self._cad, keys=[self.lock_name(digest)], args=[owner], cleanup=True)

    def delete(self, digest: str, token: str) -> None:
        """Delete the entry for ``digest`` if it still holds ``token``."""
        name = self.entry_name(digest)
        try:
            blob = self._call(self._client.get, name)
            opened = self.sealer.open(name, blob)
            if blob is not None and (opened is None or opened.token == token):
                self._call(self._cad, keys=[name], args=[blob], cleanup=True)
        except _L2Down:
            pass

    def close(self) -> None:
        """Close the client's connections."""
        self._client.connection_pool.disconnect()

    def ping(self) -> None:
        """Raise redis-py's error if Redis does not answer (for the doctor)."""
        self._client.ping()

    # --- asyncio ------------------------------------------------------------------

    async def aread(self, digest: str, avoid: str | None = None) -> Opened | None:
        """Like :meth:`read`, in a worker thread; ``None`` on any Redis failure.

        The sync client in a worker thread, not ``redis.asyncio``: an asyncio
        client's connections belong to one event loop and keep it alive, so
        every ``asyncio.run()`` (a Celery task, a script) leaked a client and
        its sockets; and its timeouts run on the loop's clock, so a busy loop
        turned answers that came in time into "timeouts" that opened the
        breaker.  Socket timeouts in a thread are counted by the kernel.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_fetch_executor(), self.read_quietly, digest, avoid)


def _background(fn: Any, *args: Any) -> None:
    """Run ``fn`` in deepsec's worker threads; never on the caller's path."""
    with contextlib.suppress(RuntimeError):  # interpreter shutting down
        _fetch_executor().submit(fn, *args)


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
            # open.  (Not in the background: a late success of an operation
            # started before an outage would close the breaker again.)
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
