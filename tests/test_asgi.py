"""The pure ASGI middleware under Starlette, end to end over TCPS to the wire test server."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import oracledb
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import spi_static
from adapter_support import (
    ALICE,
    CAROL,
    CASES,
    SECRET,
    STRICT_REJECTIONS,
    WHOAMI,
    Case,
    app_pools,
    assert_no_secret,
    assert_ran_as,
    assert_token_rejected_is_401,
    check_leaks,
    connect_kwargs,
    contexts_of,
    load_plan,
    query_async,
    query_sync,
    rid,
    run_load,
    tag,
    user_token,
    uvicorn_server,
)
from deepsec import ConfigError, EndUserContext, current_end_user

with warnings.catch_warnings():  # Starlette 1.x prefers httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

from deepsec.asgi import SCOPE_KEY, ASGIConnection, EndUserSecMiddleware
from deepsec.testing.oracle import OracleTestServer

pytestmark = pytest.mark.timeout(60)


def make_app(server: OracleTestServer, *, outer: bool = False, **settings: Any) -> Any:
    """The test app; ``outer=True`` wraps a plain Starlette app from outside instead."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with app_pools(app.state, server):
            yield

    async def whoami(request: Request) -> JSONResponse:
        db = await query_async(request.app.state.apool, request.path_params["rid"])
        user = current_end_user()
        return JSONResponse(
            {"db": db, "has_user": user is not None, "scope": request.scope[SCOPE_KEY] == user}
        )

    def sync_whoami(request: Request) -> JSONResponse:  # runs in the thread pool
        db = query_sync(request.app.state.pool, request.path_params["rid"])
        return JSONResponse({"db": db})

    async def stream(request: Request) -> StreamingResponse:
        pool, rid = request.app.state.apool, request.path_params["rid"]

        async def rows() -> AsyncIterator[str]:
            for i in range(3):
                yield f"{i}:{(await query_async(pool, rid, 1))[0]}\n"
                await asyncio.sleep(0)

        return StreamingResponse(rows(), media_type="text/plain")

    def sync_stream(request: Request) -> StreamingResponse:
        pool, rid = request.app.state.pool, request.path_params["rid"]

        def rows() -> Iterator[str]:  # iterated in the thread pool
            for i in range(3):
                yield f"{i}:{query_sync(pool, rid, 1)[0]}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        rid = websocket.path_params["rid"]
        for _ in range(2):
            await websocket.receive_text()
            db = await query_async(websocket.app.state.apool, rid, 1)
            await websocket.send_text(str(db[0]))
        await websocket.close()

    mw_settings = {"client_local_users": True, **settings}
    app = Starlette(
        routes=[
            Route("/whoami/{rid}", whoami),
            Route("/sync-whoami/{rid}", sync_whoami),
            Route("/stream/{rid}", stream),
            Route("/sync-stream/{rid}", sync_stream),
            WebSocketRoute("/ws/{rid}", ws),
        ],
        # These tests send local [name, key] users in cookies: opt in.
        middleware=[] if outer else [Middleware(EndUserSecMiddleware, **mw_settings)],
        lifespan=lifespan,
    )
    return EndUserSecMiddleware(app, **mw_settings) if outer else app


@pytest.fixture(scope="module")
def client(oracle_server: OracleTestServer) -> Iterator[TestClient]:
    with TestClient(make_app(oracle_server)) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("endpoint", ["whoami", "sync-whoami"])
def test_identity_reaches_the_database(
    case: Case, endpoint: str, client: TestClient, oracle_server: OracleTestServer
) -> None:
    r = rid()
    response = client.get(f"/{endpoint}/{r}", headers=case.headers)
    assert response.status_code == 200, response.text
    assert response.json()["db"] == [case.user, case.user]
    if endpoint == "whoami":
        assert response.json()["has_user"] is (case.user is not None)
        assert response.json()["scope"] is True
    assert_ran_as(oracle_server, r, case.user, 2)


