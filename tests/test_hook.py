"""The driver hook, end to end: real thin driver over TCPS to the wire test server.

Each of python-oracledb's plugin defects 1-3 (reference-plugin.md) is run
twice: against the plugin itself, where the test shows the defect, and
against deepsec, where it is fixed.  The plugin gets its database-access
token from ``tests/support/spi_static.py``, registered under ``oracledb.plugins``
because that plugin only imports ``oracledb.plugins.<spi_type>``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import sys
import threading
import time
import warnings
from collections.abc import Iterator

import oracledb
import pytest

import deepsec
import spi_static
from concurrency_support import run_threads
from deepsec import ConfigError, IdentityError, TokenNotReadyError
from deepsec.context import EndUserContext
from deepsec.hook import REFERENCE_PLUGIN, params_hook
from deepsec.tokens import clear_token_sources
from deepsec.tokens.cache import FAILURE_MEMORY
from hook_support import USERNAME_SQL, fresh_hook_state, params, user_token
from token_support import skip_ahead

SECRET = "s3cr3t-client-credential-value"


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    yield from fresh_hook_state()


def whoami(conn: oracledb.Connection, tag: str = "") -> str | None:
    with conn.cursor() as cur:
        cur.execute(f"{USERNAME_SQL} /* {tag} */")
        return cur.fetchone()[0]


def connect(server, **kwargs):
    return oracledb.connect(**server.connect_kwargs(), **kwargs)


# -- the reference plugin, for the "fails with python-oracledb's plugin" half ----


@pytest.fixture
def reference_plugin():
    """python-oracledb's own plugin, active instead of deepsec for one test."""
    deepsec.uninstall()
    sys.modules["oracledb.plugins.spi_static"] = spi_static
    already = REFERENCE_PLUGIN in sys.modules
    plugin = importlib.import_module(REFERENCE_PLUGIN)
    if already:
        oracledb.register_params_hook(plugin.end_user_sec_context_hook)
    try:
        yield plugin
    finally:
        oracledb.unregister_params_hook(plugin.end_user_sec_context_hook)
        oracledb.clear_all_secrets(thread_local=True)
        sys.modules.pop("oracledb.plugins.spi_static", None)


def ref_params() -> dict[str, object]:
    return {
        "end_user_sec_params": {
            "spi_type": "spi_static",
            "auth_flow": "client_credentials",
            "client_id": "hr-app",
        }
    }


# -- defect 1: asyncio tasks through an AsyncConnectionPool ----------------------


async def _two_concurrent_requests(server, set_identity, extra_auth_params):
    pool = oracledb.create_pool_async(
        **server.connect_kwargs(), extra_auth_params=extra_auth_params, min=0, max=4
    )
    arrived: list[str] = []
    both_set = asyncio.Event()  # (asyncio.Barrier needs Python 3.11)

    async def request(name: str) -> str | None:
        set_identity(user_token(name))
        arrived.append(name)
        if len(arrived) == 2:
            both_set.set()
        await both_set.wait()  # both requests have set their identity
        async with pool.acquire() as conn:
            cur = conn.cursor()
            await cur.execute(f"{USERNAME_SQL} /* {name} */")
            (who,) = await cur.fetchone()
            return who

    async def run(name: str) -> str | None:
        # Each request is its own task, as under any ASGI server.
        return await asyncio.create_task(request(name))

    try:
        return await asyncio.gather(run("alice"), run("bob"))
    finally:
        await pool.close()


@pytest.mark.timeout(30)
def test_defect1_reference_plugin_leaks_between_asyncio_tasks(oracle, reference_plugin):
    seen = asyncio.run(
        _two_concurrent_requests(oracle, reference_plugin.set_end_user_identity, ref_params())
    )
    assert seen == ["bob", "bob"]  # alice's request ran as bob


@pytest.mark.timeout(30)
def test_defect1_fixed_asyncio_tasks_through_async_pool(oracle):
    seen = asyncio.run(_two_concurrent_requests(oracle, deepsec.set_end_user_identity, params()))
    assert seen == ["alice", "bob"]
    for name in ("alice", "bob"):
        (trip,) = oracle.find_statements(f"/* {name} */")
        assert trip.context is not None and trip.context.username == name


