"""The shared token cache's Redis side: sealed entries and the fleet's fetch lock.

Internal module; :class:`RedisL2` is public through :mod:`deepsec.tokens.shared`.
Entries are sealed (AES-GCM, see :mod:`.sealed`) and served no longer than
their writer's L1 would; the fetch lock is ``SET NX PX`` with a random owner
id, released only by its owner (a Lua compare-and-delete).  Every call goes
through two circuit breakers (:mod:`._breaker`), so a Redis that fails costs
a request little more than :data:`SOCKET_TIMEOUT`, once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from ._breaker import DENY, PASS, PROBE, CircuitBreaker
from ._entry import FetchResult
from ._pool import _background, _fetch_executor

if TYPE_CHECKING:
    from .sealed import Opened, Sealer

__all__ = ["SOCKET_TIMEOUT", "RedisL2"]

#: Socket connect and read timeout (seconds) for Redis, unless the URL sets
#: ``socket_timeout`` / ``socket_connect_timeout``: a slow Redis must cost a
#: request little more than this, once per outage.
SOCKET_TIMEOUT = 0.5

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
            if cleanup or write:  # Redis answered: reachable
                self.breaker.success(reached == PROBE)
                if not cleanup:  # but it refuses writes
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
            # Only the probe gives its turn back: a call sent before the
            # breaker opened holds no turn, and clearing the probe's would
            # make the breaker ignore the probe's answer.
            if reached == PROBE:
                self.breaker.abandon()
            if wrote == PROBE:
                self.writes.abandon()
            raise
        self.breaker.success(reached == PROBE)
        if write:
            self.writes.success(wrote == PROBE)
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
