"""SQLAlchemy engines (sync QueuePool and asyncio) through deepsec's per-operation hook.

Statements are tagged ``/* tag */`` and checked against the end-user context
the Oracle wire test server decoded from each round trip.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import deepsec
import spi_static
from deepsec.sqlalchemy import connect_args

pytestmark = pytest.mark.timeout(60)

PARAMS = {"spi_type": "spi_static", "client_id": "sqlalchemy-app"}
# What SQLAlchemy's oracle dialect runs on its first connect (2.1): the wire
# server answers every one of them.
DIALECT_INIT_PREFIXES = (
    "select sys_context( 'userenv', 'current_schema' ) from dual",
    "begin",
    "SELECT 1.1 FROM DUAL",
)


def token(name: str) -> str:
    return spi_static.make_jwt({"sub": name, "preferred_username": name})


def identity(name: str | None) -> Any:
    """Half the users are IAM-token users, half local (name, None) end users."""
    if name is None:
        return None
    return token(name) if int(name[-1]) % 2 == 0 else (name, None)


def tagged_users(server: Any, tag: str, since: int, minimum: int = 1) -> set[str | None]:
    trips = server.find_statements(f"/* {tag} */", since=since)
    assert len(trips) >= minimum, f"expected statements tagged {tag}, got {trips}"
    return {t.context.username if t.context is not None else None for t in trips}


def whoami(conn: sa.Connection, tag: str) -> Any:
    conn.execute(sa.text(f"select 1 /* {tag} */ from dual")).all()
    return conn.execute(
        sa.text(f"select xs_sys_context('xs$session','username') /* {tag} */ from dual")
    ).scalar()


@pytest.fixture
def server(oracle_server: Any) -> Iterator[Any]:
    spi_static.reset()
    yield oracle_server
    spi_static.reset()


def make_engine(server: Any, **options: Any) -> sa.Engine:
    return sa.create_engine(
        f"oracle+oracledb://{server.user}:{server.password}@",
        connect_args=connect_args(PARAMS, dsn=server.dsn, ssl_context=server.client_ssl_context()),
        **options,
    )


def make_async_engine(server: Any, **options: Any) -> AsyncEngine:
    return create_async_engine(
        f"oracle+oracledb_async://{server.user}:{server.password}@",
        connect_args=connect_args(PARAMS, dsn=server.dsn, ssl_context=server.client_ssl_context()),
        **options,
    )


def test_one_pooled_connection_reused_across_users(server: Any) -> None:
    engine = make_engine(server, pool_size=1, max_overflow=0)
    mark = server.mark()
    try:
        with engine.connect() as conn:  # first connect: dialect initialisation
            assert whoami(conn, "init") is None
        sequence = ["u0", "u1", None, "u3", "u0", None, "u2"]
        for i, name in enumerate(sequence):
            with deepsec.end_user(identity(name)), engine.connect() as conn:
                assert whoami(conn, f"seq-{i}") == name
            # The same pooled connection, outside any end_user block:
            with engine.connect() as conn:
                assert whoami(conn, f"after-{i}") is None
        for i, name in enumerate(sequence):
            assert tagged_users(server, f"seq-{i}", mark, minimum=2) == {name}
            assert tagged_users(server, f"after-{i}", mark, minimum=2) == {None}
    finally:
        engine.dispose()
    statements = server.statements(since=mark)
    assert len({t.conn_id for t in statements}) == 1, "the pool did not reuse its connection"
    init = [t for t in statements if t.sql.strip().startswith(DIALECT_INIT_PREFIXES)]
    assert len(init) >= 3 and all(t.error is None for t in init)
    assert [t for t in statements if t.error is not None] == []


def test_threads_with_different_users_share_one_engine(server: Any) -> None:
    engine = make_engine(server, pool_size=4, max_overflow=0)
    users = [f"t{i}" for i in range(10)]
    expected: dict[str, str | None] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(w)
        try:
            for j in range(40):
                name = rng.choice([*users, None])
                tag = f"th-{w}-{j}"
                with lock:
                    expected[tag] = name
                with deepsec.end_user(identity(name)), engine.connect() as conn:
                    got = whoami(conn, tag)
                if got != name:
                    errors.append(f"{tag}: {got} != {name}")
        except Exception as exc:
            errors.append(repr(exc))

    mark = server.mark()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
    finally:
        engine.dispose()
    assert errors == []
    assert len(expected) == 320
    for tag, name in expected.items():
        assert tagged_users(server, tag, mark, minimum=2) == {name}
    assert len({t.conn_id for t in server.statements(since=mark)}) <= 4


def test_token_failure_fails_closed(server: Any) -> None:
    engine = make_engine(server, pool_size=1, max_overflow=0)
    mark = server.mark()
    try:
        with engine.connect() as conn:  # the pool holds an open connection
            conn.execute(sa.text("select 1 /* sa-warm */ from dual"))
        spi_static.FAIL.append(RuntimeError("secret"))
        with engine.connect() as conn:  # noqa: SIM117 - the order matters
            # The pool's rollback on return runs after the block, as nobody.
            with (
                deepsec.end_user(("nobody-cached", None)),
                pytest.raises(deepsec.TokenAcquisitionError) as info,
            ):
                whoami(conn, "sa-fail")
        assert "secret" not in str(info.value)
        assert spi_static.CALLS, "the token module was not called"
        spi_static.FAIL.clear()
        with engine.connect() as conn:
            assert whoami(conn, "sa-after-fail") is None
    finally:
        spi_static.FAIL.clear()
        engine.dispose()
    assert server.find_statements("/* sa-fail */", since=mark) == []
    assert tagged_users(server, "sa-after-fail", mark, minimum=2) == {None}


def test_async_engine_with_asyncio_tasks(server: Any) -> None:
    users = [f"a{i}" for i in range(8)]
    plan = [(f"as-{i}", random.Random(i).choice([*users, None])) for i in range(40)]

    async def main() -> list[Any]:
        engine = make_async_engine(server, pool_size=3, max_overflow=0)

        async def one(tag: str, name: str | None) -> Any:
            async with deepsec.end_user(identity(name)), engine.connect() as conn:
                await conn.execute(sa.text(f"select 1 /* {tag} */ from dual"))
                await asyncio.sleep(0)  # let other tasks run between statements
                result = await conn.execute(
                    sa.text(f"select xs_sys_context('xs$session','username') /* {tag} */ from dual")
                )
                return result.scalar()

        async def outside(tag: str) -> Any:
            async with engine.connect() as conn:
                return (await conn.execute(sa.text(f"select 1 /* {tag} */ from dual"))).scalar()

        try:
            results = await asyncio.gather(*(one(tag, name) for tag, name in plan))
            results.append(await asyncio.gather(*(outside(f"aout-{i}") for i in range(3))))
            return results
        finally:
            await engine.dispose()

    mark = server.mark()
    results = asyncio.run(main())
    assert results[:-1] == [name for _, name in plan]
    for tag, name in plan:
        assert tagged_users(server, tag, mark, minimum=2) == {name}
    for i in range(3):
        assert tagged_users(server, f"aout-{i}", mark) == {None}
    assert len({t.conn_id for t in server.statements(since=mark)}) <= 3


def test_async_engine_sync_block_without_token_fails_closed(server: Any) -> None:
    async def main() -> None:
        engine = make_async_engine(server, pool_size=1, max_overflow=0)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1 /* warm */ from dual"))
            # A plain `with` cannot fetch a token off the loop: the statement
            # refuses to run rather than run as the application; the pool's
            # rollback on return (it reads nothing) still resets the connection.
            with pytest.raises(deepsec.TokenNotReadyError), deepsec.end_user(("never", None)):
                async with engine.connect() as conn:
                    await conn.execute(sa.text("select 1 /* not-ready */ from dual"))
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1 /* recovered */ from dual"))
        finally:
            await engine.dispose()

    mark = server.mark()
    asyncio.run(main())
    assert server.find_statements("/* warm */", since=mark)
    assert server.find_statements("/* not-ready */", since=mark) == []
    assert tagged_users(server, "recovered", mark) == {None}


def test_connect_args_helper() -> None:
    args = connect_args(PARAMS, extra_auth_params={"other": 1}, dsn="x", stmtcachesize=5)
    assert args == {
        "dsn": "x",
        "stmtcachesize": 5,
        "extra_auth_params": {"other": 1, "end_user_sec_params": PARAMS},
    }
    assert args["extra_auth_params"]["end_user_sec_params"] is not PARAMS
    with pytest.raises(deepsec.ConfigError, match="spi_type"):
        connect_args({"client_secret": "hunter2"})
    with pytest.raises(deepsec.ConfigError, match="once"):
        connect_args(PARAMS, extra_auth_params={"end_user_sec_params": PARAMS})