# -- defect 2: a connection kept open across requests ----------------------------


def _three_requests_on_one_connection(server, set_identity, extra_auth_params):
    set_identity(user_token("alice"))
    conn = connect(server, extra_auth_params=extra_auth_params)  # opened in alice's request
    try:
        seen = [whoami(conn, "r1")]
        set_identity(user_token("bob"))  # bob's request, same persistent connection
        seen.append(whoami(conn, "r2"))
        set_identity(None)  # a request with no end user
        seen.append(whoami(conn, "r3"))
        return seen
    finally:
        set_identity(None)
        conn.close()


@pytest.mark.timeout(30)
def test_defect2_reference_plugin_leaks_on_persistent_connection(oracle, reference_plugin):
    seen = _three_requests_on_one_connection(
        oracle, reference_plugin.set_end_user_identity, ref_params()
    )
    assert seen == ["alice", "alice", "alice"]


@pytest.mark.timeout(30)
def test_defect2_fixed_persistent_connection_follows_each_request(oracle):
    seen = _three_requests_on_one_connection(oracle, deepsec.set_end_user_identity, params())
    assert seen == ["alice", "bob", None]
    contexts = [oracle.find_statements(f"/* {t} */")[0].context for t in ("r1", "r2", "r3")]
    assert [c.username if c else None for c in contexts] == ["alice", "bob", None]


# -- defect 3: (name, key) identities ----------------------------------------------


@pytest.mark.timeout(30)
def test_defect3_reference_plugin_breaks_local_identities(oracle, reference_plugin):
    reference_plugin.set_end_user_identity(("bob", None))
    assert reference_plugin.get_end_user_identity() == ["bob", None]  # JSON turned it into a list
    with pytest.raises(ValueError, match="end_user_identity must be"):
        connect(oracle, extra_auth_params=ref_params())


@pytest.mark.timeout(30)
def test_defect3_fixed_local_identities(oracle):
    with connect(oracle, extra_auth_params=params()) as conn:
        with deepsec.end_user(("bob", None)):
            assert deepsec.get_end_user_identity() == ("bob", None)
            assert whoami(conn, "local-bob") == "bob"
        with deepsec.end_user(("carol", "carol-key")):
            assert whoami(conn, "local-carol") == "carol"
    bob = oracle.find_statements("local-bob")[0].context
    assert bob.kind == "local" and bob.end_user_name == "bob" and bob.end_user_contextid is None
    carol = oracle.find_statements("local-carol")[0].context
    assert carol.end_user_name == "carol" and carol.end_user_contextid == "carol-key"
    assert carol.database_access_claims["sub"] == "hr-app"


# -- pools and threads ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pool_acquire_release_in_threads_with_different_users(oracle):
    pool = oracledb.create_pool(
        **oracle.connect_kwargs(), extra_auth_params=params(), min=2, max=4, increment=1
    )
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        name = f"user{i}"
        try:
            for round_ in range(10):
                with deepsec.end_user(user_token(name)), pool.acquire() as conn:
                    assert whoami(conn, f"{name}-{round_}") == name
                with pool.acquire() as conn:  # the same connections, no end user now
                    assert whoami(conn, f"{name}-{round_}-anon") is None
        except BaseException as exc:
            errors.append(exc)

    run_threads(worker, each=range(6), timeout=50)
    pool.close(force=True)
    assert not errors, errors[0]
    assert len(oracle.statements()) >= 6 * 10 * 2


