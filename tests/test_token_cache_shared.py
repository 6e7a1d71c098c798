"""The shared (Redis) token cache in one process: config, sealing, locks, outages.

Real parts only: a real ``redis-server`` (fixture ``redis``), the local
identity provider over HTTPS (fixture ``idp``) and redis-py.  Two token
sources built from the same params stand for two processes of a fleet (each
has its own in-process cache, both share Redis).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py

from deepsec import EndUserContext
from deepsec.config import parse_end_user_sec_params, redact_url
from deepsec.errors import ConfigError
from deepsec.testing.idp import LocalIdP
from deepsec.testing.redis import RedisTestServer
from deepsec.tokens import clear_token_sources, token_source_for
from deepsec.tokens.azure import AzureTokenSource
from deepsec.tokens.sealed import ENTRY_PREFIX, LOCK_PREFIX, Sealer, cache_secret
from deepsec.tokens.shared import (
    BREAKER_FIRST,
    SOCKET_TIMEOUT,
    CircuitBreaker,
    SharedTokenCache,
)

pytestmark = pytest.mark.timeout(90)

KEY_A = base64.urlsafe_b64encode(b"a" * 32).decode()
KEY_B = base64.urlsafe_b64encode(b"b" * 32).decode()


def _params(idp: LocalIdP, redis: RedisTestServer, **extra: Any) -> dict[str, Any]:
    return idp.azure_params("on_behalf_of", token_cache=redis.url, timeout=10.0, **extra)


def _source(params: dict[str, Any]) -> AzureTokenSource:
    """A new source (a new process's empty L1) sharing Redis with the others."""
    return AzureTokenSource(parse_end_user_sec_params(params))


def _raw(redis: RedisTestServer) -> dict[bytes, bytes]:
    client = redis_py.Redis.from_url(redis.url)
    try:
        return {k: client.dump(k) or b"" for k in client.scan_iter("*")}
    finally:
        client.close()


def _entries(redis: RedisTestServer) -> dict[bytes, bytes]:
    client = redis_py.Redis.from_url(redis.url)
    try:
        return {k: client.get(k) for k in client.scan_iter(ENTRY_PREFIX + "*")}
    finally:
        client.close()


# --- config -----------------------------------------------------------------------


def test_token_cache_scheme_must_be_redis(idp: LocalIdP) -> None:
    for url in ("http://h:6379", "memcached://h", "h:6379", "redis-sentinel://x"):
        with pytest.raises(ConfigError, match="token_cache must be a redis://"):
            parse_end_user_sec_params(idp.azure_params(token_cache=url))
    for url in ("redis://h:6379/0", "rediss://u:p@h:6380/1", "unix:///run/redis.sock?db=2"):
        assert parse_end_user_sec_params(idp.azure_params(token_cache=url)).token_cache == url


def test_token_cache_errors_and_repr_never_show_secrets(idp: LocalIdP) -> None:
    secret_url = "rediss://:hunter2-pass@cache.internal:6380/0?password=hunter3"
    config = parse_end_user_sec_params(
        idp.azure_params(token_cache=secret_url, token_cache_key=KEY_A)
    )
    shown = repr(config) + str(config)
    assert "hunter" not in shown and KEY_A not in shown
    assert "rediss://***@cache.internal:6380/0" in shown
    assert redact_url("redis://user:pw@h/0") == "redis://***@h/0"
    bad = "gopher://:s3cret-pw@h/0"
    with pytest.raises(ConfigError) as err:
        parse_end_user_sec_params(idp.azure_params(token_cache=bad, token_cache_key="s3cret-key"))
    message = str(err.value)
    assert "s3cret" not in message
    assert "token_cache must be" in message and "token_cache_key must be" in message


def test_token_cache_key_must_be_32_bytes(idp: LocalIdP) -> None:
    short = base64.urlsafe_b64encode(b"x" * 16).decode()
    damaged = KEY_A[:10] + "!!" + KEY_A[10:]  # the lenient decoder dropped the "!!"
    standard = base64.b64encode(b"\xfb" * 32).decode()  # "+" and "/": not URL-safe
    for key in (short, "not base64 !!", 42, damaged, standard, KEY_A + "A", KEY_A[:-2]):
        with pytest.raises(ConfigError, match="token_cache_key must be"):
            parse_end_user_sec_params(
                idp.azure_params(token_cache="redis://h", token_cache_key=key)
            )
    with pytest.raises(ConfigError, match="token_cache_key is set but token_cache"):
        parse_end_user_sec_params(idp.azure_params(token_cache_key=KEY_A))


def test_custom_module_without_credential_must_give_a_key() -> None:
    params = {"spi_type": "spi_static", "token_cache": "redis://127.0.0.1:1/0"}
    with pytest.raises(ConfigError, match="token_cache needs token_cache_key"):
        parse_end_user_sec_params(params)
    config = parse_end_user_sec_params({**params, "token_cache_key": KEY_A})
    assert cache_secret(config) == b"a" * 32
    # The token module is never handed the Redis URL (password) or the key.
    assert config.raw_params() == {"spi_type": "spi_static"}


def test_derived_key_agrees_across_instances_and_differs_across_apps(idp: LocalIdP) -> None:
    one = parse_end_user_sec_params(idp.azure_params(token_cache="redis://h/0"))
    two = parse_end_user_sec_params(idp.azure_params(token_cache="redis://h/0", timeout=3.0))
    other = parse_end_user_sec_params(
        idp.azure_params(token_cache="redis://h/0", client_credential="another-secret")
    )
    assert cache_secret(one) == cache_secret(two) != cache_secret(other)
    assert len(cache_secret(one)) == 32


# --- two levels -------------------------------------------------------------------------


def test_second_process_takes_the_token_from_redis(idp: LocalIdP, redis: RedisTestServer) -> None:
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("carol"))
    first, second = _source(params), _source(params)
    token = first.get_token(ctx)
    assert second.get_token(ctx) == token
    assert idp.token_requests("on_behalf_of") == 1
    assert isinstance(second.cache, SharedTokenCache) and second.cache.l2_hits == 1


