"""The Oracle wire test server, driven by python-oracledb's real thin driver over TCPS."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import jwt
import oracledb
import pytest

from concurrency_support import run_threads
from deepsec.testing.oracle import (
    OracleTestServer,
    RoundTrip,
    WireContext,
    decode_jwt_claims,
    decode_oracle_number,
    encode_oracle_number,
    statement_has_tag,
)
from deepsec.testing.pytest_plugin import OracleServerFixture
from deepsec.testing.tls import TestCA

USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"


def connect(server: OracleTestServer, **kwargs: Any) -> oracledb.Connection:
    params: dict[str, Any] = {
        "user": "app_user",
        "password": "app_password",
        "dsn": server.dsn,
        "ssl_context": server.client_ssl_context(),
    }
    params.update(kwargs)
    return oracledb.connect(**params)


def make_jwt(**claims: Any) -> str:
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, "test-secret-key-of-sufficient-length!", algorithm="HS256")


def unsigned_jwt(**claims: Any) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.sig"


def query_one(conn: oracledb.Connection, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params or [])
        row = cur.fetchone()
        return None if row is None else row[0]


@pytest.fixture
def conn(oracle: OracleTestServer) -> Iterator[oracledb.Connection]:
    connection = connect(oracle)
    try:
        yield connection
    finally:
        connection.close()


# -- login ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_password_login_and_select_one(oracle: OracleTestServer) -> None:
    with connect(oracle) as conn, conn.cursor() as cur:
        cur.execute("select 1 from dual")
        assert cur.fetchall() == [(1,)]
        record = oracle.connection(conn.session_id)
        assert record.user == "APP_USER"
        assert record.method == "password"
        assert record.logged_in
        assert record.access_token is None


@pytest.mark.timeout(30)
def test_second_user_and_case_insensitive_name(oracle: OracleTestServer) -> None:
    with connect(oracle, user="SCOTT", password="tiger") as conn:
        assert query_one(conn, "select user from dual") == "SCOTT"


@pytest.mark.timeout(30)
def test_bad_password_is_ora_01017(oracle: OracleTestServer) -> None:
    # The session server may still hold other tests' open connections.
    before = {c.conn_id for c in oracle.connections()}
    with pytest.raises(oracledb.DatabaseError) as info:
        connect(oracle, password="wrong")
    assert info.value.args[0].code == 1017
    with pytest.raises(oracledb.DatabaseError) as info:
        connect(oracle, user="nobody", password="app_password")
    assert info.value.args[0].code == 1017
    attempts = [c for c in oracle.connections() if c.conn_id not in before]
    assert len(attempts) == 2
    assert all(not c.logged_in for c in attempts)


@pytest.mark.timeout(30)
def test_token_login_records_the_access_token(oracle: OracleTestServer) -> None:
    token = make_jwt(sub="app-client", preferred_username="app@example.com")
    with oracledb.connect(
        access_token=token, dsn=oracle.dsn, ssl_context=oracle.client_ssl_context()
    ) as conn:
        assert query_one(conn, "select 1 from dual") == 1
        record = oracle.connection(conn.session_id)
        assert record.method == "token"
        assert record.access_token == token
        assert record.access_token_claims["sub"] == "app-client"
        assert record.user == "APP_USER"
        assert token not in repr(record)


@pytest.mark.timeout(30)
def test_token_login_rejected_by_validator(oracle: OracleTestServer) -> None:
    oracle.token_validator = lambda kind, token: kind != "access_token"
    with pytest.raises(oracledb.DatabaseError) as info:
        oracledb.connect(
            access_token=make_jwt(sub="x"), dsn=oracle.dsn, ssl_context=oracle.client_ssl_context()
        )
    assert info.value.args[0].code == 1017


@pytest.mark.timeout(30)
def test_dsn_uses_ip_and_certificate_is_verified(oracle: OracleTestServer) -> None:
    assert oracle.dsn.startswith("tcps://127.0.0.1:")
    # a client that does not trust the test CA is refused
    with pytest.raises(oracledb.Error):
        connect(oracle, ssl_context=ssl.create_default_context())
    # standard Python verification (SAN IP entry) accepts the server certificate
    ctx = oracle.client_ssl_context()
    with (
        socket.create_connection(("127.0.0.1", oracle.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() is not None


# -- statements ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_statement_cache_reexecute(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    with conn.cursor() as cur:
        for _ in range(5):
            cur.execute("select 1 from dual")
            assert cur.fetchall() == [(1,)]
    trips = oracle.statements(conn.session_id)
    assert [t.function for t in trips] == ["execute"] + ["reexecute_and_fetch"] * 4
    assert {t.cursor_id for t in trips} == {trips[0].cursor_id}
    assert all(t.sql == "select 1 from dual" for t in trips)


@pytest.mark.timeout(30)
def test_canned_table_multi_row_fetch(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    rows = [(i, f"name {i}", Decimal(i) / 4 if i % 2 else None) for i in range(1, 24)]
    oracle.add_table(
        "employees", columns=["id", ("name", "varchar"), ("bonus", "number")], rows=rows
    )
    expected = [(i, n, None if b is None else float(b)) for i, n, b in rows]
    for _ in range(3):
        with conn.cursor() as cur:
            cur.arraysize = 5
            cur.execute("select * from employees")
            assert [d[0] for d in cur.description] == ["ID", "NAME", "BONUS"]
            assert cur.fetchall() == expected
    fetches = [t for t in oracle.round_trips(conn.session_id) if t.function == "fetch"]
    assert len(fetches) >= 3 * 4
    with conn.cursor() as cur:
        cur.execute("select name, id as ident from hr.employees where id = :1", [7])
        assert cur.fetchall() == [("name 7", 7)]
        assert [d[0] for d in cur.description] == ["NAME", "IDENT"]
        cur.execute("select count(*) from employees")
        assert cur.fetchone() == (23,)
        cur.execute("select name from employees where name = 'name 3' and id = 3")
        assert cur.fetchall() == [("name 3",)]


@pytest.mark.timeout(30)
def test_binds(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("select :1 from dual", ["hello"])
        assert cur.fetchone() == ("hello",)
        cur.execute("select :1 from dual", [42])
        assert cur.fetchone() == (42,)
        cur.execute("select :a, :b, 7, 'lit' from dual", a="x", b=1.5)
        assert cur.fetchone() == ("x", 1.5, 7, "lit")
        cur.execute(
            "insert into t (a, b, c, d) values (:1, :2, :3, :4)", ["é€", -12.25, None, True]
        )
        assert cur.rowcount == 1
        cur.executemany("insert into t values (:1)", [[1], [2], [3]])
    inserts = [t for t in oracle.statements(conn.session_id) if t.sql and "insert" in t.sql]
    assert inserts[0].binds == ("é€", -12.25, None, True)
    assert inserts[1].bind_rows == ((1,), (2,), (3,))
    first = oracle.statements(conn.session_id)[0]
    assert first.binds == ("hello",)


@pytest.mark.timeout(30)
def test_django_connection_init_statements(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    with conn.cursor() as cur:
        cur.execute("ALTER SESSION SET NLS_TERRITORY = 'AMERICA'")
        cur.execute(
            "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD HH24:MI:SS'"
            " NLS_TIMESTAMP_FORMAT = 'YYYY-MM-DD HH24:MI:SS.FF'"
        )
        cur.execute(
            "SELECT 1 FROM DUAL WHERE DUMMY LIKE TRANSLATE(:arg0 USING NCHAR_CS)"
            " ESCAPE TRANSLATE('\\' USING NCHAR_CS)",
            arg0="X",
        )
        assert cur.fetchone() == (1,)
    last = oracle.statements(conn.session_id)[-1]
    assert last.binds == ("X",)
    assert query_one(conn, "select 1 from dual where dummy = :1", ["X"]) == 1
    assert query_one(conn, "select 1 from dual where dummy = 'Y'") is None


@pytest.mark.timeout(30)
def test_ddl_dml_plsql_succeed(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("create table t (a number)")
        cur.execute("update t set a = 1 where a = :1", [5])
        assert cur.rowcount == 0
        cur.execute("delete from t")
        cur.execute("begin null; end;")
        cur.callproc("dbms_output.enable")
    conn.commit()


@pytest.mark.timeout(30)
def test_unknown_select_is_a_clear_error(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    with conn.cursor() as cur:
        for _ in range(2):
            with pytest.raises(oracledb.DatabaseError) as info:
                cur.execute("select * from no_such_table")
            assert info.value.args[0].code == 942
            assert "table or view does not exist" in info.value.args[0].message
        with pytest.raises(oracledb.DatabaseError) as info:
            cur.execute("select bogus_fn(1) from dual")
        assert info.value.args[0].code == 904
        with pytest.raises(oracledb.DatabaseError) as info:
            cur.execute("explode the database")
        assert info.value.args[0].code == 900
        cur.execute("select 1 from dual")  # the connection still works
        assert cur.fetchone() == (1,)
    assert [t.error for t in oracle.statements(conn.session_id)][:2] == [942, 942]


@pytest.mark.timeout(30)
def test_number_and_comment_literals(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    assert query_one(conn, "/* lead */ select 12345678901234567890 from dual -- tail") == (
        12345678901234567890
    )
    assert query_one(conn, "select -3.25 from dual /* req-17 */") == -3.25
    assert query_one(conn, "select 'it''s' as txt from dual") == "it's"
    [trip] = oracle.find_statements("req-17")
    assert trip.sql == "select -3.25 from dual /* req-17 */"


@pytest.mark.timeout(30)
def test_ping_commit_rollback(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    mark = oracle.mark()
    conn.ping()
    conn.commit()
    conn.rollback()
    assert [t.function for t in oracle.round_trips(conn.session_id, since=mark)] == [
        "ping",
        "commit",
        "rollback",
    ]


@pytest.mark.timeout(30)
def test_closed_cursors_piggyback(oracle: OracleTestServer) -> None:
    with connect(oracle, stmtcachesize=2) as conn:
        for i in range(6):
            assert query_one(conn, f"select {i} from dual") == i
    codes = [c for t in oracle.round_trips() for c in t.piggybacks]
    assert 0x69 in codes


# -- end-user security context --------------------------------------------------------


@pytest.mark.timeout(30)
def test_context_attach_and_clear(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    db_token = make_jwt(sub="app", preferred_username="app-client")
    user_token = make_jwt(sub="u-123", preferred_username="alice@example.com")
    ctx = oracledb.create_end_user_security_context(
        db_token,
        end_user_identity=user_token,
        data_roles=["HR_READER", "EMP"],
        attributes={"dept": "10", "level": 3, "ratio": 1.5, "tags": ["a", "b"]},
    )
    assert query_one(conn, USERNAME_SQL) is None
    conn.set_end_user_security_context(ctx)
    assert query_one(conn, USERNAME_SQL + " /* with-ctx */") == "alice@example.com"
    assert query_one(conn, "select sys_context('userenv','current_user') from dual") == "XS$NULL"
    assert query_one(conn, "select sys_context('USERENV', 'SESSION_USER') from dual") == "XS$NULL"
    assert (
        query_one(conn, "select xs_sys_context('xs$session','current_xs_user') from dual")
        == "alice@example.com"
    )
    conn.ping()
    conn.clear_end_user_security_context()
    assert query_one(conn, USERNAME_SQL + " /* cleared */") is None
    assert query_one(conn, "select sys_context('userenv','current_user') from dual") == "APP_USER"

    [with_ctx] = oracle.find_statements("with-ctx")
    context = with_ctx.context
    assert isinstance(context, WireContext)
    assert context.end_user_token == user_token
    assert context.database_access_token == db_token
    assert context.end_user_name is None
    assert context.data_roles == ("HR_READER", "EMP")
    assert dict(context.attributes) == {"dept": "10", "level": 3, "ratio": 1.5, "tags": ["a", "b"]}
    assert context.version == "1.0"
    assert context.username == "alice@example.com"
    assert user_token not in repr(context) and db_token not in repr(context)
    ping = [t for t in oracle.round_trips(conn.session_id) if t.function == "ping"][-1]
    assert ping.context == context
    assert 0xCD in ping.piggybacks
    [cleared] = oracle.find_statements("cleared")
    assert cleared.context is None and 0xCD not in cleared.piggybacks


@pytest.mark.timeout(30)
def test_context_identity_variants(oracle: OracleTestServer, conn: oracledb.Connection) -> None:
    db_token = make_jwt(sub="app")
    cases: list[tuple[Any, str | None]] = [
        (("local_bob", "k-1"), "local_bob"),
        (("local_carol", None), "local_carol"),
        (unsigned_jwt(sub="sub-only"), "sub-only"),
        (None, "app"),  # OBO style: the database access token's identity
    ]
    for identity, expected in cases:
        ctx = oracledb.create_end_user_security_context(db_token, end_user_identity=identity)
        conn.set_end_user_security_context(ctx)
        assert query_one(conn, USERNAME_SQL) == expected
        conn.clear_end_user_security_context()
    contexts = [t.context for t in oracle.statements(conn.session_id)]
    assert contexts[0] is not None
    assert contexts[0].end_user_name == "local_bob"
    assert contexts[0].end_user_contextid == "k-1"
    assert contexts[0].kind == "local"
    assert contexts[1] is not None and contexts[1].end_user_contextid is None
    assert contexts[3] is not None and contexts[3].kind == "database_access_token"


@pytest.mark.timeout(30)
def test_context_attributes_values_round_trip(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    attributes = {
        "s": "x" * 300,
        "empty": "",
        "int": -(10**20),
        "dec": Decimal("12.5"),
        "flag": True,
        "none": None,
        "list": [1, "two", [3.25, {"k": "v"}]],
        "obj": {"a": 1, "b": ["c"]},
    }
    roles = [f"ROLE_{i}" for i in range(40)]
    ctx = oracledb.create_end_user_security_context(
        make_jwt(sub="app"),
        end_user_identity=("dave", "key"),
        data_roles=roles,
        attributes=attributes,
    )
    conn.set_end_user_security_context(ctx)
    query_one(conn, "select 1 from dual")
    context = oracle.statements(conn.session_id)[-1].context
    assert context is not None
    assert context.data_roles == tuple(roles)
    assert dict(context.attributes) == attributes


@pytest.mark.timeout(30)
def test_attaching_a_context_adds_no_round_trip(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    query_one(conn, "select 1 from dual")
    mark = oracle.mark()
    query_one(conn, "select 1 from dual")
    plain = len(oracle.round_trips(conn.session_id, since=mark))
    mark = oracle.mark()
    conn.set_end_user_security_context(
        oracledb.create_end_user_security_context(
            make_jwt(sub="app"), end_user_identity=("e", None)
        )
    )
    query_one(conn, "select 1 from dual")
    trips = oracle.round_trips(conn.session_id, since=mark)
    assert len(trips) == plain == 1
    assert trips[0].context is not None


@pytest.mark.timeout(30)
def test_bad_tokens_fail_on_use_and_connection_recovers(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    good_db, bad_db = make_jwt(sub="app"), make_jwt(sub="app", bad=True)
    good_user, bad_user = make_jwt(sub="u1"), make_jwt(sub="u1", bad=True)
    oracle.token_validator = lambda kind, token: not decode_jwt_claims(token).get("bad")

    conn.set_end_user_security_context(
        oracledb.create_end_user_security_context(good_db, end_user_identity=bad_user)
    )
    with pytest.raises(oracledb.DatabaseError) as info:
        query_one(conn, USERNAME_SQL)
    assert info.value.args[0].code == 52601
    conn.clear_end_user_security_context()
    assert query_one(conn, USERNAME_SQL) is None

    conn.set_end_user_security_context(
        oracledb.create_end_user_security_context(bad_db, end_user_identity=good_user)
    )
    with pytest.raises(oracledb.DatabaseError) as info:
        conn.ping()
    assert info.value.args[0].code == 52602
    conn.clear_end_user_security_context()
    conn.ping()
    conn.set_end_user_security_context(
        oracledb.create_end_user_security_context(good_db, end_user_identity=good_user)
    )
    assert query_one(conn, USERNAME_SQL) == "u1"
    errors = [t.error for t in oracle.round_trips(conn.session_id) if t.error]
    assert errors == [52601, 52602]


@pytest.mark.timeout(60)
def test_pool_release_clears_context(oracle: OracleServerFixture) -> None:
    pool = oracledb.create_pool(**oracle.connect_kwargs(), min=1, max=1)
    try:
        with pool.acquire() as conn:
            conn.set_end_user_security_context(
                oracledb.create_end_user_security_context(
                    make_jwt(sub="app"), end_user_identity=("frank", None)
                )
            )
            assert query_one(conn, USERNAME_SQL) == "frank"
        with pool.acquire() as conn:
            assert query_one(conn, USERNAME_SQL + " /* reacquired */") is None
    finally:
        pool.close(force=True)
    [trip] = oracle.find_statements("reacquired")
    assert trip.context is None


@pytest.mark.timeout(60)
def test_async_connect_and_pool(oracle: OracleServerFixture) -> None:
    async def run() -> None:
        conn = await oracledb.connect_async(**oracle.connect_kwargs())
        try:
            conn.set_end_user_security_context(
                oracledb.create_end_user_security_context(
                    make_jwt(sub="app"), end_user_identity=make_jwt(preferred_username="gina")
                )
            )
            with conn.cursor() as cur:
                await cur.execute(USERNAME_SQL)
                assert await cur.fetchone() == ("gina",)
        finally:
            await conn.close()
        pool = oracledb.create_pool_async(**oracle.connect_kwargs(), min=1, max=2)
        try:
            async with pool.acquire() as pconn:
                with pconn.cursor() as cur:
                    await cur.execute("select 1 from dual")
                    assert await cur.fetchall() == [(1,)]
        finally:
            await pool.close(force=True)

    asyncio.run(run())


@pytest.mark.timeout(90)
def test_fifty_concurrent_connections(oracle: OracleTestServer) -> None:
    errors: list[BaseException] = []
    names: dict[int, str | None] = {}
    barrier = threading.Barrier(50, timeout=30)

    def worker(i: int) -> None:
        try:
            with connect(oracle) as conn:
                barrier.wait()
                conn.set_end_user_security_context(
                    oracledb.create_end_user_security_context(
                        make_jwt(sub="app"), end_user_identity=(f"user{i}", None)
                    )
                )
                for _ in range(3):
                    names[i] = query_one(conn, USERNAME_SQL + f" /* w{i} */")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_threads(worker, each=range(50), timeout=60)
    assert not errors
    assert names == {i: f"user{i}" for i in range(50)}
    for i in (0, 17, 49):
        trips = oracle.find_statements(f"/* w{i} */")
        assert len(trips) == 3
        assert {t.context.username for t in trips if t.context} == {f"user{i}"}


# -- robustness and helpers -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_dropped_sockets_do_not_break_the_server(oracle: OracleTestServer) -> None:
    for payload in (b"", b"garbage that is not TLS", None):
        with socket.create_connection(("127.0.0.1", oracle.port), timeout=5) as raw:
            if payload is None:
                tls = oracle.client_ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
                tls.sendall(b"\x00\x10\x00\x00\x01\x00\x00\x00" + b"\x00" * 8)  # truncated CONNECT
                tls.close()
            elif payload:
                raw.sendall(payload)
    conn = connect(oracle)
    conn.close()
    deadline = time.monotonic() + 5
    while oracle.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert oracle.active_connections == 0


@pytest.mark.timeout(30)
def test_stop_closes_open_connections_promptly() -> None:
    ca = TestCA()
    try:
        server = OracleTestServer(ca=ca).start()
        conn = connect(server)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3
        assert server.active_connections == 0
        with pytest.raises(oracledb.Error):
            conn.ping()
    finally:
        ca.close()


@pytest.mark.timeout(30)
def test_messages_spanning_several_packets(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    with conn.cursor() as cur:
        cur.execute("insert into t values (:1, :2)", ["x" * 20000, 5])
        assert oracle.statements(conn.session_id)[-1].binds == ("x" * 20000, 5)
        cur.execute("select 1 from dual /* " + "y" * 30000 + " */")
        assert cur.fetchall() == [(1,)]
        cur.execute("select :1 from dual", ["z" * 3000])
        assert cur.fetchone() == ("z" * 3000,)
    big_token = unsigned_jwt(sub="s", pad="p" * 20000)
    conn.set_end_user_security_context(
        oracledb.create_end_user_security_context(big_token, attributes={"k": "v" * 9000})
    )
    assert query_one(conn, USERNAME_SQL) == "s"
    context = oracle.statements(conn.session_id)[-1].context
    assert context is not None and context.database_access_token == big_token


@pytest.mark.timeout(30)
def test_fixture_credentials(oracle_server: Any) -> None:
    with oracledb.connect(**oracle_server.connect_kwargs()) as conn:
        assert query_one(conn, "select user from dual") == oracle_server.user.upper()
    with oracledb.connect(
        user=oracle_server.user,
        password=oracle_server.password,
        dsn=oracle_server.dsn,
        ssl_context=oracle_server.client_ssl_context(),
    ) as conn:
        conn.ping()


@pytest.mark.timeout(30)
def test_command_line(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepsec.testing.oracle", "--port", "0", "--ca-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        dsn = proc.stdout.readline().strip().removeprefix("DSN=")
        ca_path = proc.stdout.readline().strip().removeprefix("CA=")
        assert dsn.startswith("tcps://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=ca_path)
        with oracledb.connect(user="scott", password="tiger", dsn=dsn, ssl_context=ctx) as conn:
            assert query_one(conn, "select 1 from dual") == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_records_are_snapshots(oracle: OracleTestServer) -> None:
    assert oracle.round_trips() == []
    trip = RoundTrip(1, 1, 1, "ping", 0x93, None, (), (), None, (), 0, None, 0)
    assert not trip.is_statement


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -1,
        100,
        12345678901234567890,
        Decimal("0.5"),
        Decimal("-3.25"),
        Decimal("1e-30"),
        7.125,
    ],
)
def test_oracle_number_codec(value: Any) -> None:
    decoded = decode_oracle_number(encode_oracle_number(value))
    assert Decimal(str(decoded)) == Decimal(str(value))


def test_known_number_encodings() -> None:
    assert encode_oracle_number(1) == b"\xc1\x02"
    assert encode_oracle_number(-1) == b"\x3e\x64\x66"
    assert encode_oracle_number(100) == b"\xc2\x02"
    assert encode_oracle_number(0) == b"\x80"


def test_jwt_claims_without_verification() -> None:
    assert decode_jwt_claims(unsigned_jwt(sub="s", preferred_username="p")) == {
        "sub": "s",
        "preferred_username": "p",
    }
    assert decode_jwt_claims("not-a-jwt") == {}
    assert decode_jwt_claims(None) == {}
    assert WireContext(end_user_token="garbage").username is None


# -- row policy (an emulation for tests and demos) -------------------------------------

EMPLOYEES = [("alice", "Engineering", 9800), ("bob", "Sales", 7200), ("carol", "HR", 8900)]


def attach(conn: oracledb.Connection, user: str, roles: list[str] | None = None, **attrs: Any):
    ctx = oracledb.create_end_user_security_context(
        make_jwt(sub="hr-app"),
        end_user_identity=make_jwt(sub=f"id-{user}", preferred_username=f"{user}@example.test"),
        data_roles=roles,
        attributes=attrs or None,
    )
    conn.set_end_user_security_context(ctx)


def names(conn: oracledb.Connection, sql: str = "select name from employees") -> list[str]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return [row[0] for row in cur.fetchall()]


def hr_grant(context: WireContext | None, row: Any) -> bool:
    """No end user: nothing; the hr_viewer data role: everything; else one's own row."""
    if context is None or context.username is None:
        return False
    if "HR_VIEWER" in (context.data_roles or ()):
        return True
    return row["name"] == context.username.partition("@")[0]