@pytest.mark.timeout(120)
def test_50_threads_200_operations_every_round_trip_carries_its_threads_user(oracle):
    """Random users, random gaps, connections shared through a small pool."""
    users = [f"u{i:02d}" for i in range(12)] + [None]
    tokens = {u: user_token(u) for u in users if u}
    pool = oracledb.create_pool(
        **oracle.connect_kwargs(), extra_auth_params=params(), min=4, max=8, increment=2
    )
    mark = oracle.mark()
    errors: list[BaseException] = []
    expected: dict[str, str | None] = {}
    lock = threading.Lock()

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            conn = None
            for i in range(200):
                if conn is None or rng.random() < 0.2:  # sometimes switch connections
                    if conn is not None:
                        pool.release(conn)
                    conn = pool.acquire()
                user = rng.choice(users)
                tag = f"t{t}-{i}"
                with lock:
                    expected[tag] = user
                with deepsec.end_user(tokens[user] if user else None):
                    if rng.random() < 0.3:
                        time.sleep(rng.random() / 1000)
                    with conn.cursor() as cur:
                        cur.execute(f"{USERNAME_SQL} /* {tag} */")
                        assert cur.fetchone()[0] == user
                # Outside any end user: a ping must carry no context.
                if rng.random() < 0.1:
                    conn.ping()
            pool.release(conn)
        except BaseException as exc:
            errors.append(exc)

    run_threads(worker, each=range(50), timeout=110)
    pool.close(force=True)
    assert not errors, errors[0]

    trips = oracle.round_trips(since=mark)
    checked = 0
    for trip in trips:
        if trip.sql and "/* t" in trip.sql:
            tag = trip.sql.rsplit("/* ", 1)[1].split(" */")[0]
            want = expected[tag]
            got = trip.context.username if trip.context else None
            assert got == want, f"{tag}: expected {want}, server saw {got}"
            checked += 1
        elif trip.function == "ping":
            assert trip.context is None
    assert checked >= 50 * 200
    # A thousand-odd switches were made, yet not one token per operation.
    assert len(spi_static.CALLS) <= len(users)


# -- async ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_connection_subclasses_take_their_own_branch(oracle):
    """on_connect_callback tells sync from asyncio connections by type() first;
    a conn_class subclass of either still takes its own branch: an asyncio one
    fetches the token when it connects, so a statement made under a plain
    ``with`` (no prefetch) finds it."""

    class MyConnection(oracledb.Connection):
        pass

    class MyAsyncConnection(oracledb.AsyncConnection):
        pass

    with deepsec.end_user(user_token("alice")):
        conn = connect(oracle, extra_auth_params=params(), conn_class=MyConnection)
        try:
            assert whoami(conn) == "alice"
        finally:
            conn.close()

    async def main() -> str | None:
        with deepsec.end_user(user_token("bob")):
            conn = await oracledb.connect_async(
                **oracle.connect_kwargs(), extra_auth_params=params(), conn_class=MyAsyncConnection
            )
            try:
                cur = conn.cursor()
                await cur.execute(USERNAME_SQL)
                return (await cur.fetchone())[0]
            finally:
                await conn.close()

    assert asyncio.run(main()) == "bob"


def test_async_standalone_connection_switches_users(oracle):
    async def main() -> list[str | None]:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        seen = []
        try:
            for name in ("alice", "bob", None, "alice"):
                async with deepsec.end_user(user_token(name) if name else None):
                    cur = conn.cursor()
                    await cur.execute(USERNAME_SQL)
                    seen.append((await cur.fetchone())[0])
        finally:
            await conn.close()
        return seen

    assert asyncio.run(main()) == ["alice", "bob", None, "alice"]


@pytest.mark.timeout(30)
def test_async_connection_never_fetches_on_the_loop(oracle):
    async def main() -> None:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        try:
            deepsec.set_end_user_identity(user_token("dave"))
            # A plain set, no prepare: the statement must not block on a fetch...
            with pytest.raises(TokenNotReadyError, match=r"async with deepsec\.end_user"):
                await conn.cursor().execute("select 1 from dual")
            await conn.ping()  # (housekeeping goes out with no context instead)
            # ...and prepare() fetches off the loop, after which it works.
            await deepsec.prepare()
            cur = conn.cursor()
            await cur.execute(USERNAME_SQL)
            assert (await cur.fetchone())[0] == "dave"
        finally:
            deepsec.set_end_user_identity(None)
            await conn.close()

    # Custom spi modules cache per identity, so "dave" starts with a cold cache.
    asyncio.run(main())


# -- chaining, config, data roles ------------------------------------------------------