@pytest.mark.parametrize("endpoint", ["stream", "sync-stream"])
def test_streaming_body_runs_as_the_end_user(
    endpoint: str, client: TestClient, oracle_server: OracleTestServer
) -> None:
    r1, r2 = rid(), rid()
    response = client.get(f"/{endpoint}/{r1}", headers={"Authorization": f"Bearer {ALICE}"})
    assert response.text == "0:alice\n1:alice\n2:alice\n"
    response = client.get(f"/{endpoint}/{r2}")
    assert response.text == "0:None\n1:None\n2:None\n"
    assert_ran_as(oracle_server, r1, "alice", 3)
    assert_ran_as(oracle_server, r2, None, 3)


def test_websocket_session_runs_as_the_end_user(
    client: TestClient, oracle_server: OracleTestServer
) -> None:
    r = rid()
    with client.websocket_connect(f"/ws/{r}", headers={"Cookie": 'identity=["bob", null]'}) as ws:
        ws.send_text("1")
        assert ws.receive_text() == "bob"
        ws.send_text("2")
        assert ws.receive_text() == "bob"
    assert_ran_as(oracle_server, r, "bob", 2)


@pytest.mark.parametrize(("headers", "status", "challenge"), STRICT_REJECTIONS)
def test_strict_mode(
    headers: dict[str, str], status: int, challenge: str | None, oracle_server: OracleTestServer
) -> None:
    with TestClient(make_app(oracle_server, strict=True)) as client:
        r = rid()
        response = client.get(f"/whoami/{r}", headers=headers)
        assert response.status_code == status
        assert response.headers.get("www-authenticate") == challenge
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] in ("bad_request", "invalid_token")
        # WebSocket handshake: denied with the same HTTP response.
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect(f"/ws/{r}", headers=headers).__enter__()
        assert denied.value.status_code == status
        ok = client.get(f"/whoami/{r}", headers={"Cookie": f"identity={ALICE}"})
        assert ok.json()["db"] == ["alice", "alice"]
    assert contexts_of(oracle_server, r) == ["alice", "alice"]


def test_deny_policy(oracle_server: OracleTestServer) -> None:
    with TestClient(make_app(oracle_server, no_identity="deny")) as client:
        r = rid()
        response = client.get(f"/whoami/{r}")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.get(f"/whoami/{r}", headers={"Authorization": f"Bearer {CAROL}"}).json()[
            "db"
        ] == ["carol", "carol"]
    assert_ran_as(oracle_server, r, "carol", 2)


def test_token_failure_is_503_without_secrets(
    client: TestClient, oracle_server: OracleTestServer, caplog: Any
) -> None:
    r = rid()
    spi_static.FAIL.append(RuntimeError(SECRET))
    try:
        response = client.get(f"/whoami/{r}", headers={"Cookie": f'identity=["nobody-{r}", null]'})
        sync = client.get(f"/sync-whoami/{r}", headers={"Cookie": f'identity=["nobody-{r}", null]'})
    finally:
        spi_static.FAIL.clear()
    for resp in (response, sync):
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "5"
        assert resp.json()["error"] == "token_unavailable"
        assert_no_secret(resp.text)
    assert_no_secret(caplog.text)
    assert contexts_of(oracle_server, r) == []  # failed closed


async def _asgi_call(app: Any, scope: dict[str, Any], incoming: list[Any]) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_websocket_close_1008_without_http_response_extension() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("the app must not run")

    mw = EndUserSecMiddleware(app, no_identity="deny", client_local_users=True)
    scope = {"type": "websocket", "path": "/ws", "headers": [], "extensions": {}}
    sent = asyncio.run(_asgi_call(mw, scope, [{"type": "websocket.connect"}]))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]


def test_lifespan_and_other_scopes_pass_through() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], SCOPE_KEY in scope, current_end_user()))
        await send({"type": "lifespan.startup.complete"})

    mw = EndUserSecMiddleware(app, no_identity="deny", client_local_users=True)
    sent = asyncio.run(_asgi_call(mw, {"type": "lifespan"}, [{"type": "lifespan.startup"}]))
    assert seen == [("lifespan", False, None)]
    assert sent == [{"type": "lifespan.startup.complete"}]