def test_redis_holds_no_token_secret_or_identity_in_plaintext(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    params = _params(idp, redis)
    users = [idp.issue_user_token(f"scan{i}", oid=f"oid-scan-{i}") for i in range(3)]
    source = _source(params)
    tokens = [source.get_token(EndUserContext(u)) for u in users]
    entries = _entries(redis)
    assert len(entries) == 3
    forbidden: list[str] = [idp.client_secret, idp.client_id]
    for user, token in zip(users, tokens, strict=True):
        claims = idp.decode(token)
        forbidden += [user, token, *token.split("."), claims["sub"], claims["oid"]]
        forbidden += [claims["upn"], claims["preferred_username"], claims["name"]]
    raw = b"".join(k + b"\0" + v for k, v in _raw(redis).items())
    raw += b"".join(k + b"\0" + v for k, v in entries.items())
    for text in forbidden:
        assert text.encode() not in raw, "plaintext found in Redis"
        assert base64.b64encode(text.encode()) not in raw
    for key in entries:
        assert key.startswith(ENTRY_PREFIX.encode()) and len(key) == len(ENTRY_PREFIX) + 64


def test_ttl_ends_before_the_token_expires(idp: LocalIdP, redis: RedisTestServer) -> None:
    source = _source(_params(idp, redis))
    token = source.get_token(EndUserContext(idp.issue_user_token("ttl")))
    client = redis_py.Redis.from_url(redis.url)
    try:
        (name,) = list(client.scan_iter(ENTRY_PREFIX + "*"))
        ttl = client.pttl(name) / 1000
    finally:
        client.close()
    remaining = idp.decode(token)["exp"] - time.time()
    assert 0 < ttl < remaining - 20  # the cache's safety margin (30 s) before expiry


def _reseal_everything(redis: RedisTestServer, change: Any) -> None:
    client = redis_py.Redis.from_url(redis.url)
    try:
        for name in list(client.scan_iter(ENTRY_PREFIX + "*")):
            client.set(name, change(name.decode(), client.get(name)), px=60_000)
    finally:
        client.close()


def test_entries_sealed_with_another_key_are_misses(idp: LocalIdP, redis: RedisTestServer) -> None:
    params = _params(idp, redis, token_cache_key=KEY_A)
    ctx = EndUserContext(idp.issue_user_token("dave"))
    _source(params).get_token(ctx)
    other = Sealer(b"b" * 32)
    # An attacker with write access to Redis stores a token under the right
    # name, sealed with another key: it is not served.
    forged = idp.sign({"sub": "mallory", "exp": int(time.time()) + 3600})
    _reseal_everything(redis, lambda name, _: other.seal(name, forged, time.time() + 3600, False))
    reader = _source(params)
    assert reader.get_token(ctx) != forged
    assert idp.token_requests("on_behalf_of") == 2
    # Another app (another key) in the same Redis shares nothing with this one.
    stranger = _source(_params(idp, redis, token_cache_key=KEY_B))
    stranger.get_token(ctx)
    assert idp.token_requests("on_behalf_of") == 3


def test_tampered_entries_are_misses(idp: LocalIdP, redis: RedisTestServer) -> None:
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("erin"))
    token = _source(params).get_token(ctx)

    def flip(_: str, blob: bytes) -> bytes:
        return blob[:-1] + bytes([blob[-1] ^ 1])

    _reseal_everything(redis, flip)
    again = _source(params).get_token(ctx)
    assert again != token  # a fresh token from the provider, not the tampered one
    assert idp.token_requests("on_behalf_of") == 2
    _reseal_everything(redis, lambda _, blob: b"garbage")
    _source(params).get_token(ctx)
    assert idp.token_requests("on_behalf_of") == 3