@pytest.mark.timeout(30)
def test_application_callbacks_are_chained_not_replaced(oracle):
    calls: list[str] = []

    def on_connect(conn):
        calls.append("on_connect")

    def on_operation(name, args):
        calls.append(name)
        return lambda outcome: calls.append(f"done:{name}")

    with deepsec.end_user(user_token("erin")):
        conn = connect(
            oracle,
            extra_auth_params=params(),
            on_connect_callback=on_connect,
            operation_callback=on_operation,
        )
        assert whoami(conn) == "erin"
        conn.close()
    assert "on_connect" in calls and "execute" in calls and "done:execute" in calls


@pytest.mark.timeout(30)
def test_data_roles_and_attributes_context_wins_over_config(oracle):
    cfg = params(data_roles=["cfg_role"], attributes={"dept": "cfg"})
    with connect(oracle, extra_auth_params=cfg) as conn:
        with deepsec.end_user(user_token("f")):
            whoami(conn, "from-config")
        with deepsec.end_user(user_token("f"), data_roles=["ctx_role"], attributes={"dept": "x"}):
            whoami(conn, "from-context")
    cfg_ctx = oracle.find_statements("from-config")[0].context
    assert cfg_ctx.data_roles == ("cfg_role",) and cfg_ctx.attributes["dept"] == "cfg"
    ctx_ctx = oracle.find_statements("from-context")[0].context
    assert ctx_ctx.data_roles == ("ctx_role",) and ctx_ctx.attributes["dept"] == "x"


@pytest.mark.timeout(30)
def test_local_user_with_configured_data_roles_fails_before_any_round_trip(oracle):
    with connect(oracle, extra_auth_params=params(data_roles=["r"])) as conn:
        before = oracle.mark()
        with deepsec.end_user(("gina", None)), pytest.raises(IdentityError, match="local"):
            whoami(conn)
        assert oracle.round_trips(since=before) == []


@pytest.mark.timeout(30)
def test_bad_config_fails_at_connect_with_every_problem_and_no_secret(oracle, caplog):
    caplog.set_level(logging.DEBUG)
    bad = {
        "end_user_sec_params": {
            "spi_type": "azure_tokens",
            "auth_flow": "sideways",
            "client_credential": SECRET,
            "bogus": 1,
        }
    }
    # python-oracledb wraps a failing params hook in DPY-2061; ours is the cause.
    with pytest.raises(oracledb.ProgrammingError, match="DPY-2061") as outer:
        connect(oracle, extra_auth_params=bad)
    info = outer.value.__cause__
    assert isinstance(info, ConfigError)
    text = str(outer.value)
    assert "missing required key(s) for azure_tokens: authority, client_id, scopes" in text
    assert "unknown key(s)" in text and "bogus" in text and "auth_flow must be one of" in text
    assert SECRET not in text and SECRET not in repr(info) and SECRET not in caplog.text


@pytest.mark.timeout(30)
def test_no_secret_or_token_in_logs_or_reprs(oracle, caplog):
    caplog.set_level(logging.DEBUG)
    token = user_token("harry")
    cfg = params(client_credential=SECRET)
    with connect(oracle, extra_auth_params=cfg) as conn, deepsec.end_user(token) as ctx:
        whoami(conn)
        assert token not in repr(ctx)
    assert any("attached end-user context" in r.getMessage() for r in caplog.records)
    for secret in (SECRET, token, token.split(".")[1]):
        assert secret not in caplog.text
    config = deepsec.parse_end_user_sec_params(
        params(client_credential=SECRET)["end_user_sec_params"]
    )
    assert SECRET not in repr(config)


# -- round trips, install/uninstall, the reference plugin alongside --------------------