def test_resolver_gets_a_neutral_connection_and_context_is_reset() -> None:
    seen: list[Any] = []

    def resolver(conn: ASGIConnection) -> Any:
        seen.append((conn.method, conn.path, conn.headers["x-user"], dict(conn.cookies)))
        return EndUserContext((conn.headers["x-user"], None), attributes={"p": conn.path})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        user = current_end_user()
        assert user is not None and scope[SCOPE_KEY] is user
        body = f"{user.name}:{dict(user.attributes or {})}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    mw = EndUserSecMiddleware(app, resolver=resolver, client_local_users=True)
    # (Fields that are not bytes, against the ASGI spec, are absent: never a 500.)
    headers = [
        (b"x-user", b"erin"),
        (b"cookie", b"a=1; b=2"),
        ("x-user", "mallory"),
        (b"cookie", "a=4"),
        (b"cookie", b"a=3"),
    ]
    scope = {"type": "http", "method": "GET", "path": "/p", "headers": headers}

    async def run() -> list[Any]:
        sent = await _asgi_call(mw, scope, [])
        assert current_end_user() is None  # reset after the call
        return sent

    sent = asyncio.run(run())
    assert sent[1]["body"] == b"erin:{'p': '/p'}"
    assert seen == [("GET", "/p", "erin", {"a": "1", "b": "2"})]
    assert "erin" not in repr(ASGIConnection(scope).headers)


def test_settings_validation() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    with pytest.raises(ConfigError, match="colour"):
        EndUserSecMiddleware(app, colour="red")
    with pytest.raises(ConfigError, match="no_identity"):
        EndUserSecMiddleware(app, no_identity="sometimes")


