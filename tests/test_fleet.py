"""The shared token cache across a fleet of real processes.

8 spawned processes x 16 threads (or asyncio tasks), all cold, ask at once
for tokens through the local identity provider over HTTPS, with Redis (a real
``redis-server``) as the shared cache.  The provider's own request log counts
the on-behalf-of calls: one per user for the whole fleet.  The processes stay
up across rounds (module-scoped fleet) to keep the test short.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py

from deepsec.testing.fleet import Fleet
from deepsec.testing.idp import LocalIdP
from deepsec.testing.redis import RedisTestServer
from deepsec.tokens.sealed import LOCK_PREFIX

PROCESSES = 8
THREADS = 16

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(PROCESSES) as running:
        yield running


def _params(idp: LocalIdP, redis: RedisTestServer) -> dict[str, Any]:
    # A generous timeout: on a loaded 2-core machine the lock holder's first
    # request (MSAL start-up included) can take seconds, and a waiter that
    # gives up early fetches on its own.  A generous Redis socket timeout too
    # (the library's is 0.5 s): one late Redis answer opened a worker's
    # breaker, and that worker fetched every user itself (a 0.8 s Redis stall:
    # 128 calls instead of 20).  A killed Redis still fails at once.
    url = redis.url + "?socket_timeout=5&socket_connect_timeout=5"
    return idp.azure_params("on_behalf_of", token_cache=url, timeout=15.0)


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_one_user_one_call_for_the_whole_fleet(
    fleet: Fleet, idp: LocalIdP, redis: RedisTestServer, use_async: bool
) -> None:
    user = idp.issue_user_token("fleet-one")
    result = fleet.run(_params(idp, redis), [user], threads=THREADS, use_async=use_async)
    assert result.errors == []
    assert len(result.latencies) == PROCESSES * THREADS
    assert idp.token_requests("on_behalf_of") == 1
    # The other processes took the token from Redis, not from the provider
    # (at least once each; an asyncio task racing the fetch may count again).
    assert result.l2_hits >= PROCESSES - 1


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_twenty_users_twenty_calls(
    fleet: Fleet, idp: LocalIdP, redis: RedisTestServer, use_async: bool
) -> None:
    users = [idp.issue_user_token(f"fleet-{i}") for i in range(20)]
    result = fleet.run(_params(idp, redis), users, threads=THREADS, use_async=use_async)
    assert result.errors == []
    assert len(result.latencies) == PROCESSES * THREADS
    assert idp.token_requests("on_behalf_of") == 20


def test_without_token_cache_every_process_asks(fleet: Fleet, idp: LocalIdP) -> None:
    """The control: the per-process cache costs one call per process."""
    user = idp.issue_user_token("fleet-control")
    result = fleet.run(idp.azure_params("on_behalf_of"), [user], threads=THREADS)
    assert result.errors == []
    assert idp.token_requests("on_behalf_of") == PROCESSES


def test_fleet_with_redis_down_fails_nothing_and_shares_again_once_it_is_back(
    fleet: Fleet, idp: LocalIdP, redis: RedisTestServer
) -> None:
    redis.kill()
    users = [idp.issue_user_token(f"down-{i}") for i in range(4)]
    result = fleet.run(_params(idp, redis), users, threads=THREADS, use_async=True)
    assert result.errors == []  # no request failed
    assert len(result.latencies) == PROCESSES * THREADS
    # Every process asked for itself (once per user: in-process single-flight).
    assert idp.token_requests("on_behalf_of") == PROCESSES * len(users)
    redis.start()
    idp.reset()
    users = [idp.issue_user_token(f"back-{i}") for i in range(4)]
    result = fleet.run(_params(idp, redis), users, threads=THREADS)
    assert result.errors == []
    assert idp.token_requests("on_behalf_of") == len(users)


def test_redis_killed_in_the_middle_of_a_fleet_run(
    fleet: Fleet, idp: LocalIdP, redis: RedisTestServer
) -> None:
    idp.faults.delay(0.8, times=None, target="azure")  # holders stay mid-fetch a while
    killed = threading.Event()

    def kill_once_a_lock_is_held() -> None:
        client = redis_py.Redis.from_url(redis.url, socket_timeout=2)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                if next(client.scan_iter(LOCK_PREFIX + "*", count=1000), None) is not None:
                    break
                time.sleep(0.005)
        finally:
            client.close()
        redis.kill()  # a holder is fetching, the others poll Redis for its result
        killed.set()

    killer = threading.Thread(target=kill_once_a_lock_is_held)
    killer.start()
    users = [idp.issue_user_token(f"mid-{i}") for i in range(8)]
    result = fleet.run(_params(idp, redis), users, threads=THREADS)
    killer.join()
    assert killed.is_set()
    assert result.errors == []  # 0 failed requests
    assert len(result.latencies) == PROCESSES * THREADS
    assert len(users) <= idp.token_requests("on_behalf_of") <= PROCESSES * len(users)

    redis.start()
    idp.reset()
    users = [idp.issue_user_token(f"after-{i}") for i in range(8)]
    result = fleet.run(_params(idp, redis), users, threads=THREADS)
    assert result.errors == []
    assert idp.token_requests("on_behalf_of") == len(users)  # shared through L2 again