def test_an_entry_copied_under_another_users_name_does_not_open(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    params = _params(idp, redis)
    alice, bob = (EndUserContext(idp.issue_user_token(u)) for u in ("alice2", "bob2"))
    first = _source(params)
    alice_token = first.get_token(alice)
    bob_token = first.get_token(bob)
    entries = _entries(redis)
    sealer = Sealer(cache_secret(first.config))
    opened = {k: sealer.open(k.decode(), v) for k, v in entries.items()}
    alice_blob = next(
        entries[k] for k, o in opened.items() if o is not None and o.token == alice_token
    )
    client = redis_py.Redis.from_url(redis.url)
    try:
        for name in entries:
            client.set(name, alice_blob, px=60_000)  # replay alice's entry everywhere
    finally:
        client.close()
    got = _source(params).get_token(bob)
    assert got not in (alice_token, bob_token)  # a miss: a new token for bob
    assert idp.decode(got)["upn"] == "bob2@example.test"


# --- the fleet lock ---------------------------------------------------------------------


def test_a_dead_lock_holder_blocks_nobody_past_the_lock_expiry(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("frank"))
    source = _source(params)
    key, _ = source._plan(ctx)
    assert isinstance(source.cache, SharedTokenCache)
    digest = source.cache.l2.sealer.digest(key)
    client = redis_py.Redis.from_url(redis.url)
    try:
        # A process took the lock and died: nobody will release it.
        client.set(LOCK_PREFIX + digest, "dead-owner", px=1500)
        started = time.monotonic()
        source.get_token(ctx)
        elapsed = time.monotonic() - started
        assert client.get(LOCK_PREFIX + digest) is None  # released by its new owner
    finally:
        client.close()
    assert 1.0 < elapsed < 8.0  # waited for the expiry, far less than the 10 s timeout
    assert idp.token_requests("on_behalf_of") == 1


def test_a_lock_is_released_only_by_its_owner(idp: LocalIdP, redis: RedisTestServer) -> None:
    source = _source(_params(idp, redis))
    assert isinstance(source.cache, SharedTokenCache)
    l2 = source.cache.l2
    owner = l2.acquire("d1")
    assert owner is not None and l2.acquire("d1") is None
    l2.release("d1", "someone-else")
    assert l2.acquire("d1") is None  # still held
    l2.release("d1", owner)
    assert l2.acquire("d1") is not None


def test_refresh_ahead_one_refresher_for_the_fleet(idp: LocalIdP, redis: RedisTestServer) -> None:
    idp.expires_in = 8  # usable 6 s (margin 2 s), refresh window the last 3 s
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("grace"))
    sources = [_source(params) for _ in range(4)]
    first = {s.get_token(ctx) for s in sources}
    assert len(first) == 1 and idp.token_requests("on_behalf_of") == 1
    time.sleep(3.6)  # inside every process's refresh window
    for s in sources:
        assert s.get_token(ctx) in first  # served at once; refresh in the background
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        if all(s.cache.peek(s._plan(ctx)[0]) not in first for s in sources):
            break
        time.sleep(0.05)
    fresh = {s.cache.peek(s._plan(ctx)[0]) for s in sources}
    assert len(fresh) == 1 and not fresh & first
    assert idp.token_requests("on_behalf_of") == 2  # one refresh for the four "processes"


# --- failure is never an outage -----------------------------------------------------------