@pytest.mark.timeout(90)
def test_no_leak_under_load_through_uvicorn(oracle_server: OracleTestServer) -> None:
    """2,000 requests, 20 users, 16 clients, 6 app-held AsyncConnections kept across requests."""
    counts = {"outside": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        conns: asyncio.Queue[Any] = asyncio.Queue()
        held = [await oracledb.connect_async(**connect_kwargs(oracle_server)) for _ in range(6)]
        for conn in held:
            conns.put_nowait(conn)
        app.state.conns = conns
        stop = asyncio.Event()

        async def outside() -> None:  # started by lifespan: no request, no end user
            n = 0
            while not stop.is_set():
                conn = await conns.get()
                try:
                    cur = conn.cursor()
                    await cur.execute(f"select 1 from dual /* out-{n} */")
                    await cur.fetchone()
                    counts["outside"] += 1
                finally:
                    conns.put_nowait(conn)
                n += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(outside())
        yield
        stop.set()
        await task
        for conn in held:
            await conn.close()

    async def whoami(request: Request) -> JSONResponse:
        conns = request.app.state.conns
        conn = await conns.get()
        try:
            cur = conn.cursor()
            db = []
            for _ in range(2):
                await cur.execute(f"{WHOAMI} {tag(request.path_params['rid'])}")
                db.append((await cur.fetchone())[0])
        finally:
            conns.put_nowait(conn)
        return JSONResponse({"db": db})

    app = Starlette(
        routes=[Route("/whoami/{rid}", whoami)],
        middleware=[Middleware(EndUserSecMiddleware, client_local_users=True)],
        lifespan=lifespan,
    )
    plan = load_plan(2000, seed=11)
    since = oracle_server.mark()
    with uvicorn_server(app) as url:
        run_load(url, plan)
        assert httpx.get(f"{url}/whoami/final", timeout=10).json() == {"db": [None, None]}
    expected = {r: u for r, u, _ in plan} | {"final": None}
    report = check_leaks(oracle_server, since, expected, statements_per_request=2)
    assert report.requests == 2001 and report.statements == 4002
    assert report.outside == counts["outside"] > 10


def test_database_rejecting_the_end_user_token_is_401(
    client: TestClient, oracle_server: OracleTestServer
) -> None:
    """ORA-52601 (expired or revoked user token) means: sign in again."""
    r = rid()
    assert_token_rejected_is_401(client, oracle_server, [f"/whoami/{r}", f"/sync-whoami/{r}"])


def test_middleware_wrapping_a_starlette_app_answers_endpoint_errors(
    oracle_server: OracleTestServer,
) -> None:
    """``EndUserSecMiddleware(app)``: Starlette's error middleware sends 500 first."""
    with uvicorn_server(make_app(oracle_server, outer=True)) as url:
        r = rid()
        with httpx.Client(base_url=url, timeout=20) as http:
            assert_token_rejected_is_401(http, oracle_server, [f"/whoami/{r}", f"/sync-whoami/{r}"])
            ok = http.get(f"/whoami/{r}", headers={"Authorization": f"Bearer {ALICE}"})
            assert ok.json()["db"] == ["alice", "alice"]


@pytest.mark.parametrize("streamed", [True, False], ids=["more-body", "over-64KB"])
def test_a_streaming_or_large_500_is_not_held_back(streamed: bool) -> None:
    """Only a small, complete 500 is held: a streaming one goes out as it comes."""
    from deepsec import TokenNotReadyError

    seen_by_client: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        if streamed:
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        else:
            await send({"type": "http.response.body", "body": b"x" * 70_000, "more_body": True})
        # The client already has the status line and the first chunk.
        seen_by_client.append(len(sent))
        raise TokenNotReadyError("gone")

    sent: list[Any] = []

    async def run() -> None:
        async def receive() -> Any:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        with pytest.raises(TokenNotReadyError):
            await EndUserSecMiddleware(app)({"type": "http", "headers": []}, receive, send)

    asyncio.run(run())
    assert seen_by_client == [2]
    assert [m.get("status") for m in sent] == [500, None]  # no 503 after a started 500


def test_a_small_complete_500_is_still_replaced() -> None:
    from deepsec import TokenNotReadyError

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        raise TokenNotReadyError("gone")

    sent = asyncio.run(_asgi_call(EndUserSecMiddleware(app), {"type": "http", "headers": []}, []))
    assert sent[0]["status"] == 503


def test_repeat_requests_are_one_lookup_by_the_raw_bytes_and_malformed_ones_never_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The hot path: a repeat of earlier header bytes reuses their resolution.

    Only a valid resolution without a warning is remembered under the bytes:
    a malformed cookie next to a valid token still warns on every request,
    repeated fields and headers that are not bytes are resolved in full, and
    none of them reaches a 500.
    """
    import logging

    from deepsec.asgi import _BYTES

    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((current_end_user(), scope[SCOPE_KEY]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = EndUserSecMiddleware(app)
    bearer = (b"authorization", f"Bearer {ALICE}".encode())

    def call(headers: list[Any]) -> int:
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        sent = asyncio.run(_asgi_call(mw, scope, []))
        assert current_end_user() is None  # reset after every request
        return int(sent[0]["status"])

    assert call([bearer, (b"cookie", b"theme=dark")]) == 200
    assert (_BYTES, b"theme=dark", bearer[1]) in mw.settings._by_raw
    assert call([bearer, (b"cookie", b"theme=dark")]) == 200
    (first, in_scope), (second, _) = seen
    assert first is not None and first is second is in_scope  # one remembered context

    caplog.set_level(logging.WARNING, logger="deepsec.web")
    caplog.clear()
    bad = (b"cookie", b'identity=["bob"')
    for _ in range(3):
        assert call([bad, bearer]) == 200
    assert len([r for r in caplog.records if r.name == "deepsec.web"]) == 3
    assert all('["bob"' not in str(key) for key in [*mw.settings._resolved, *mw.settings._by_raw])
    assert seen[-1][0] == first  # the bearer token still counts

    # Repeated fields and non-bytes values: resolved in full, never a 500.
    assert call([(b"cookie", b"a=1"), bearer, (b"cookie", b"b=2")]) == 200
    assert call([(b"cookie", bytearray(b"a=1")), bearer]) == 200
    assert seen[-2][0] == seen[-1][0] == first
    # Values that are not bytes at all break the spec: the field counts as absent.
    assert call([(b"cookie", "identity=x"), bearer]) == 200 and seen[-1][0] == first
    # A memoryview is read as its bytes, remembered or not (a writable one
    # cannot be hashed: ValueError; a strided one reads in its logical order).
    writable = memoryview(bytearray(bearer[1]))
    assert call([(b"authorization", writable)]) == 200 and seen[-1][0] == first
    assert call([(b"authorization", memoryview(bearer[1]))]) == 200 and seen[-1][0] == first
    padded = bytearray(b"x" * (2 * len(bearer[1])))
    padded[::2] = bearer[1]
    strided = memoryview(bytes(padded))[::2]
    assert call([(b"authorization", strided)]) == 200 and seen[-1][0] == first
    cold = EndUserSecMiddleware(app)  # nothing remembered: read in full
    scope = {"type": "http", "path": "/", "headers": [(b"authorization", memoryview(bearer[1]))]}
    asyncio.run(_asgi_call(cold, scope, []))
    assert seen[-1][0] == first
    assert call([(b"authorization", None)]) == 200 and seen[-1][0] is None
    assert call([(b"authorization", f"Bearer {ALICE}")]) == 200 and seen[-1][0] is None
    remembered = [key for key in mw.settings._by_raw if key and key[0] is _BYTES]
    assert all(isinstance(part, (bytes, type(None))) for key in remembered for part in key[1:])
    # A repeated field whose first value alone is remembered (Alice's bearer
    # above) is not that value: two different tokens name no end user.
    other = (b"authorization", f"Bearer {user_token('bob')}".encode())
    assert call([bearer]) == 200
    assert (_BYTES, None, bearer[1]) in mw.settings._by_raw
    assert call([bearer, other]) == 200
    assert seen[-1][0] is None


def test_a_scope_without_headers_runs_as_nobody_not_500() -> None:
    """``headers`` may be missing from a hand-built or minimal server's scope."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_end_user())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = asyncio.run(
        _asgi_call(EndUserSecMiddleware(app), {"type": "http", "method": "GET", "path": "/"}, [])
    )
    assert sent[0]["status"] == 200 and seen == [None]


