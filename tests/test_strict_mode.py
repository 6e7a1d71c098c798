"""Strict mode (``require_end_user``) and ``as_application()``, end to end.

Real thin driver over TCPS to the wire test server.  "Refused before any
round trip" is judged on the wire: the server records every round trip of
the connection, and a refused statement must add none.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import oracledb
import pytest

import deepsec
import spi_static
from deepsec import ConfigError, NoEndUserError
from hook_support import USERNAME_SQL, fresh_hook_state, user_token


def strict(**extra: object) -> dict[str, object]:
    return {
        "end_user_sec_params": {
            "spi_type": "spi_static",
            "client_id": "hr-app",
            "require_end_user": True,
            **extra,
        }
    }


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    yield from fresh_hook_state()


def whoami(conn: oracledb.Connection, tag: str) -> str | None:
    with conn.cursor() as cur:
        cur.execute(f"{USERNAME_SQL} /* {tag} */")
        return cur.fetchone()[0]


def trips(server, conn, since: int) -> list[str]:
    return [t.function for t in server.round_trips(conn.session_id, since=since)]


@pytest.mark.timeout(30)
def test_statement_without_end_user_is_refused_before_any_round_trip(oracle):
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=strict()) as conn:
        mark = oracle.mark()
        with pytest.raises(NoEndUserError, match="as_application") as info:
            whoami(conn, "refused")
        assert "require_end_user" in str(info.value)
        assert trips(oracle, conn, mark) == []  # nothing went out
        assert oracle.find_statements("refused") == []
        # The connection is intact: with an end user the same statement runs.
        with deepsec.end_user(user_token("alice")):
            assert whoami(conn, "alice-ok") == "alice"
        # And the refusal holds again once the end user is gone.
        mark = oracle.mark()
        with pytest.raises(NoEndUserError):
            conn.cursor().execute("select 1 from dual")
        assert trips(oracle, conn, mark) == []


@pytest.mark.timeout(30)
def test_housekeeping_is_never_refused(oracle):
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=strict()) as conn:
        mark = oracle.mark()
        conn.ping()
        conn.commit()
        conn.rollback()
        assert trips(oracle, conn, mark) == ["ping", "commit", "rollback"]
        session = conn.session_id
    # close() sent its logoff too
    assert [t.function for t in oracle.round_trips(session, since=mark)][-1] == "logoff"


@pytest.mark.timeout(30)
def test_as_application_runs_with_no_end_user_and_restores_the_previous_one(oracle):
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=strict()) as conn:
        with deepsec.as_application():
            assert deepsec.current_end_user() is None
            assert whoami(conn, "app-1") is None
        with deepsec.end_user(user_token("bob")):
            assert whoami(conn, "bob-1") == "bob"
            with deepsec.as_application():  # even with bob current: no end user
                assert deepsec.current_end_user() is None
                assert whoami(conn, "app-2") is None
            assert whoami(conn, "bob-2") == "bob"  # restored on exit
        with pytest.raises(NoEndUserError):  # and outside both: refused again
            whoami(conn, "after")
    contexts = {t: oracle.find_statements(f"/* {t} */") for t in ("app-1", "app-2", "bob-2")}
    assert contexts["app-1"][0].context is None and contexts["app-2"][0].context is None
    assert contexts["bob-2"][0].context.username == "bob"
    assert oracle.find_statements("/* after */") == []


@pytest.mark.timeout(30)
def test_as_application_restores_on_exception_and_is_one_block_at_a_time():
    scope = deepsec.as_application()
    with deepsec.end_user(user_token("carol")):
        with pytest.raises(ZeroDivisionError), scope:
            raise ZeroDivisionError
        assert deepsec.current_end_user() is not None
        with scope, pytest.raises(RuntimeError, match="already in use"), scope:
            pass


@pytest.mark.timeout(30)
def test_strict_mode_through_a_pool_in_threads(oracle):
    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=strict(), min=0, max=4)
    results: dict[str, object] = {}
    start = threading.Barrier(4)

    def anonymous() -> None:
        start.wait()
        with pool.acquire() as conn:
            try:
                whoami(conn, "thread-anon")
            except NoEndUserError as exc:
                results["anon"] = exc

    def user(name: str) -> None:
        start.wait()
        with deepsec.end_user(user_token(name)), pool.acquire() as conn:
            results[name] = whoami(conn, f"thread-{name}")

    def app_job() -> None:
        start.wait()
        with deepsec.as_application(), pool.acquire() as conn:
            results["app"] = whoami(conn, "thread-app")

    threads = [
        threading.Thread(target=anonymous),
        threading.Thread(target=user, args=("dana",)),
        threading.Thread(target=user, args=("erik",)),
        threading.Thread(target=app_job),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert isinstance(results["anon"], NoEndUserError)
        assert results["dana"] == "dana" and results["erik"] == "erik"
        assert results["app"] is None
        assert oracle.find_statements("thread-anon") == []
        # The refused request's connection went back to the pool in good order.
        with deepsec.end_user(user_token("fay")), pool.acquire() as conn:
            assert whoami(conn, "after-threads") == "fay"
    finally:
        pool.close(force=True)


@pytest.mark.timeout(30)
def test_a_thread_never_inherits_the_application_scope(oracle):
    """Threads start with an empty context: application work is not contagious."""
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=strict()) as conn:
        failure: list[BaseException] = []

        def worker() -> None:
            try:
                whoami(conn, "thread-from-app")
            except NoEndUserError as exc:
                failure.append(exc)

        with deepsec.as_application():
            t = threading.Thread(target=worker)
            t.start()
            t.join(10)
        assert failure and isinstance(failure[0], NoEndUserError)
        assert oracle.find_statements("thread-from-app") == []


@pytest.mark.timeout(30)
def test_strict_mode_asyncio(oracle):
    async def main() -> None:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=strict())
        try:
            cur = conn.cursor()
            mark = oracle.mark()
            with pytest.raises(NoEndUserError):
                await cur.execute("select 1 from dual /* async-anon */")
            assert trips(oracle, conn, mark) == []
            await conn.ping()
            await conn.commit()
            await conn.rollback()
            assert trips(oracle, conn, mark) == ["ping", "commit", "rollback"]
            async with deepsec.as_application():
                await cur.execute(f"{USERNAME_SQL} /* async-app */")
                assert (await cur.fetchone())[0] is None
            async with deepsec.end_user(user_token("gus")):
                await cur.execute(f"{USERNAME_SQL} /* async-gus */")
                assert (await cur.fetchone())[0] == "gus"
                async with deepsec.as_application():
                    await cur.execute(f"{USERNAME_SQL} /* async-app-2 */")
                    assert (await cur.fetchone())[0] is None
        finally:
            await conn.close()

    asyncio.run(main())
    assert oracle.find_statements("async-anon") == []
    assert oracle.find_statements("async-app-2")[0].context is None


@pytest.mark.timeout(30)
def test_tasks_follow_the_application_scope_lease(oracle):
    """A task started inside as_application runs as the app only while the block lasts."""

    async def main() -> tuple[object, object]:
        pool = oracledb.create_pool_async(
            **oracle.connect_kwargs(), extra_auth_params=strict(), min=0, max=2
        )
        block_over = asyncio.Event()

        async def job(tag: str, wait: bool) -> object:
            if wait:
                await block_over.wait()
            async with pool.acquire() as conn:
                cur = conn.cursor()
                try:
                    await cur.execute(f"{USERNAME_SQL} /* {tag} */")
                except NoEndUserError as exc:
                    return exc
                return (await cur.fetchone())[0]

        try:
            async with deepsec.as_application():
                inside = await asyncio.create_task(job("task-inside", wait=False))
                late = asyncio.create_task(job("task-late", wait=True))
            block_over.set()
            return inside, await late
        finally:
            await pool.close()

    inside, late = asyncio.run(main())
    assert inside is None  # ran as the application, no end user
    assert isinstance(late, NoEndUserError)  # outlived the block: refused
    assert oracle.find_statements("task-late") == []


@pytest.mark.timeout(30)
def test_strict_mode_is_off_by_default(oracle):
    params = {"end_user_sec_params": {"spi_type": "spi_static", "client_id": "hr-app"}}
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=params) as conn:
        assert whoami(conn, "lenient") is None
    assert oracle.find_statements("lenient")[0].context is None


@pytest.mark.timeout(30)
def test_require_end_user_must_be_a_bool(oracle):
    bad = strict(require_end_user="s3cr3t-value")
    with pytest.raises(oracledb.ProgrammingError) as info:
        oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=bad)
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "require_end_user must be true or false, got a str" in str(cause)
    assert "s3cr3t-value" not in str(info.value)


@pytest.mark.timeout(30)
def test_fetch_plsql_and_executemany_are_refused_with_nothing_sent(oracle):
    """Every statement-carrying round trip is refused, not only ``execute``."""
    oracle.add_table("strict_rows", columns=["id"], rows=[(i,) for i in range(20)])
    with oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=strict()) as conn:
        cur = conn.cursor()
        cur.arraysize = 2
        cur.prefetchrows = 2
        with deepsec.end_user(user_token("hana")):
            cur.execute("select id from strict_rows /* strict-fetch */")
            assert cur.fetchmany(2) == [(0,), (1,)]
        # The request ended with rows left on the server: fetching them now
        # would read them as nobody.
        mark = oracle.mark()
        with pytest.raises(NoEndUserError, match="'fetch'"):
            cur.fetchall()
        with pytest.raises(NoEndUserError, match="'execute'"):
            conn.cursor().execute("begin null; end; /* strict-plsql */")
        with pytest.raises(NoEndUserError, match="'execute'"):
            conn.cursor().executemany(
                "insert into strict_rows (id) values (:1) /* strict-many */", [(1,), (2,)]
            )
        assert trips(oracle, conn, mark) == []
    assert oracle.find_statements("strict-plsql") == []
    assert oracle.find_statements("strict-many") == []


@pytest.mark.timeout(30)
def test_async_housekeeping_under_an_end_user_with_no_cached_token(oracle):
    """ping and commit (like rollback) go out even when the token was never fetched.

    A sync ``with end_user(...)`` in asyncio code prefetches nothing: a
    statement raises TokenNotReadyError, but housekeeping must never fail
    (a pool pings before handing out a connection; the app must commit).
    """
    token = user_token("ivy")

    async def main() -> list[str]:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=strict())
        try:
            with deepsec.end_user(token):  # sync form: nothing prefetched
                mark = oracle.mark()
                await conn.ping()
                await conn.commit()
                await conn.rollback()
                sent = oracle.round_trips(conn.session_id, since=mark)
                assert all(t.context is None for t in sent)  # no token: no context
                with pytest.raises(deepsec.TokenNotReadyError):
                    await conn.cursor().execute("select 1 from dual /* ivy-no-token */")
                return [t.function for t in sent]
        finally:
            await conn.close()

    assert asyncio.run(main()) == ["ping", "commit", "rollback"]
    assert oracle.find_statements("ivy-no-token") == []
    assert spi_static.CALLS == []  # nothing fetched on the event loop


def test_adapters_answer_401_for_a_statement_with_no_end_user(oracle):
    """Strict mode under the web adapters: an anonymous request whose view runs a
    statement gets the one mapping's 401 (not a 500), and nothing reaches the server;
    the same view for a signed-in user runs as that user."""
    import flask
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from deepsec.asgi import EndUserSecMiddleware
    from deepsec.flask import DeepSec

    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=strict(), min=0, max=2)
    flask_app = flask.Flask("strict")
    DeepSec(flask_app)

    @flask_app.get("/")
    def flask_view() -> str:
        with pool.acquire() as conn:
            return whoami(conn, "flask") or "-"

    async def starlette_view(request):  # the statement runs in a worker thread
        def run() -> str:
            with pool.acquire() as conn:
                return whoami(conn, "asgi") or "-"

        import anyio

        return PlainTextResponse(await anyio.to_thread.run_sync(run))

    asgi_app = Starlette(
        routes=[Route("/", starlette_view)], middleware=[Middleware(EndUserSecMiddleware)]
    )
    try:
        mark = oracle.mark()
        answer = flask_app.test_client().get("/")
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        with TestClient(asgi_app, raise_server_exceptions=False) as client:
            answer = client.get("/")
            assert answer.status_code == 401
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            # Refused in the round-trip callback: neither statement reached the server.
            assert oracle.find_statements("/* flask */", since=mark) == []
            assert oracle.find_statements("/* asgi */", since=mark) == []
            bearer = {"Authorization": f"Bearer {user_token('alice')}"}
            assert client.get("/", headers=bearer).text == "alice"
        assert flask_app.test_client().get("/", headers=bearer).get_data(as_text=True) == "alice"
        assert len(oracle.find_statements("/* asgi */", since=mark)) == 1
        assert len(oracle.find_statements("/* flask */", since=mark)) == 1
    finally:
        pool.close(force=True)