@pytest.mark.timeout(30)
def test_attaching_adds_no_round_trip(oracle):
    with connect(oracle, extra_auth_params=params()) as conn:
        whoami(conn)  # warm up statement cache
        for name in ("a", "b", "c", "d", "e"):  # and the token cache: pings never fetch
            with deepsec.end_user(user_token(name)):
                whoami(conn)
        start = oracle.mark()
        for _ in range(5):
            conn.ping()
        plain = len(oracle.round_trips(since=start))
        start = oracle.mark()
        for name in ("a", "b", "c", "d", "e"):  # a new context before every ping
            with deepsec.end_user(user_token(name)):
                conn.ping()
        with_ctx = oracle.round_trips(since=start)
        start = oracle.mark()
        for _ in range(5):  # and cleared again
            conn.ping()
        cleared = oracle.round_trips(since=start)
    assert plain == len(with_ctx) == len(cleared) == 5
    assert [t.context.username for t in with_ctx] == ["a", "b", "c", "d", "e"]
    assert all(t.context is None for t in cleared)


@pytest.mark.timeout(30)
def test_hook_is_idempotent_and_uninstall_removes_it(oracle):
    deepsec.install()
    deepsec.install()
    from oracledb import base_impl

    assert base_impl.REGISTERED_PARAMS_HOOKS.count(params_hook) == 1
    deepsec.uninstall()
    assert not deepsec.installed()
    with deepsec.end_user(user_token("ian")):
        conn = connect(oracle, extra_auth_params=params())
        assert whoami(conn) is None  # no hook, no context
        conn.close()
    deepsec.install()
    with deepsec.end_user(user_token("ian")), connect(oracle, extra_auth_params=params()) as conn:
        assert whoami(conn) == "ian"


@pytest.mark.timeout(30)
def test_reference_plugin_imported_too_warns_and_one_context_is_attached(oracle):
    sys.modules["oracledb.plugins.spi_static"] = spi_static
    try:
        already = REFERENCE_PLUGIN in sys.modules
        plugin = importlib.import_module(REFERENCE_PLUGIN)
        if already:
            oracledb.register_params_hook(plugin.end_user_sec_context_hook)
        plugin.set_end_user_identity(user_token("mallory"))  # the plugin's thread-local
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with deepsec.end_user(user_token("judy")):
                conn = connect(oracle, extra_auth_params=params(auth_flow="client_credentials"))
                assert whoami(conn, "judy") == "judy"
            assert whoami(conn, "after") is None
            conn.close()
        assert any(REFERENCE_PLUGIN in str(w.message) for w in caught)
        from oracledb import base_impl

        assert plugin.end_user_sec_context_hook not in base_impl.REGISTERED_PARAMS_HOOKS
    finally:
        oracledb.clear_all_secrets(thread_local=True)
        sys.modules.pop("oracledb.plugins.spi_static", None)


# -- one connection shared by threads or tasks ----------------------------------------


@pytest.mark.timeout(60)
def test_one_connection_shared_by_threads_each_round_trip_has_its_threads_user(oracle):
    """python-oracledb lets threads share a connection; contexts must not swap."""
    conn = connect(oracle, extra_auth_params=params())
    mismatches: list[tuple[str | None, int, str | None]] = []

    def worker(name: str | None) -> None:
        token = user_token(name) if name else None
        for i in range(150):
            with deepsec.end_user(token), conn.cursor() as cur:
                cur.execute(f"{USERNAME_SQL} /* shared-{name}-{i} */")
                got = cur.fetchone()[0]
                if got != name:
                    mismatches.append((name, i, got))

    run_threads(worker, each=("alice", "bob", None, "carol"), timeout=50)
    conn.close()
    assert mismatches == []
    assert len(oracle.find_statements("/* shared-")) == 4 * 150


@pytest.mark.timeout(60)
def test_one_async_connection_shared_by_tasks_each_round_trip_has_its_tasks_user(oracle):
    async def main() -> list[tuple[str | None, int, str | None]]:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        mismatches = []

        async def worker(name: str | None) -> None:
            for i in range(100):
                async with deepsec.end_user(user_token(name) if name else None):
                    cur = conn.cursor()
                    await cur.execute(f"{USERNAME_SQL} /* atask-{name}-{i} */")
                    got = (await cur.fetchone())[0]
                    if got != name:
                        mismatches.append((name, i, got))

        try:
            await asyncio.gather(*(worker(n) for n in ("alice", "bob", None)))
        finally:
            await conn.close()
        return mismatches

    assert asyncio.run(main()) == []
    assert len(oracle.find_statements("/* atask-")) == 3 * 100


