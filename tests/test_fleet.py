"""The shared token cache across a fleet of real processes.

8 spawned processes x 16 threads (or asyncio tasks), all cold, ask at once
for tokens through the local identity provider over HTTPS, with Redis (a real
``redis-server``) as the shared cache.  The provider's own request log counts
the on-behalf-of calls: one per user for the whole fleet.  The processes stay
up across rounds (module-scoped fleet) to keep the test short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from deepsec.testing.fleet import Fleet
from deepsec.testing.idp import LocalIdP
from deepsec.testing.redis import RedisTestServer

PROCESSES = 8
THREADS = 16


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(PROCESSES) as running:
        yield running


def _params(idp: LocalIdP, redis: RedisTestServer) -> dict[str, Any]:
    # A generous timeout: on a loaded 2-core machine the lock holder's first
    # request (MSAL start-up included) can take seconds, and a waiter that
    # gives up early fetches on its own.
    return idp.azure_params("on_behalf_of", token_cache=redis.url, timeout=15.0)


@pytest.mark.parametrize("use_async", [False, True], ids=["threads", "asyncio"])
def test_one_user_one_call_for_the_whole_fleet(
    fleet: Fleet, idp: LocalIdP, redis: RedisTestServer, use_async: bool
) -> None:
    user = idp.issue_user_token("fleet-one")
    result = fleet.run(_params(idp, redis), [user], threads=THREADS, use_async=use_async)
    assert result.errors == []
    assert len(result.latencies) == PROCESSES * THREADS
    assert idp.token_requests("on_behalf_of") == 1
    # The other processes took the token from Redis, not from the provider.
    assert result.l2_hits == PROCESSES - 1


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