@pytest.mark.timeout(30)
def test_row_policy_per_end_user_on_the_wire(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    oracle.add_table("employees", ["name", "department", "salary"], EMPLOYEES)
    oracle.row_policy = hr_grant
    assert names(conn) == []  # no end user: no rows
    attach(conn, "alice")
    assert names(conn) == ["alice"]
    assert names(conn, "select count(*) from employees") == [1]
    assert names(conn, "select name from employees where department = 'Sales'") == []
    attach(conn, "bob")
    assert names(conn, "select name from employees /* as-bob */") == ["bob"]
    attach(conn, "bob", roles=["HR_VIEWER"])
    assert names(conn) == ["alice", "bob", "carol"]
    conn.clear_end_user_security_context()
    assert names(conn) == []
    (as_bob,) = oracle.find_tagged("as-bob")
    assert as_bob.rows == 1 and as_bob.context is not None
    # DUAL is not a canned table: the policy never hides it.
    assert query_one(conn, "select 1 from dual") == 1


@pytest.mark.timeout(30)
def test_row_policy_sees_roles_attributes_and_rows(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    oracle.add_table("employees", ["name", "department", "salary"], EMPLOYEES)
    seen: list[tuple[str | None, tuple[str, ...] | None, dict[str, Any], str, dict[str, Any]]] = []

    def policy(context: WireContext | None, row: Any) -> bool:
        assert context is not None
        seen.append(
            (context.username, context.data_roles, dict(context.attributes), row.table, dict(row))
        )
        return row["DEPARTMENT"] == context.attributes["dept"]

    oracle.row_policy = policy
    attach(conn, "carol", roles=["EMP"], dept="Sales")
    assert names(conn) == ["bob"]
    assert len(seen) == len(EMPLOYEES)
    user, roles, attrs, table, row = seen[1]
    assert (user, roles, attrs, table) == (
        "carol@example.test",
        ("EMP",),
        {"dept": "Sales"},
        "EMPLOYEES",
    )
    assert row == {"NAME": "bob", "DEPARTMENT": "Sales", "SALARY": 7200}


@pytest.mark.timeout(30)
def test_a_failing_row_policy_is_ora_28113_never_all_rows(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    oracle.add_table("employees", ["name"], [("alice",)])

    def broken(context: WireContext | None, row: Any) -> bool:
        raise KeyError("no such column")

    oracle.row_policy = broken
    with pytest.raises(oracledb.DatabaseError, match="ORA-28113"):
        names(conn)
    oracle.reset()  # what the `oracle` fixture does between tests
    assert oracle.row_policy is None


def test_row_policy_from_the_constructor() -> None:
    with OracleTestServer(row_policy=hr_grant) as server:
        server.add_table("employees", ["name"], [("alice",), ("bob",)])
        with connect(server) as conn:
            assert names(conn) == []
            attach(conn, "alice")
            assert names(conn) == ["alice"]


# -- statement tags ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_tags_are_found_wherever_they_sit(
    oracle: OracleTestServer, conn: oracledb.Connection
) -> None:
    query_one(conn, "/* lead */ select 1 from dual")
    query_one(conn, "select 2 /* mid */ from dual")
    # What Django's Oracle backend sends for "... from dual /* tail */": the trailing
    # "/" is stripped, so a plain substring search for "/* tail */" finds nothing.
    query_one(conn, "select 3 from dual /* tail *")
    query_one(conn, "select 4 from dual -- dash")
    query_one(conn, "select '/* quoted */' from dual")
    assert oracle.find_statements("/* tail */") == []
    for tag, value in (("lead", 1), ("mid", 2), ("tail", 3), ("dash", 4)):
        (trip,) = oracle.find_tagged(tag)
        assert trip.sql is not None and str(value) in trip.sql
    assert oracle.find_tagged("quoted") == []
    assert oracle.find_tagged("tai") == []
    mark = oracle.mark()
    query_one(conn, "select 5 from dual /* tail */")
    assert len(oracle.find_tagged("tail")) == 2
    assert len(oracle.find_tagged("tail", since=mark)) == 1


def test_statement_has_tag() -> None:
    assert statement_has_tag("select 1 from dual /* app=hr t1 */", "t1")
    assert statement_has_tag("select 1 from dual /* t1 *", "t1")
    assert not statement_has_tag("select 1 from dual /* t10 */", "t1")
    assert not statement_has_tag("select 't1' from dual", "t1")
    assert not statement_has_tag(None, "t1")
    assert not statement_has_tag("select 1 from dual /* t1 */", "")