@pytest.mark.timeout(30)
def test_token_failure_on_async_acquire_fails_the_statement_not_the_pool(oracle, monkeypatch):
    """Failing on acquire would leave the pool counting the connection busy."""

    async def main() -> None:
        pool = oracledb.create_pool_async(
            **oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1
        )
        try:
            spi_static.FAIL.append(RuntimeError("identity provider down"))
            deepsec.set_end_user_identity(user_token("kim"))
            async with pool.acquire() as conn:
                cur = conn.cursor()
                with pytest.raises(deepsec.TokenAcquisitionError, match="spi_static"):
                    await cur.execute(USERNAME_SQL)
            assert pool.busy == 0
            spi_static.FAIL.clear()
            skip_ahead(monkeypatch, FAILURE_MEMORY + 0.1)  # past the remembered failure
            async with deepsec.end_user(user_token("kim")), pool.acquire() as conn:
                cur = conn.cursor()
                await cur.execute(USERNAME_SQL)
                assert (await cur.fetchone())[0] == "kim"
        finally:
            deepsec.set_end_user_identity(None)
            await pool.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_token_failure_on_sync_pool_fails_closed_and_recovers(oracle, monkeypatch):
    pool = oracledb.create_pool(**oracle.connect_kwargs(), extra_auth_params=params(), min=1, max=1)
    try:
        spi_static.FAIL.append(RuntimeError("identity provider down"))
        before = oracle.mark()
        with (
            deepsec.end_user(user_token("lee")),
            pool.acquire() as conn,
            pytest.raises(deepsec.TokenAcquisitionError),
        ):
            whoami(conn, "lee-fails")
        assert oracle.find_statements("lee-fails", since=before) == []  # nothing ran as the app
        assert pool.busy == 0
        spi_static.FAIL.clear()
        skip_ahead(monkeypatch, FAILURE_MEMORY + 0.1)  # past the remembered failure
        with deepsec.end_user(user_token("lee")), pool.acquire() as conn:
            assert whoami(conn) == "lee"
    finally:
        pool.close(force=True)


@pytest.mark.timeout(30)
def test_thick_mode_is_refused_at_connect(oracle, monkeypatch):
    """Thick mode has no round-trip callback: statements would run as the app alone.

    Thick mode needs Oracle Client libraries this machine lacks, so the mode
    query is answered by hand; the connect itself is real and must not start.
    """
    monkeypatch.setattr(oracledb, "is_thin_mode", lambda: False)
    before = len(oracle.connections())
    with pytest.raises(oracledb.ProgrammingError, match="Thin mode") as info:
        connect(oracle, extra_auth_params=params())
    assert isinstance(info.value.__cause__, ConfigError)
    assert len(oracle.connections()) == before


@pytest.mark.timeout(30)
def test_task_outliving_its_block_runs_with_no_context(oracle):
    """'None after the request ends' also for work the request left running."""

    async def main() -> list[str | None]:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        release = asyncio.Event()
        seen: list[str | None] = []

        async def audit_later() -> None:
            for tag in ("during", "after"):
                if tag == "after":
                    await release.wait()
                cur = conn.cursor()
                await cur.execute(f"{USERNAME_SQL} /* outlive-{tag} */")
                seen.append((await cur.fetchone())[0])

        try:
            async with deepsec.end_user(user_token("nina")):
                task = asyncio.create_task(audit_later())
                while not seen:
                    await asyncio.sleep(0.01)
            release.set()
            await task
        finally:
            await conn.close()
        return seen

    assert asyncio.run(main()) == ["nina", None]
    (after,) = oracle.find_statements("/* outlive-after */")
    assert after.context is None


