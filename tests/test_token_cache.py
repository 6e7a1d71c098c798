"""TokenCache: expiry, refresh-ahead, single-flight (threads and asyncio), LRU, speed."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any

import pytest

from concurrency_support import run_threads
from deepsec.errors import TokenAcquisitionError
from deepsec.tokens import cache as cache_module
from deepsec.tokens.cache import FetchResult, TokenCache, cache_key, jwt_expiry
from token_support import CacheClock, wait_until


class Fetcher:
    """A fake provider: counts calls, optional delay, lifetime and failures.

    Tokens expire ``lifetime`` after the cache's clock (real time unless a
    test moves it with ``CacheClock``).  ``gate``: each call waits for it (at
    most 10 s) before answering, so a test decides when a fetch ends.
    """

    def __init__(self, lifetime: float = 60.0, delay: float = 0.0) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self) -> FetchResult:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.delay:
            time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return FetchResult(f"token-{n}", cache_module._time() + self.lifetime)


class JoinCountingCache(TokenCache):
    """A cache that tells when ``expected`` lookups have joined a fetch (or its result).

    A fetch gated on :attr:`joined` ends only after every caller has joined
    it, however late a loaded machine starts them.
    """

    def __init__(self, expected: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.joins = 0
        self.joined = threading.Event()
        self._count_lock = threading.Lock()

    def _join(self, key: str, fetch: Any) -> Any:
        flight = super()._join(key, fetch)
        with self._count_lock:
            self.joins += 1
            if self.joins >= self.expected:
                self.joined.set()
        return flight


def test_miss_then_hit() -> None:
    cache = TokenCache(10)
    fetch = Fetcher()
    assert cache.peek("k") is None
    assert cache.get("k", fetch) == "token-1"
    assert cache.get("k", fetch) == "token-1"
    assert cache.peek("k") == "token-1"
    assert fetch.calls == 1
    assert len(cache) == 1 and "k" in cache


def test_safety_margin_is_applied_and_capped_for_short_tokens() -> None:
    cache = TokenCache(10, skew=30.0)
    now = time.time()
    cache.get("long", lambda: FetchResult("a", now + 3600))
    cache.get("short", lambda: FetchResult("b", now + 4))
    assert cache.expires_at("long") == pytest.approx(now + 3570, abs=0.01)
    # a quarter of the lifetime, not 30 s (the token would never be served)
    assert cache.expires_at("short") == pytest.approx(now + 3, abs=0.05)
    exact = FetchResult("c", now + 60, exact=True)
    cache.get("exact", lambda: exact)
    assert cache.expires_at("exact") == pytest.approx(now + 60, abs=0.01)


def test_expired_token_is_refused_and_not_cached() -> None:
    """No caller ever receives a token that has already expired."""
    cache = TokenCache(10)
    fetch_calls = []

    def fetch() -> FetchResult:
        fetch_calls.append(1)
        return FetchResult("old", time.time() - 5)

    with pytest.raises(TokenAcquisitionError, match="already expired"):
        cache.get("k", fetch)
    assert cache.peek("k") is None
    with pytest.raises(TokenAcquisitionError):
        cache.get("k", fetch)
    assert len(fetch_calls) == 2


def test_entry_stops_serving_at_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CacheClock(monkeypatch)
    cache = TokenCache(10, skew=0.0, refresh_ahead=0.0)
    fetch = Fetcher(lifetime=0.3)
    assert cache.get("k", fetch) == "token-1"
    clock.now += 0.29
    assert cache.peek("k") == "token-1"
    clock.now += 0.02
    assert cache.peek("k") is None
    assert cache.get("k", fetch) == "token-2"


def test_single_flight_threads() -> None:
    cache = TokenCache(10)
    fetch = Fetcher(delay=0.2)
    barrier = threading.Barrier(256)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.get("user", fetch))

    run_threads(worker, count=256)
    assert fetch.calls == 1
    assert results == ["token-1"] * 256


def test_single_flight_asyncio_does_not_block_the_loop() -> None:
    cache = TokenCache(10)
    fetch = Fetcher()
    # The fetch ends only after the loop has ticked 10 times: a loop blocked
    # by it would never tick (the fetch gives up after 10 s, and ticks < 10).
    fetch.gate = threading.Event()

    async def main() -> tuple[list[str], int]:
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                if ticks >= 10:
                    fetch.gate.set()
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(cache.aget("user", fetch) for _ in range(256)))
        stop = True
        await tick_task
        return list(results), ticks

    results, ticks = asyncio.run(main())
    assert fetch.calls == 1
    assert results == ["token-1"] * 256
    assert ticks >= 10  # the loop kept running while the fetch was in flight


def test_threads_and_tasks_share_one_fetch() -> None:
    cache = TokenCache(10)
    fetch = Fetcher(delay=0.3)
    out: list[str] = []

    def thread_worker() -> None:
        out.append(cache.get("k", fetch))

    async def main() -> list[str]:
        threads = [threading.Thread(target=thread_worker) for _ in range(8)]
        for t in threads:
            t.start()
        await asyncio.sleep(0.05)
        res = await asyncio.gather(*(cache.aget("k", fetch) for _ in range(8)))
        for t in threads:
            t.join()
        return list(res)

    assert asyncio.run(main()) == ["token-1"] * 8
    assert out == ["token-1"] * 8
    assert fetch.calls == 1


def test_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    cache = TokenCache(10)
    fetch = Fetcher()
    fetch.gate = threading.Event()  # the fetch is still running when first is cancelled

    async def main() -> str:
        first = asyncio.create_task(cache.aget("k", fetch))
        second = asyncio.create_task(cache.aget("k", fetch))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        fetch.gate.set()
        return await second

    assert asyncio.run(main()) == "token-1"
    assert fetch.calls == 1


def test_one_fetch_per_key() -> None:
    cache = TokenCache(100)
    fetches = {f"user{i}": Fetcher(delay=0.1) for i in range(50)}

    def worker(key: str) -> None:
        cache.get(key, fetches[key])

    run_threads(worker, each=[k for k in fetches for _ in range(5)])
    assert sum(f.calls for f in fetches.values()) == 50
    assert cache.fetches == 50


def test_failure_reaches_every_waiter_with_its_type_and_is_not_cached() -> None:
    # The fetch fails only once all 32 callers have joined it: a caller the
    # machine started after a (timed) failure would fetch again.
    cache = JoinCountingCache(32, 10)
    fetch = Fetcher()
    fetch.gate = cache.joined
    fetch.fail = TokenAcquisitionError("provider down", error="server_error")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            cache.get("k", fetch)
        except TokenAcquisitionError as exc:
            errors.append(exc)

    run_threads(worker, count=32)
    assert fetch.calls == 1
    assert len(errors) == 32
    assert all(isinstance(e, TokenAcquisitionError) and e.error == "server_error" for e in errors)
    assert cache.peek("k") is None
    fetch.fail = None
    assert cache.get("k", fetch) == "token-2"  # no negative caching by default


def test_failure_backoff_reraises_without_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CacheClock(monkeypatch)
    cache = TokenCache(10, failure_backoff=0.3)
    fetch = Fetcher()
    fetch.fail = TokenAcquisitionError("no", error="invalid_client")
    for _ in range(3):
        with pytest.raises(TokenAcquisitionError):
            cache.get("k", fetch)
        clock.now += 0.09  # still inside the window (at most 0.27 s in)
    assert fetch.calls == 1
    clock.now += 0.05
    fetch.fail = None
    assert cache.get("k", fetch) == "token-2"


def test_async_failure_passes_through() -> None:
    cache = JoinCountingCache(20, 10)
    fetch = Fetcher()
    fetch.gate = cache.joined  # fails once every task has joined it
    fetch.fail = TokenAcquisitionError("bad", error="invalid_grant")

    async def main() -> list[BaseException | str]:
        return list(
            await asyncio.gather(
                *(cache.aget("k", fetch) for _ in range(20)), return_exceptions=True
            )
        )

    results = asyncio.run(main())
    assert fetch.calls == 1
    assert all(isinstance(r, TokenAcquisitionError) and r.error == "invalid_grant" for r in results)


def test_refresh_ahead_serves_old_token_and_refreshes_once_in_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = CacheClock(monkeypatch)
    cache = TokenCache(10, skew=0.1, refresh_ahead=10.0)
    fetch = Fetcher(lifetime=1.0)
    assert cache.get("k", fetch) == "token-1"
    # usable until +0.9 s, refresh window from +0.45 s
    clock.now += 0.5
    fetch.gate = threading.Event()  # the refresh cannot end before the hits below
    seen = {cache.get("k", fetch) for _ in range(1000)}
    assert seen == {"token-1"}  # so the hits did not wait for it
    fetch.gate.set()
    wait_until(lambda: cache.peek("k") == "token-2")
    assert fetch.calls == 2  # exactly one background refresh


def test_peek_triggers_refresh_with_the_stored_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CacheClock(monkeypatch)
    cache = TokenCache(10, skew=0.1, refresh_ahead=10.0)
    fetch = Fetcher(lifetime=1.0)
    cache.get("k", fetch)
    clock.now += 0.5  # inside the refresh window (from +0.45 s), before expiry (+0.9 s)
    assert cache.peek("k") == "token-1"
    wait_until(lambda: cache.peek("k") == "token-2")
    assert fetch.calls == 2


def test_failed_refresh_keeps_serving_until_real_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = CacheClock(monkeypatch)
    cache = TokenCache(10, skew=0.1, refresh_ahead=10.0)
    fetch = Fetcher(lifetime=1.0)
    cache.get("k", fetch)
    expires = cache.expires_at("k")
    assert expires is not None
    fetch.fail = TokenAcquisitionError("down", error="connection_error")
    # From the refresh window (+0.45 s) to just before expiry (+0.9 s); each
    # refresh started (every retry interval, 0.2 s here) fails before the next step.
    for step in (0.5, 0.6, 0.75, 0.85, 0.88):
        clock.now = expires - 0.9 + step
        assert cache.peek("k") == "token-1"
        wait_until(lambda: cache.refresh_failures == cache.fetches - 1)
    assert cache.refresh_failures >= 2
    clock.now = expires + 0.01
    assert cache.peek("k") is None
    with pytest.raises(TokenAcquisitionError):
        cache.get("k", fetch)


def test_no_caller_ever_gets_an_expired_token() -> None:
    cache = TokenCache(10, skew=0.2, refresh_ahead=10.0)
    fetch = Fetcher(lifetime=0.8, delay=0.02)
    issued: dict[str, float] = {}
    lock = threading.Lock()

    def tracking_fetch() -> FetchResult:
        result = fetch()
        with lock:
            issued[result.token] = result.expires_at
        return result

    bad: list[tuple[str, float]] = []
    stop = time.time() + 2.0

    def worker() -> None:
        while time.time() < stop:
            # The time before the call: a token expired by then was served
            # expired.  (Read after the call, a thread the machine paused
            # past the 0.2 s margin would blame the cache.)
            before = time.time()
            token = cache.get("k", tracking_fetch)
            if issued[token] <= before:
                bad.append((token, before))
            time.sleep(0.001)

    run_threads(worker, count=8)
    assert not bad
    assert fetch.calls >= 3  # refreshed several times during the run


def test_lru_eviction() -> None:
    cache = TokenCache(3)
    for key in ("a", "b", "c"):
        cache.get(key, Fetcher())
    cache.get("a", Fetcher())  # a is now the most recently used
    cache.peek("b")  # so is b
    cache.get("d", Fetcher())  # evicts c
    assert "c" not in cache
    assert {"a", "b", "d"} <= {k for k in ("a", "b", "c", "d") if k in cache}
    assert len(cache) == 3


def test_invalidate_and_clear() -> None:
    cache = TokenCache(10)
    fetch = Fetcher()
    cache.get("a", fetch)
    cache.get("b", fetch)
    cache.invalidate("a")
    assert cache.peek("a") is None and cache.peek("b") == "token-2"
    cache.clear()
    assert len(cache) == 0


def test_invalidate_with_a_token_drops_only_that_token() -> None:
    """Compare-and-drop: a late rejection of an old token keeps its replacement."""
    cache = TokenCache(10)
    fetch = Fetcher()
    old = cache.get("a", fetch)
    cache.invalidate("a", old)  # the database rejected it
    new = cache.get("a", fetch)
    assert new != old
    cache.invalidate("a", old)  # another connection meets the same rejection
    assert cache.peek("a") == new
    cache.invalidate("a", "never-cached")
    assert cache.peek("a") == new
    cache.invalidate("a", new)
    assert cache.peek("a") is None
    assert fetch.calls == 2


def test_put() -> None:
    cache = TokenCache(10)
    cache.put("k", "tok", time.time() + 3600)
    assert cache.peek("k") == "tok"


def test_cache_key_is_a_digest_without_the_parts() -> None:
    secret = "super-secret-value"
    key = cache_key("client", secret)
    assert len(key) == 64 and int(key, 16) >= 0
    assert secret not in key
    assert key == cache_key("client", secret)
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key(1) != cache_key("1")
    assert "super" not in repr(TokenCache(1))


def test_repr_holds_no_token() -> None:
    cache = TokenCache(10)
    cache.get("k", lambda: FetchResult("SECRET-TOKEN", time.time() + 60))
    assert "SECRET-TOKEN" not in repr(cache)
    assert "SECRET-TOKEN" not in repr(cache._data["k"])


def test_jwt_expiry() -> None:
    def jwt(claims: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJub25lIn0.{body}.sig"

    assert jwt_expiry(jwt({"exp": 123})) == 123.0
    assert jwt_expiry(jwt({"sub": "x"})) is None
    assert jwt_expiry(jwt({"exp": True})) is None
    assert jwt_expiry("opaque") is None
    assert jwt_expiry("a.%%%.c") is None


def test_failed_refresh_retry_never_extends_past_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    # the retry interval after a failed refresh must not push the hit path's
    # refresh_at beyond the expiry (the hit path checks refresh_at alone).
    # The cache's clock is frozen at chosen instants: real sleeps made this
    # depend on the machine's load.
    from deepsec.tokens import cache as cache_module

    cache = TokenCache(10, skew=0.0, refresh_ahead=10.0)
    fetch = Fetcher(lifetime=60.0)
    cache.get("k", fetch)
    fetch.fail = TokenAcquisitionError("down", error="connection_error")
    expires = cache.expires_at("k")
    assert expires is not None
    now = [expires - 0.05]  # inside the window, 50 ms before expiry: retry interval is 0.2 s
    monkeypatch.setattr(cache_module, "_time", lambda: now[0])
    assert cache.peek("k") == "token-1"  # schedules the refresh, which fails
    deadline = time.monotonic() + 10
    while cache.refresh_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetch.calls == 2 and cache.refresh_failures == 1
    now[0] = expires + 0.01
    assert cache.peek("k") is None


def test_key_memo_derives_once_per_object_and_never_confuses_objects() -> None:
    from deepsec.tokens.cache import KeyMemo

    derived: list[object] = []

    def derive(obj: object) -> str:
        derived.append(obj)
        return cache_key(obj)

    memo = KeyMemo(derive, maxsize=4)
    a = "token-" + "a" * 100
    assert memo.key(a) == memo.key(a) == cache_key(a)
    assert len(derived) == 1
    b = "".join(["token-", "a" * 100])  # equal value, another object
    assert b is not a and memo.key(b) == cache_key(a)
    for i in range(10):  # many short-lived objects: ids get reused, keys stay right
        s = f"user-{i}-" + "x" * 50
        assert memo.key(s) == cache_key(s)
    assert len(memo._data) <= 4
    assert memo.key(("bob", None)) == cache_key(("bob", None))


def test_a_failed_executor_submit_does_not_orphan_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import concurrent.futures
    import threading
    import time as _time_mod

    from deepsec.tokens import _pool
    from deepsec.tokens.cache import FetchResult, TokenCache

    cache = TokenCache(10)

    def fetch() -> FetchResult:
        return FetchResult("tok", _time_mod.time() + 3600)

    async def main() -> None:
        executor = concurrent.futures.ThreadPoolExecutor(1)
        executor.shutdown()
        monkeypatch.setattr(_pool, "_executor", executor)
        with pytest.raises(RuntimeError):
            await cache.aget("k", fetch)
        monkeypatch.setattr(_pool, "_executor", None)

    asyncio.run(main())
    done = threading.Event()
    result: list[str] = []

    def later() -> None:
        result.append(cache.get("k", fetch))
        done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(5), "a later get() blocked on the orphaned in-flight fetch"
    assert result == ["tok"]


# --- remembered failures, Retry-After, waiting deadline -----------------------------


def test_remembered_failure_window_follows_a_capped_retry_after() -> None:
    from deepsec.tokens.cache import MAX_RETRY_AFTER, MIN_RETRY_AFTER

    cache = TokenCache(10, failure_backoff=5.0)
    for hint, window in ((60.0, MAX_RETRY_AFTER), (3.0, 3.0), (0.0, MIN_RETRY_AFTER), (None, 5.0)):
        fetch = Fetcher()
        fetch.fail = TokenAcquisitionError("throttled", error="x", retry_after=hint)
        key = f"k{hint}"
        with pytest.raises(TokenAcquisitionError) as first:
            cache.get(key, fetch)
        assert first.value.retry_after == window
        with pytest.raises(TokenAcquisitionError) as again:
            cache.get(key, fetch)
        assert fetch.calls == 1
        assert again.value is not first.value and 0 < again.value.retry_after <= window
    cache.invalidate("k60.0")  # forgets the remembered failure
    fetch = Fetcher()
    assert cache.get("k60.0", fetch) == "token-1"


def test_without_failure_memory_retry_after_is_unknown() -> None:
    cache = TokenCache(10)
    fetch = Fetcher()
    fetch.fail = TokenAcquisitionError("throttled", error="x", retry_after=60)
    with pytest.raises(TokenAcquisitionError) as info:
        cache.get("k", fetch)
    assert info.value.retry_after is None


def test_remembered_failures_are_bounded_like_the_tokens() -> None:
    cache = TokenCache(8, failure_backoff=60.0)
    fetch = Fetcher()
    fetch.fail = TokenAcquisitionError("down", error="x")
    for i in range(100):
        with pytest.raises(TokenAcquisitionError):
            cache.get(f"user{i}", fetch)
    assert len(cache._failures) <= 8


def test_waiters_give_up_after_wait_timeout_sync_and_async() -> None:
    cache = TokenCache(10, failure_backoff=5.0, wait_timeout=0.3)
    fetch = Fetcher()  # a fetch that does not bound itself (a custom module) ...
    fetch.gate = threading.Event()  # ... and ends only when the test lets it
    leader = threading.Thread(target=lambda: cache.get("k", fetch), daemon=True)
    leader.start()
    wait_until(lambda: fetch.calls == 1)
    # The fetch cannot end while the waiters wait: each answer below is a
    # waiter giving up; the bounds are wide for a loaded machine.
    started = time.monotonic()
    with pytest.raises(TokenAcquisitionError) as info:
        cache.get("k", fetch)
    assert info.value.error == "timeout" and 0.29 <= time.monotonic() - started < 5.0

    async def main() -> list[object]:
        return list(
            await asyncio.gather(
                *(cache.aget("k", fetch) for _ in range(5)), return_exceptions=True
            )
        )

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 5.0
    assert all(isinstance(r, TokenAcquisitionError) and r.error == "timeout" for r in results)
    fetch.gate.set()
    leader.join(10)
    assert fetch.calls == 1
    assert cache.get("k", fetch) == "token-1"  # the fetch finished meanwhile: served


def test_nan_expiry_from_any_fetcher_is_refused() -> None:
    cache = TokenCache(10, failure_backoff=5.0)

    def fetch() -> FetchResult:
        return FetchResult("tok", float("nan"))

    with pytest.raises(TokenAcquisitionError) as info:
        cache.get("k", fetch)
    assert info.value.error == "invalid_response" and cache.peek("k") is None


def test_parse_retry_after() -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    from deepsec.tokens._http import parse_retry_after

    assert parse_retry_after("60") == 60.0
    assert parse_retry_after(" 5 ") == 5.0
    assert parse_retry_after("1.5") == 1.5
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 31
    for bad in (None, "", "-1", "NaN", "inf", "soon", "1e9", "9" * 80, 5):
        assert parse_retry_after(bad) is None, bad