def test_redis_killed_mid_run_no_request_fails_and_it_comes_back(
    idp: LocalIdP, redis: RedisTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    params = _params(idp, redis)
    users = [EndUserContext(idp.issue_user_token(f"k{i}")) for i in range(6)]
    source = _source(params)
    errors: list[BaseException] = []
    served = 0
    slowest = 0.0
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal served, slowest
        i = n
        while not stop.is_set():
            ctx = users[i % len(users)]
            if i % 7 == 0:
                source.invalidate(ctx)  # force L1 misses all along
            started = time.monotonic()
            try:
                source.get_token(ctx)
            except BaseException as exc:
                errors.append(exc)
            with lock:
                served += 1
                slowest = max(slowest, time.monotonic() - started)
            i += 3

    caplog.set_level(logging.INFO, logger="deepsec.tokens")
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    redis.kill()
    time.sleep(1.5)
    during = served
    time.sleep(1.0)
    during = served - during
    stop.set()
    for t in threads:
        t.join()
    assert errors == [], [(repr(e), repr(e.__cause__)) for e in errors[:3]]  # (why, if it fails)
    assert during > 20  # requests went on while Redis was down
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.message
    ]
    assert len(warnings) == 1  # one per outage, not one per request
    assert "127.0.0.1" in warnings[0].message
    assert isinstance(source.cache, SharedTokenCache)
    assert not source.cache.l2.breaker.closed

    redis.start()
    newcomer = EndUserContext(idp.issue_user_token("after-restart"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _entries(redis):
        source.invalidate(newcomer)
        source.get_token(newcomer)
        time.sleep(0.2)
    assert _entries(redis), "L2 not used again within 30 s of Redis coming back"
    calls = idp.token_requests("on_behalf_of")
    assert _source(params).get_token(newcomer)  # a new process: from L2
    assert idp.token_requests("on_behalf_of") == calls
    assert any("reachable again" in r.message for r in caplog.records)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A Redis URL whose server never answers: the kernel accepts connections
    into the listen backlog, nothing ever reads or replies (a hung Redis, a
    black-holed network path)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_dead_redis_costs_no_per_request_wait(idp: LocalIdP, silent_endpoint: str) -> None:
    params = idp.azure_params("on_behalf_of", token_cache=silent_endpoint, timeout=10.0)
    source = _source(params)
    users = [EndUserContext(idp.issue_user_token(f"d{i}")) for i in range(10)]
    started = time.monotonic()
    source.get_token(users[0])  # the outage is noticed here: one socket timeout
    assert time.monotonic() - started >= 0.4  # the endpoint really never answers
    assert isinstance(source.cache, SharedTokenCache)
    assert not source.cache.l2.breaker.closed
    started = time.monotonic()
    for ctx in users[1:]:
        source.get_token(ctx)  # misses: straight to the provider, no Redis wait
    per_miss = (time.monotonic() - started) / 9
    # A socket timeout each would exceed this; a provider call each, on a
    # loaded machine, does not.
    assert per_miss < SOCKET_TIMEOUT
    assert idp.token_requests("on_behalf_of") == 10


def test_slow_redis_costs_one_timeout_per_outage(
    idp: LocalIdP, redis: RedisTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    source = _source(_params(idp, redis))
    source.get_token(EndUserContext(idp.issue_user_token("warm")))
    redis.command("CLIENT", "PAUSE", "5500", "ALL")  # Redis answers nobody for 5.5 s
    users = [EndUserContext(idp.issue_user_token(f"slow{i}")) for i in range(10)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="deepsec.tokens"):
        for ctx in users:
            source.get_token(ctx)
    elapsed = time.monotonic() - started
    # One socket timeout (and a probe's now and then), not one per request:
    # 10 would take 5 s (inside the pause), besides the provider calls.
    assert elapsed < len(users) * SOCKET_TIMEOUT
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
    assert idp.token_requests("on_behalf_of") == len(users) + 1


def test_full_redis_is_not_an_outage(
    idp: LocalIdP, redis: RedisTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deepsec.tokens")
    redis.command("CONFIG", "SET", "maxmemory", "1")  # every write now refused (OOM)
    try:
        source = _source(_params(idp, redis))
        assert isinstance(source.cache, SharedTokenCache)
        # Misses for 4 s: past several breaker probes (1 s, 2 s), whose reads
        # work while the writes are still refused.
        deadline = time.monotonic() + 4.0
        calls = 0
        while time.monotonic() < deadline:
            assert source.get_token(EndUserContext(idp.issue_user_token(f"oom{calls}")))
            calls += 1
            time.sleep(0.05)
        assert idp.token_requests("on_behalf_of") == calls
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1, [r.message for r in warned]  # one per outage
        assert "refuses writes" in warned[0].message
        assert source.cache.l2.breaker.closed  # reads still go to Redis
        assert not source.cache.l2.writes.closed
    finally:
        redis.command("CONFIG", "SET", "maxmemory", "0")
    # Writes accepted again: the next probe's write closes it, L2 is shared again.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not _entries(redis):
        source.get_token(EndUserContext(idp.issue_user_token(f"oom{calls}")))
        calls += 1
        time.sleep(0.1)
    assert _entries(redis) and source.cache.l2.writes.closed
    assert any("accepts writes again" in r.message for r in caplog.records)


def test_invalidate_drops_the_token_in_l1_and_l2(idp: LocalIdP, redis: RedisTestServer) -> None:
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("heidi"))
    source = _source(params)
    token = source.get_token(ctx)
    assert len(_entries(redis)) == 1
    source.invalidate(ctx)  # what ORA-52602 does
    assert _entries(redis) == {}
    assert source.cached_token(ctx) is None
    assert source.get_token(ctx) != token
    assert idp.token_requests("on_behalf_of") == 2


def test_a_late_rejection_never_marks_the_fresh_token_rejected(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    """Process B meets ORA-52602 for the old token after A already replaced it.

    Compare-and-invalidate: B drops the rejected token only; the fresh one stays
    in B's L1 and in Redis, and no process fetches again.
    """
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("hugo"))
    a = _source(params)
    old = a.get_token(ctx)
    a.invalidate(ctx, token=old)  # the database rejected it on A
    new = a.get_token(ctx)
    assert new != old
    b = _source(params)
    assert b.get_token(ctx) == new  # B read the fresh one from Redis
    b.invalidate(ctx, token=old)  # a connection of B still held the old one
    assert b.cached_token(ctx) == new
    assert len(_entries(redis)) == 1
    assert _source(params).get_token(ctx) == new  # a third process: from Redis
    assert idp.token_requests("on_behalf_of") == 2


# --- asyncio ---------------------------------------------------------------------------


def test_async_path_reads_l2_off_the_event_loop(idp: LocalIdP, redis: RedisTestServer) -> None:
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("ivan"))
    token = _source(params).get_token(ctx)
    reader = _source(params)
    assert isinstance(reader.cache, SharedTokenCache)
    loop_thread: list[int] = []

    async def main() -> list[str]:
        loop_thread.append(threading.get_ident())
        return list(await asyncio.gather(*(reader.get_token_async(ctx) for _ in range(16))))

    assert asyncio.run(main()) == [token] * 16
    assert reader.cache.l2_hits >= 1 and reader.cache.fetches == 0  # no fetch, no thread
    assert idp.token_requests("on_behalf_of") == 1


def test_async_path_survives_a_dead_redis(idp: LocalIdP, redis: RedisTestServer) -> None:
    source = _source(_params(idp, redis))
    redis.kill()
    users = [EndUserContext(idp.issue_user_token(f"ad{i}")) for i in range(4)]

    async def main() -> list[str]:
        return list(await asyncio.gather(*(source.get_token_async(u) for u in users)))

    assert len(set(asyncio.run(main()))) == 4


def test_sources_of_one_config_share_one_redis_client(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    config = parse_end_user_sec_params(_params(idp, redis))
    source = token_source_for(config)
    cache = source.cache  # type: ignore[attr-defined]
    assert isinstance(cache, SharedTokenCache)
    assert _source(_params(idp, redis)).cache.l2 is cache.l2  # type: ignore[attr-defined]
    assert idp.client_secret not in repr(cache) and "redis://127.0.0.1" in repr(cache)
    clear_token_sources()  # drops the Redis clients and their breakers too
    fresh = token_source_for(config).cache  # type: ignore[attr-defined]
    assert fresh.l2 is not cache.l2


# --- TLS ---------------------------------------------------------------------------------


def test_rediss_with_a_private_ca_and_a_password(idp: LocalIdP, tmp_path: Any) -> None:
    """``rediss://`` to a real TLS redis-server; a client that does not trust it goes on."""
    from deepsec.testing.redis import _free_port, redis_server_binary
    from deepsec.testing.tls import TestCA

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    with TestCA() as ca:
        cert = ca.issue_server_cert("127.0.0.1", name="redis")
        proc = subprocess.Popen(
            [
                binary,
                "--port", "0",
                "--tls-port", str(port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(cert.cert_path),
                "--tls-key-file", str(cert.key_path),
                "--tls-ca-cert-file", str(ca.ca_pem_path),
                "--tls-auth-clients", "no",
                "--requirepass", "tls-Pass-9",
                "--save", "",
                "--dir", str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"rediss://:tls-Pass-9@127.0.0.1:{port}/0?ssl_ca_certs={ca.ca_pem_path}"
            probe = redis_py.Redis.from_url(url, socket_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    break
                except redis_py.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            params = idp.azure_params("on_behalf_of", token_cache=url, timeout=10.0)
            ctx = EndUserContext(idp.issue_user_token("tls"))
            token = _source(params).get_token(ctx)
            assert _source(params).get_token(ctx) == token
            assert idp.token_requests("on_behalf_of") == 1
            assert len(list(probe.scan_iter(ENTRY_PREFIX + "*"))) == 1
            probe.close()
            # Without the private CA the TLS handshake fails: L1 and the provider serve.
            untrusted = idp.azure_params(
                "on_behalf_of", token_cache=url.split("?")[0], timeout=10.0
            )
            clear_token_sources()
            assert _source(untrusted).get_token(ctx)
            assert idp.token_requests("on_behalf_of") == 2
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_async_path_never_blocks_the_event_loop_on_a_stuck_redis(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    # A 2 s socket timeout: a blocking Redis call on the loop would stall it 2 s.
    url = redis.url + "?socket_timeout=2&socket_connect_timeout=2"
    params = idp.azure_params("on_behalf_of", token_cache=url, timeout=10.0)
    source = _source(params)
    users = [EndUserContext(idp.issue_user_token(f"lag{i}")) for i in range(4)]
    redis.command("CLIENT", "PAUSE", "3000", "ALL")
    lags: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    async def main() -> list[str]:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        started = time.monotonic()
        tokens = await asyncio.gather(*(source.get_token_async(u) for u in users))
        assert time.monotonic() - started >= 1.5  # Redis really held the calls up
        source.invalidate(users[0])  # the L2 delete must not block the loop either
        await asyncio.sleep(0.1)
        stop.set()
        await tick
        return list(tokens)

    assert len(set(asyncio.run(main()))) == 4
    # A blocking Redis call would stall it 2 s (the socket timeout above).
    assert max(lags) < 1.5, f"event loop stalled {max(lags):.2f} s"


# --- review fixes: breaker, clients, expiry, lock, names ------------------------------


def test_breaker_doubles_its_pause_only_on_a_failed_probe() -> None:
    breaker = CircuitBreaker("redis://h/0")
    assert breaker.failure(OSError()) is True  # opens: one outage
    for _ in range(6):  # calls in flight when it opened fail too
        assert breaker.failure(OSError()) is False
    assert breaker._open_until - time.monotonic() <= BREAKER_FIRST + 0.05
    assert breaker.outages == 1
    breaker._open_until = time.monotonic()  # the pause is over
    assert breaker.admit() == 2 and breaker.admit() == 0  # one probe, the others skip
    breaker.failure(OSError(), probe=True)
    assert BREAKER_FIRST < breaker._open_until - time.monotonic() <= 2 * BREAKER_FIRST + 0.05


def test_breaker_is_closed_by_its_probe_not_by_a_late_success() -> None:
    # A call sent before Redis died can succeed after another call's failure
    # opened the breaker: closing on that would announce a second outage at
    # the next failure (one WARNING per outage).
    breaker = CircuitBreaker("redis://h/0")
    assert breaker.failure(OSError()) is True
    breaker.success()  # in flight when it opened
    assert not breaker.closed
    assert breaker.failure(OSError()) is False and breaker.outages == 1
    breaker._open_until = time.monotonic()  # the pause is over
    assert breaker.admit() == 2  # this call probes
    breaker.success(probe=True)
    assert breaker.closed
    breaker.success()  # closed: nothing to do
    assert breaker.closed and breaker.outages == 1


def _unreached_l2() -> Any:
    # Nothing connects until a command is sent; the tests below send none
    # through redis-py, only through RedisL2._call with their own functions.
    from deepsec.tokens._redis_l2 import RedisL2

    return RedisL2("redis://127.0.0.1:1/0", Sealer(b"k" * 32), lock_ttl=1.0)


def test_breaker_through_calls_a_late_call_dying_leaves_the_probe_its_turn() -> None:
    from deepsec.tokens._redis_l2 import _L2Down

    l2 = _unreached_l2()

    class Killed(BaseException):
        pass

    def sent_before_the_outage() -> None:
        # While this call is out, another one fails and the pause passes; a
        # third one is the probe.
        l2.breaker.failure(OSError())
        l2.breaker._open_until = time.monotonic()
        assert l2.breaker.admit() == 2
        raise Killed

    with pytest.raises(Killed):
        l2._call(sent_before_the_outage)
    assert l2.breaker._probing  # still the probe's turn
    l2.breaker.success(probe=True)
    assert l2.breaker.closed

    # A probe that dies gives its turn back: the next call probes.
    l2.breaker.failure(OSError())
    l2.breaker._open_until = time.monotonic()

    def dies() -> None:
        raise Killed

    with pytest.raises(Killed):
        l2._call(dies)
    assert not l2.breaker._probing and l2.breaker.admit() == 2

    # A refused write that was the main breaker's probe closes it: Redis answered.
    l2.breaker.abandon()

    def refused() -> None:
        raise redis_py.ResponseError("OOM command not allowed")

    with pytest.raises(_L2Down):
        l2._call(refused, write=True)
    assert l2.breaker.closed and not l2.writes.closed


def test_asyncio_run_many_times_leaks_no_redis_client(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    params = _params(idp, redis)
    users = [EndUserContext(idp.issue_user_token(f"run{i}")) for i in range(3)]
    writer = _source(params)
    tokens = [writer.get_token(u) for u in users]
    reader = _source(params)
    assert isinstance(reader.cache, SharedTokenCache)
    probe = redis_py.Redis.from_url(redis.url)
    try:
        before = int(probe.info("clients")["connected_clients"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(60):  # a Celery worker or a script: one loop per call
                reader.cache.clear()  # L1 only: every call reads L2
                assert asyncio.run(reader.get_token_async(users[i % 3])) == tokens[i % 3]
            gc.collect()
        after = int(probe.info("clients")["connected_clients"])
    finally:
        probe.close()
    assert reader.cache.l2_hits == 60 and idp.token_requests("on_behalf_of") == 3
    assert after - before <= 8, f"{after - before} Redis connections left open"
    assert not [w for w in caught if "unclosed" in str(w.message).lower()]


def test_a_reader_never_serves_past_the_writers_margin_or_the_redis_ttl(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    idp.expires_in = 8  # the writer's margin: 8 / 4 = 2 s before expiry
    params = _params(idp, redis)
    ctx = EndUserContext(idp.issue_user_token("margin"))
    writer = _source(params)
    writer.get_token(ctx)
    key, _ = writer._plan(ctx)
    written = writer.cache.expires_at(key)
    assert written is not None
    time.sleep(3.0)  # less life left: a margin recomputed now would be smaller
    reader = _source(params)
    reader.get_token(ctx)
    assert isinstance(reader.cache, SharedTokenCache) and reader.cache.l2_hits == 1
    read = reader.cache.expires_at(key)
    assert read is not None and read <= written + 0.05

    # Redis's TTL bounds it too (a reader whose clock is behind the writer's).
    idp.expires_in = 3600
    other = EndUserContext(idp.issue_user_token("ttl-bound"))
    _source(params).get_token(other)
    client = redis_py.Redis.from_url(redis.url)
    try:
        (name,) = [n for n in client.scan_iter(ENTRY_PREFIX + "*") if client.pttl(n) > 10_000]
        client.pexpire(name, 3000)
    finally:
        client.close()
    late = _source(params)
    late.get_token(other)
    expires = late.cache.expires_at(late._plan(other)[0])
    assert expires is not None and expires <= time.time() + 3.1


def test_instances_share_across_redis_urls_timeouts_and_cache_sizes(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    ctx = EndUserContext(idp.issue_user_token("rotate"))
    token = _source(_params(idp, redis)).get_token(ctx)
    # Another host alias for the same Redis, other timeout and cache size:
    # still the same tokens (what a password rotation or a unix socket is).
    alias = redis.url.replace("127.0.0.1", "localhost") + "?socket_keepalive=true"
    other = idp.azure_params("on_behalf_of", token_cache=alias, timeout=4.0, cache_size=500)
    assert _source(other).get_token(ctx) == token
    assert idp.token_requests("on_behalf_of") == 1
    # Other scopes are another token: never shared.
    scoped = idp.azure_params(
        "on_behalf_of", token_cache=redis.url, timeout=10.0, scopes="api://other/.default"
    )
    assert parse_end_user_sec_params(scoped).token_fingerprint != (
        parse_end_user_sec_params(other).token_fingerprint
    )


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_a_dead_holders_lock_ends_the_wait_and_in_process_waiters_do_not_fail(
    idp: LocalIdP, redis: RedisTestServer, use_async: bool
) -> None:
    params = idp.azure_params("on_behalf_of", token_cache=redis.url, timeout=1.5)
    ctx = EndUserContext(idp.issue_user_token(f"orphan-{use_async}"))
    dead = _source(params)  # a process that takes the lock and dies
    key, _ = dead._plan(ctx)
    assert isinstance(dead.cache, SharedTokenCache)
    digest = dead.cache.l2.sealer.digest(key)
    assert dead.cache.l2.acquire(digest) is not None  # never released
    source = _source(params)
    errors: list[BaseException] = []
    started = time.monotonic()
    if use_async:

        async def main() -> None:
            got = await asyncio.gather(
                *(source.get_token_async(ctx) for _ in range(4)), return_exceptions=True
            )
            errors.extend(g for g in got if isinstance(g, BaseException))

        asyncio.run(main())
    else:

        def one() -> None:
            try:
                source.get_token(ctx)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - started
    client = redis_py.Redis.from_url(redis.url)
    try:
        # The waiter took the expired lock and released it: one call, under the lock.
        assert client.get(LOCK_PREFIX + digest) is None
    finally:
        client.close()
    assert errors == []  # waiters in this process waited for their leader
    assert idp.token_requests("on_behalf_of") == 1
    assert 3.0 < elapsed < 8.0  # the lock's life (1.5 + 2 s), not more


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_one_cache_uses_l2_again_within_30_s_of_redis_returning(
    idp: LocalIdP, redis: RedisTestServer, use_async: bool
) -> None:
    params = _params(idp, redis)
    source = _source(params)
    assert isinstance(source.cache, SharedTokenCache)
    count = 0

    def get(ctx: EndUserContext) -> str:
        if use_async:
            return asyncio.run(source.get_token_async(ctx))
        return source.get_token(ctx)

    def user() -> EndUserContext:
        nonlocal count
        count += 1
        return EndUserContext(idp.issue_user_token(f"back{use_async}{count}"))

    get(user())
    assert len(_entries(redis)) == 1
    redis.kill()
    get(user())  # the outage is noticed
    assert not source.cache.l2.breaker.closed
    redis.start()
    back = time.monotonic()
    # Another process (its own Redis client: another URL for the same Redis)
    # writes a token while this one still skips Redis.
    shared = user()
    other = {**params, "token_cache": redis.url + "?socket_keepalive=true"}
    token = _source(other).get_token(shared)
    assert len(_entries(redis)) == 1
    hits = source.cache.l2_hits
    got = None
    while time.monotonic() - back < 30 and source.cache.l2_hits == hits:
        source.cache.clear()  # L1 only: every try is a miss
        got = get(shared)  # the provider while the breaker skips Redis
        time.sleep(0.2)
    assert source.cache.l2_hits > hits, "L2 not read again within 30 s"
    assert got == token  # the fleet's token, from L2
    assert source.cache.l2.breaker.closed
    before = len(_entries(redis))
    get(user())  # and written again
    assert len(_entries(redis)) == before + 1


def test_a_token_rejected_during_an_async_l2_read_is_not_kept(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    # A generous socket timeout: Redis pauses while the read is in flight.
    params = idp.azure_params(
        "on_behalf_of", token_cache=redis.url + "?socket_timeout=5", timeout=10.0
    )
    ctx = EndUserContext(idp.issue_user_token("reject-race"))
    token = _source(params).get_token(ctx)
    source = _source(params)
    key, _ = source._plan(ctx)

    async def main() -> str:
        redis.command("CLIENT", "PAUSE", "800", "ALL")
        task = asyncio.create_task(source.get_token_async(ctx))
        await asyncio.sleep(0.3)  # the L2 read is in flight, held by the pause
        # Meanwhile this process got the token and the database rejected it.
        source.cache.put(key, token, time.time() + 3600)
        source.invalidate(ctx)
        return await task

    assert asyncio.run(main()) != token
    assert source.cache.peek(key) != token


def test_invalidations_on_an_event_loop_start_no_thread_each(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    # A socket timeout longer than the pause below: the deletes wait, then land.
    params = idp.azure_params(
        "on_behalf_of", token_cache=redis.url + "?socket_timeout=5", timeout=10.0
    )
    users = [EndUserContext(idp.issue_user_token(f"inv{i}")) for i in range(12)]
    source = _source(params)
    for ctx in users:
        source.get_token(ctx)
    before = {t.ident for t in threading.enumerate()}

    async def main() -> int:
        redis.command("CLIENT", "PAUSE", "1000", "ALL")  # every L2 delete blocks
        for ctx in users:
            source.invalidate(ctx)  # what ORA-52602 does, on the loop
        await asyncio.sleep(0.2)
        return len(
            [
                t
                for t in threading.enumerate()
                if t.ident not in before and not t.name.startswith("deepsec-token-fetch")
            ]
        )

    assert asyncio.run(main()) == 0  # deepsec's worker threads, not one thread each
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _entries(redis):
        time.sleep(0.05)
    assert _entries(redis) == {}  # the deletes still happened


class _SlowLockReplies:
    """A TCP proxy to Redis that holds back the reply to ``SET ... NX`` (the
    fleet lock) for ``delay`` seconds: the command runs, its reply comes after
    the client's socket timeout (a lost or late reply on a real network)."""

    def __init__(self, target_port: int, delay: float = 1.0) -> None:
        self.delay = delay
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            held = threading.Event()
            threading.Thread(target=self._up, args=(client, server, held), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, held), daemon=True).start()

    @staticmethod
    def _up(src: socket.socket, dst: socket.socket, held: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if b"SET" in data.upper() and b"\r\nNX\r\n" in data.upper():
                    held.set()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.close()

    def _down(self, src: socket.socket, dst: socket.socket, held: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if held.is_set():
                    time.sleep(self.delay)
                    held.clear()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.close()

    def close(self) -> None:
        self._listener.close()


def test_a_lock_whose_reply_timed_out_is_not_left_behind(
    idp: LocalIdP, redis: RedisTestServer
) -> None:
    proxy = _SlowLockReplies(redis.port)
    try:
        params = idp.azure_params(
            "on_behalf_of", token_cache=f"redis://127.0.0.1:{proxy.port}/0", timeout=10.0
        )
        ctx = EndUserContext(idp.issue_user_token("late-reply"))
        source = _source(params)
        assert source.get_token(ctx)  # the lock's reply timed out: fetched directly
        assert isinstance(source.cache, SharedTokenCache)
        assert not source.cache.l2.breaker.closed
        client = redis_py.Redis.from_url(redis.url)
        try:
            deadline = time.monotonic() + 5  # the lock itself would live 12 s
            while time.monotonic() < deadline and list(client.scan_iter(LOCK_PREFIX + "*")):
                time.sleep(0.05)
            assert list(client.scan_iter(LOCK_PREFIX + "*")) == [], "orphaned lock left"
        finally:
            client.close()
    finally:
        proxy.close()
