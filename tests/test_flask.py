"""The Flask extension, end to end: real thin driver over TCPS to the wire test server."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import oracledb
import pytest
from flask import Flask, Response, stream_with_context

import spi_static
from adapter_support import (
    ALICE,
    CASES,
    RAW_EXPECTED,
    SECRET,
    STRICT_REJECTIONS,
    WHOAMI,
    Case,
    assert_no_secret,
    assert_ran_as,
    check_leaks,
    connect_kwargs,
    contexts_of,
    load_plan,
    query_sync,
    raw_case_answers,
    rid,
    run_load,
    tag,
    waitress_server,
)
from deepsec import ConfigError
from deepsec.context import current_end_user as current_context_user
from deepsec.flask import DeepSec, DeepSecState, current_end_user
from deepsec.testing.oracle import OracleTestServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pool(oracle_server: OracleTestServer) -> Iterator[oracledb.ConnectionPool]:
    pool = oracledb.create_pool(min=1, max=4, **connect_kwargs(oracle_server))
    yield pool
    pool.close(force=True)


def make_app(pool: oracledb.ConnectionPool, **config: Any) -> Flask:
    app = Flask(__name__)
    # These tests send local [name, key] users in cookies: opt in (off by default).
    config = {"client_local_users": True, **config}
    app.config.update({f"DEEPSEC_{k.upper()}": v for k, v in config.items()})
    DeepSec(app)

    @app.get("/whoami/<rid>")
    def whoami(rid: str) -> dict[str, Any]:
        db = query_sync(pool, rid)
        user = current_end_user
        return {"db": db, "name": user.name if user else None, "has_user": bool(user)}

    def rows(rid: str) -> Iterator[str]:
        """Three chunks, each from a statement run while the body is produced."""
        for i in range(3):
            with pool.acquire() as conn, conn.cursor() as cur:
                cur.execute(f"{WHOAMI} {tag(rid)}")
                yield f"{i}:{cur.fetchone()[0]}\n"

    @app.get("/stream/<rid>")
    def stream(rid: str) -> Response:
        return Response(stream_with_context(rows(rid)), mimetype="text/plain")

    @app.get("/plain-stream/<rid>")
    def plain_stream(rid: str) -> Response:
        return Response(rows(rid), mimetype="text/plain")

    @app.get("/boom/<rid>")
    def boom(rid: str) -> str:
        with pool.acquire() as conn, conn.cursor() as cur:
            cur.execute(f"{WHOAMI} {tag(rid)}")
        raise RuntimeError("view failed")

    return app


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_identity_reaches_the_database(
    case: Case, pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    client = make_app(pool).test_client(use_cookies=False)
    r = rid()
    response = client.get(f"/whoami/{r}", headers=case.headers)
    assert response.status_code == 200, response.text
    assert response.json["db"] == [case.user, case.user]
    assert response.json["has_user"] is (case.user is not None)
    assert_ran_as(oracle_server, r, case.user, 2)
    assert current_context_user() is None  # reset in the test client's thread


@pytest.mark.parametrize(("headers", "status", "challenge"), STRICT_REJECTIONS)
def test_strict_mode_rejects_malformed_identity(
    headers: dict[str, str],
    status: int,
    challenge: str | None,
    pool: oracledb.ConnectionPool,
    oracle_server: OracleTestServer,
) -> None:
    client = make_app(pool, strict=True).test_client(use_cookies=False)
    r = rid()
    response = client.get(f"/whoami/{r}", headers=headers)
    assert response.status_code == status
    assert response.headers.get("WWW-Authenticate") == challenge
    assert response.json["error"] in ("bad_request", "invalid_token")
    assert contexts_of(oracle_server, r) == []  # the view never ran
    # A good identity still works in strict mode.
    response = client.get(f"/whoami/{r}", headers={"Cookie": f"identity={ALICE}"})
    assert response.json["db"] == ["alice", "alice"]


def test_deny_policy(pool: oracledb.ConnectionPool, oracle_server: OracleTestServer) -> None:
    client = make_app(pool, no_identity="deny").test_client(use_cookies=False)
    r = rid()
    response = client.get(f"/whoami/{r}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert contexts_of(oracle_server, r) == []
    response = client.get(f"/whoami/{r}", headers={"Cookie": 'identity=["bob", null]'})
    assert response.status_code == 200
    assert_ran_as(oracle_server, r, "bob", 2)


def test_token_failure_is_503_without_secrets(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer, caplog: Any
) -> None:
    client = make_app(pool).test_client(use_cookies=False)
    r = rid()
    name = f"nobody-{r}"  # never cached: the token must be fetched
    spi_static.FAIL.append(RuntimeError(SECRET))
    try:
        response = client.get(f"/whoami/{r}", headers={"Cookie": f'identity=["{name}", null]'})
    finally:
        spi_static.FAIL.clear()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"] == "token_unavailable"
    assert_no_secret(response.text)
    assert_no_secret(caplog.text)
    assert contexts_of(oracle_server, r) == []  # failed closed: nothing ran as the app
    assert current_context_user() is None


def test_stream_with_context_runs_as_the_end_user(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    client = make_app(pool).test_client(use_cookies=False)
    for path in ("stream", "plain-stream"):
        r = rid()
        response = client.get(
            f"/{path}/{r}", headers={"Cookie": f"identity={ALICE}"}, buffered=False
        )
        chunks = response.response
        first = next(iter(chunks))
        assert first == b"0:alice\n"
        # Between chunks the server's thread has no end user: only the code
        # producing a chunk runs as alice (all three statements, checked below).
        assert current_context_user() is None
        rest = b"".join(chunks)
        response.close()
        assert rest == b"1:alice\n2:alice\n"
        assert_ran_as(oracle_server, r, "alice", 3)
        assert current_context_user() is None


def test_stream_closed_early_resets(pool: oracledb.ConnectionPool) -> None:
    client = make_app(pool).test_client(use_cookies=False)
    response = client.get(
        f"/stream/{rid()}", headers={"Cookie": f"identity={ALICE}"}, buffered=False
    )
    assert next(iter(response.response)) == b"0:alice\n"
    response.close()  # the client went away after one chunk
    assert current_context_user() is None


def test_reset_after_an_exception(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    app = make_app(pool)
    client = app.test_client(use_cookies=False)
    r = rid()
    response = client.get(f"/boom/{r}", headers={"Cookie": f"identity={ALICE}"})
    assert response.status_code == 500
    # Werkzeug's error page body is an iterator: it too runs as alice until closed.
    response.close()
    assert_ran_as(oracle_server, r, "alice", 1)
    assert current_context_user() is None


def test_data_roles_and_attributes_callables(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    client = make_app(
        pool,
        data_roles=lambda request: ["reader"] if request.path.startswith("/whoami") else None,
        attributes=lambda request: {"path": request.path},
    ).test_client(use_cookies=False)
    r = rid()
    response = client.get(f"/whoami/{r}", headers={"Authorization": f"Bearer {ALICE}"})
    assert response.json["db"] == ["alice", "alice"]
    trips = oracle_server.find_statements(tag(r))
    assert len(trips) == 2
    for trip in trips:
        assert trip.context is not None
        assert trip.context.data_roles == ("reader",)
        assert trip.context.attributes["path"] in (f"/whoami/{r}", [f"/whoami/{r}"])


def test_resolver_setting(pool: oracledb.ConnectionPool, oracle_server: OracleTestServer) -> None:
    client = make_app(
        pool, resolver=lambda request: (request.headers.get("X-User") or None, None)
    ).test_client(use_cookies=False)
    r = rid()
    # The cookie is not read when a resolver is configured.
    response = client.get(f"/whoami/{r}", headers={"X-User": "dave", "Cookie": f"identity={ALICE}"})
    assert response.json == {"db": ["dave", "dave"], "name": "dave", "has_user": True}


def test_config_and_factory_pattern() -> None:
    ext = DeepSec(strict=True)
    app = Flask("factory")
    app.config["DEEPSEC_COOKIE_NAME"] = "who"
    ext.init_app(app)
    state = app.extensions["deepsec"]
    assert isinstance(state, DeepSecState) and state.extension is ext
    assert state.settings.strict is True and state.settings.cookie_name == "who"
    assert DeepSec.settings(app) is state.settings
    assert "secret" not in repr(ext)

    bad = Flask("bad")
    bad.config["DEEPSEC_COOKIE"] = "x"
    bad.config["DEEPSEC_STRIKT"] = True
    with pytest.raises(ConfigError) as info:
        DeepSec(bad)
    assert "DEEPSEC_COOKIE" in str(info.value) and "DEEPSEC_STRIKT" in str(info.value)
    with pytest.raises(ConfigError, match="no_identity"):
        DeepSec(Flask("x"), no_identity="maybe")
    with pytest.raises(ConfigError, match="colour"):
        DeepSec(colour="red")


def test_through_waitress_with_streaming(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    with waitress_server(make_app(pool)) as url, httpx.Client(base_url=url, timeout=20) as http:
        r1, r2, r3 = rid(), rid(), rid()
        assert http.get(f"/stream/{r1}", headers={"Cookie": f"identity={ALICE}"}).text == (
            "0:alice\n1:alice\n2:alice\n"
        )
        bob = http.get(f"/plain-stream/{r2}", headers={"Cookie": 'identity=["bob", null]'})
        assert bob.text == "0:bob\n1:bob\n2:bob\n"
        assert http.get(f"/stream/{r3}").text == "0:None\n1:None\n2:None\n"
    assert_ran_as(oracle_server, r1, "alice", 3)
    assert_ran_as(oracle_server, r2, "bob", 3)
    assert_ran_as(oracle_server, r3, None, 3)


@pytest.mark.timeout(90)
def test_no_leak_under_load_with_persistent_connections(oracle_server: OracleTestServer) -> None:
    """2,000 requests, 20 users, 16 clients, 6 app-held connections kept across requests."""
    conns: queue.Queue[oracledb.Connection] = queue.Queue()
    held = [oracledb.connect(**connect_kwargs(oracle_server)) for _ in range(6)]
    for conn in held:
        conns.put(conn)
    app = Flask("leak")
    DeepSec(app, client_local_users=True)  # the load mixes token and local users

    @app.get("/whoami/<rid>")
    def whoami(rid: str) -> dict[str, Any]:
        conn = conns.get(timeout=10)
        try:
            with conn.cursor() as cur:
                db = []
                for _ in range(2):
                    cur.execute(f"{WHOAMI} {tag(rid)}")
                    db.append(cur.fetchone()[0])
        finally:
            conns.put(conn)
        return {"db": db}

    stop = threading.Event()
    outside: list[Any] = []

    def outside_requests() -> None:  # a plain thread: no request, no end user
        n = 0
        while not stop.is_set():
            conn = conns.get(timeout=10)
            try:
                with conn.cursor() as cur:
                    cur.execute(f"select 1 from dual /* out-{n} */")
                    outside.append(cur.fetchone())
            finally:
                conns.put(conn)
            n += 1
            stop.wait(0.002)

    plan = load_plan(2000, seed=7)
    since = oracle_server.mark()
    worker = threading.Thread(target=outside_requests, daemon=True)
    worker.start()
    try:
        with waitress_server(app) as url:
            run_load(url, plan)
    finally:
        stop.set()
        worker.join(10)
        for conn in held:
            conn.close()
    report = check_leaks(oracle_server, since, {r: u for r, u, _ in plan}, statements_per_request=2)
    assert report.requests == 2000 and report.statements == 4000
    assert report.outside == len(outside) > 10


def test_database_rejecting_the_end_user_token_is_401(
    pool: oracledb.ConnectionPool, oracle_server: OracleTestServer
) -> None:
    """ORA-52601 (expired or revoked user token) means: sign in again."""
    client = make_app(pool).test_client(use_cookies=False)
    r = rid()
    oracle_server.token_validator = lambda kind, token: kind != "end_user_token"
    try:
        response = client.get(f"/whoami/{r}", headers={"Authorization": f"Bearer {ALICE}"})
    finally:
        oracle_server.token_validator = None
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json["error"] == "invalid_token"
    assert ALICE not in response.text
    assert current_context_user() is None


def test_raw_header_fields_through_waitress(pool: oracledb.ConnectionPool) -> None:
    """Repeated fields, nested JSON, surrogates, UTF-8: the same end user as every adapter."""
    with waitress_server(make_app(pool)) as url:
        answers = raw_case_answers(url, lambda r: f"/whoami/{r}", lambda body: body["db"][0])
    assert answers == RAW_EXPECTED