@pytest.mark.timeout(30)
def test_database_rejecting_the_access_token_drops_it_and_the_next_round_trip_refetches(oracle):
    """ORA-52602 (revoked or early-expired access token): fetch a new one, once."""
    with connect(oracle, extra_auth_params=params()) as conn, deepsec.end_user(user_token("omar")):
        assert whoami(conn, "first") == "omar"
        first = oracle.find_statements("/* first */")[0].context.database_access_token
        oracle.token_validator = lambda kind, token: (
            not (kind == "database_access_token" and token == first)
        )
        with pytest.raises(oracledb.DatabaseError, match="ORA-52602"):
            whoami(conn, "rejected")
        assert whoami(conn, "second") == "omar"
    second = oracle.find_statements("/* second */")[0].context.database_access_token
    assert second != first
    assert len(spi_static.CALLS) == 2  # one fetch, one re-fetch after the rejection


@pytest.mark.timeout(30)
def test_one_rejection_drops_only_the_rejected_token(oracle):
    """Connections still holding a rejected token must not drop its replacement.

    Four connections attach the same token; the database revokes it.  Each
    connection meets ORA-52602 once at most, and one fresh token serves all
    of them: a rejection drops the token it attached, never a newer one.
    """
    conns = [connect(oracle, extra_auth_params=params()) for _ in range(4)]
    try:
        with deepsec.end_user(user_token("rhea")):
            for i, conn in enumerate(conns):
                assert whoami(conn, f"rhea-before-{i}") == "rhea"
            assert len(spi_static.CALLS) == 1
            first = oracle.find_statements("/* rhea-before-0 */")[0].context
            oracle.token_validator = lambda kind, token: (
                not (kind == "database_access_token" and token == first.database_access_token)
            )
            rejected = 0
            for i, conn in enumerate(conns):
                try:
                    whoami(conn, f"rhea-try-{i}")
                except oracledb.DatabaseError as exc:
                    assert exc.args[0].code == 52602
                    rejected += 1
                assert whoami(conn, f"rhea-after-{i}") == "rhea"
        assert rejected == 1  # the others saw the revocation before sending
        assert len(spi_static.CALLS) == 2  # one re-fetch, not one per connection
        after = {
            oracle.find_statements(f"/* rhea-after-{i} */")[0].context.database_access_token
            for i in range(4)
        }
        assert len(after) == 1 and first.database_access_token not in after
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.timeout(30)
def test_an_unexpected_interface_error_fails_the_round_trip(oracle, monkeypatch):
    """Only DPY-1001 (released or closed) lets a round trip go out unattached.

    Any other InterfaceError while switching users must fail the statement:
    letting it go out would run it as the user still attached (here alice).
    """
    with connect(oracle, extra_auth_params=params()) as conn:
        with deepsec.end_user(user_token("alice")):
            assert whoami(conn, "ie-alice") == "alice"

        from oracledb import errors as driver_errors

        def broken(*args, **kwargs):  # a real driver error, raised where none is expected
            driver_errors._raise_err(driver_errors.ERR_POOL_NOT_OPEN)

        monkeypatch.setattr(oracledb, "create_end_user_security_context", broken)
        mark = oracle.mark()
        bob = deepsec.end_user(user_token("bob"))
        with bob, pytest.raises(oracledb.InterfaceError, match="DPY-1002"):
            whoami(conn, "ie-bob")
        assert oracle.round_trips(conn.session_id, since=mark) == []
    assert oracle.find_statements("ie-bob") == []


@pytest.mark.timeout(30)
def test_rollback_and_close_still_work_when_no_token_can_be_had(oracle):
    """Housekeeping must not strand a connection: it goes out with no context."""
    conn = connect(oracle, extra_auth_params=params())
    spi_static.FAIL.append(RuntimeError("identity provider down"))
    try:
        with deepsec.end_user(user_token("pat")):
            with pytest.raises(deepsec.TokenAcquisitionError):
                whoami(conn, "pat-fails")
            mark = oracle.mark()
            conn.rollback()
            conn.close()
    finally:
        spi_static.FAIL.clear()
    trips = oracle.round_trips(since=mark)
    assert [t.function for t in trips] == ["rollback", "logoff"]
    assert all(t.context is None for t in trips)
    assert oracle.find_statements("pat-fails") == []


