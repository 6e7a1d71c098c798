"""The shared token cache end to end: python-oracledb thin over TCPS to the wire
test server, a custom ``spi_type`` module, and a real Redis.

ORA-52602 (the database rejected the access token) must drop the token in the
process *and* in Redis, so no other process is handed it again.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import oracledb
import pytest
import redis as redis_py

import deepsec
import spi_static
from deepsec.testing.redis import RedisTestServer
from deepsec.tokens import clear_token_sources
from deepsec.tokens.sealed import ENTRY_PREFIX, Sealer
from hook_support import USERNAME_SQL, fresh_hook_state

KEY = b"e" * 32


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    yield from fresh_hook_state()


def _params(redis: RedisTestServer) -> dict[str, object]:
    # spi_static has no client credential: the key must be given.
    return {
        "end_user_sec_params": {
            "spi_type": "spi_static",
            "client_id": "hr-app",
            "token_cache": redis.url,
            "token_cache_key": base64.urlsafe_b64encode(KEY).decode(),
        }
    }


def _tokens_in_redis(redis: RedisTestServer) -> list[str]:
    client = redis_py.Redis.from_url(redis.url)
    sealer = Sealer(KEY)
    try:
        opened = [
            sealer.open(k.decode(), client.get(k)) for k in client.scan_iter(ENTRY_PREFIX + "*")
        ]
    finally:
        client.close()
    return [o.token for o in opened if o is not None]


def _whoami(conn: oracledb.Connection, tag: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(f"{USERNAME_SQL} /* {tag} */")
        return cur.fetchone()[0]  # type: ignore[index]


@pytest.mark.timeout(60)
def test_rejected_token_is_dropped_from_l1_and_l2(oracle, redis: RedisTestServer) -> None:  # type: ignore[no-untyped-def]
    user = spi_static.make_jwt({"preferred_username": "omar", "sub": "sub-omar"})
    kwargs = {**oracle.connect_kwargs(), "extra_auth_params": _params(redis)}
    with oracledb.connect(**kwargs) as conn, deepsec.end_user(user):
        assert _whoami(conn, "first") == "omar"
        first = oracle.find_statements("/* first */")[0].context.database_access_token
        assert _tokens_in_redis(redis) == [first]
        oracle.token_validator = lambda kind, token: (
            not (kind == "database_access_token" and token == first)
        )
        with pytest.raises(oracledb.DatabaseError, match="ORA-52602"):
            _whoami(conn, "rejected")
        assert first not in _tokens_in_redis(redis)  # gone from Redis too
        assert _whoami(conn, "second") == "omar"
    second = oracle.find_statements("/* second */")[0].context.database_access_token
    assert second != first and _tokens_in_redis(redis) == [second]
    assert len(spi_static.CALLS) == 2

    # Another process (an empty L1) gets the new token from Redis, no new call.
    clear_token_sources()
    with oracledb.connect(**kwargs) as conn, deepsec.end_user(user):
        assert _whoami(conn, "other-process") == "omar"
    other = oracle.find_statements("/* other-process */")[0].context.database_access_token
    assert other == second
    assert len(spi_static.CALLS) == 2