def test_an_error_while_fetching_tokens_ends_the_lease() -> None:
    """Not a deepsec error (a custom source's bug, a cancellation): it propagates,
    and the end user does not stay current in the request's task."""
    from deepsec import lifecycle
    from deepsec.context import activate
    from deepsec.web import WebSettings

    async def run() -> tuple[bool, object]:
        lease = activate(EndUserContext(ALICE))
        original = lifecycle.prepare

        async def broken(context: Any) -> None:
            raise ZeroDivisionError("a custom token source's bug")

        lifecycle.prepare = broken  # type: ignore[assignment]
        try:
            with pytest.raises(ZeroDivisionError):
                await lifecycle.fetch_tokens(lease, WebSettings())
        finally:
            lifecycle.prepare = original  # type: ignore[assignment]
        return lease.active, current_end_user()

    assert asyncio.run(run()) == (False, None)


def test_the_hot_path_lease_sets_every_field_of_activation() -> None:
    """The hot path's lease (a remembered request) has every slot Activation has
    set, and ends for tasks that outlive the request.
    """
    from deepsec.context import Activation, _current

    slots = {name for cls in Activation.__mro__ for name in getattr(cls, "__slots__", ())}
    leases: list[Any] = []
    tasks: list[Any] = []
    late: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        lease = _current.get()
        leases.append({name: hasattr(lease, name) for name in slots})
        leases.append(lease)

        async def outlives() -> None:
            await asyncio.sleep(0.05)
            late.append(current_end_user())

        tasks.append(asyncio.ensure_future(outlives()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = EndUserSecMiddleware(app)
    headers = [(b"authorization", f"Bearer {ALICE}".encode())]

    async def run() -> None:
        for _ in range(2):  # the first request resolves in full, the second is the hot path
            await _asgi_call(mw, {"type": "http", "headers": headers}, [])
            assert current_end_user() is None
        await asyncio.gather(*tasks)

    asyncio.run(run())
    hot_fields, hot_lease = leases[2], leases[3]
    assert hot_fields == dict.fromkeys(slots, True)
    assert hot_lease.context.identity == ALICE
    assert not hot_lease.active and hot_lease._token is None
    assert late == [None, None]  # the spawned tasks lost the end user when it ended