@pytest.mark.timeout(30)
def test_async_close_inside_a_block_without_token(oracle):
    async def main() -> None:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        with deepsec.end_user(user_token("quinn")):  # plain `with`: nothing prefetched
            with pytest.raises(TokenNotReadyError):
                await conn.cursor().execute("select 1 from dual")
            await conn.rollback()
            await conn.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_clearing_token_sources_reaches_existing_connections(oracle):
    """Credential rotation: existing pools must not keep the old token source."""
    with connect(oracle, extra_auth_params=params()) as conn, deepsec.end_user(user_token("rae")):
        whoami(conn, "before-rotation")
        before = oracle.find_statements("before-rotation")[0].context.database_access_token
        clear_token_sources()
        time.sleep(1.1)  # past the hook's once-a-second token re-check
        whoami(conn, "after-rotation")
    after = oracle.find_statements("after-rotation")[0].context.database_access_token
    assert after != before
    assert len(spi_static.CALLS) == 2


@pytest.mark.timeout(30)
def test_prepare_after_clearing_sources_still_fetches_for_open_connections(oracle):
    async def main() -> str | None:
        conn = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        try:
            clear_token_sources()  # e.g. credential rotation while the connection stays open
            async with deepsec.end_user(user_token("sam")):
                cur = conn.cursor()
                await cur.execute(USERNAME_SQL)
                return (await cur.fetchone())[0]
        finally:
            await conn.close()

    assert asyncio.run(main()) == "sam"


@pytest.mark.timeout(30)
def test_prepare_with_two_databases_one_down(oracle):
    """A request may use only the database whose provider works: not failed up front."""

    async def main() -> tuple[str | None, BaseException]:
        ok = await oracledb.connect_async(**oracle.connect_kwargs(), extra_auth_params=params())
        down = await oracledb.connect_async(
            **oracle.connect_kwargs(),
            extra_auth_params={"end_user_sec_params": {"spi_type": "spi_failing"}},
        )
        try:
            async with deepsec.end_user(user_token("tess")):  # prepare(): no error
                cur = ok.cursor()
                await cur.execute(USERNAME_SQL)
                who = (await cur.fetchone())[0]
                with pytest.raises(deepsec.TokenAcquisitionError) as info:
                    # the real error, not TokenNotReadyError
                    await down.cursor().execute("select 1 from dual")
            return who, info.value
        finally:
            await ok.close()
            await down.close()

    who, error = asyncio.run(main())
    assert who == "tess"
    assert error.error == "temporarily_unavailable"


@pytest.mark.timeout(30)
def test_app_setting_its_own_round_trip_callback_on_connect_is_chained(oracle):
    """A tracing callback set in on_connect must not silently replace deepsec's."""
    traced: list[str] = []

    def on_connect(conn):
        conn.round_trip_callback = traced.append

    with connect(oracle, extra_auth_params=params(), on_connect_callback=on_connect) as conn:
        with deepsec.end_user(user_token("uma")):
            assert whoami(conn, "uma") == "uma"
        assert whoami(conn, "anon") is None
    assert "execute" in traced


@pytest.mark.timeout(30)
def test_local_user_name_never_in_logs_or_reprs(oracle, caplog):
    # A local user's name is an identity: the DEBUG line that shows the
    # attached context, and the context's repr, carry a keyed tag instead.
    caplog.set_level(logging.DEBUG, logger="deepsec")
    with connect(oracle, extra_auth_params=params()) as conn:
        with deepsec.end_user(("zacharias", "zkey-secret")) as ctx:
            assert whoami(conn) == "zacharias"
        with deepsec.end_user(("zacharias", None)) as again:
            whoami(conn)
    assert any("attached end-user context" in r.getMessage() for r in caplog.records)
    for text in (caplog.text, repr(ctx), str(ctx), repr(again)):
        assert "zacharias" not in text and "zkey-secret" not in text
    assert "local user" in repr(ctx)
    # the same user gets the same tag within a process; another user another one
    tag = repr(ctx).split("local user ")[1][:8]
    assert tag in repr(again) and tag not in repr(EndUserContext(("yolanda", None)))
