"""The FastAPI dependency, end to end over TCPS to the wire test server."""

# No "from __future__ import annotations": FastAPI must see the local Annotated aliases.

import asyncio
import contextlib
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import oracledb
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

import deepsec
import spi_static
from adapter_support import (
    ALICE,
    CAROL,
    CASES,
    RAW_EXPECTED,
    SECRET,
    STRICT_REJECTIONS,
    WHOAMI,
    Case,
    app_pools,
    assert_no_secret,
    assert_ran_as,
    assert_token_rejected_is_401,
    check_leaks,
    contexts_of,
    load_plan,
    query_async,
    query_sync,
    raw_case_answers,
    rid,
    run_load,
    tag,
    user_token,
    uvicorn_server,
)
from deepsec import ConfigError, EndUserContext, current_end_user
from deepsec.asgi import EndUserSecMiddleware
from deepsec.fastapi import EndUser, EndUserIdentity, add_security_schemes, end_user_identity
from deepsec.testing.oracle import OracleTestServer

with warnings.catch_warnings():  # Starlette 1.x prefers httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.timeout(60)


# These tests send local [name, key] users in cookies: opt in (off by default).
LOCAL_USERS = EndUserIdentity(client_local_users=True)
BOB = user_token("bob")
#: An operation's ``security`` with both of deepsec's schemes (either may be sent).
BOTH_SCHEMES = [{"HTTPBearer": []}, {"APIKeyCookie": []}]


def make_app(
    server: OracleTestServer,
    dependency: EndUserIdentity = LOCAL_USERS,
    *,
    middleware: bool = False,
    background: bool = False,
) -> FastAPI:
    User = Annotated[EndUserContext | None, Depends(dependency)]
    FunctionScopedUser = Annotated[EndUserContext | None, Depends(dependency, scope="function")]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with app_pools(app.state, server):
            app.state.outside = 0
            stop = threading.Event()
            outside: threading.Thread | None = None
            if background:

                def run_outside() -> None:  # a plain thread on the same pool: no end user
                    n = 0
                    while not stop.is_set():
                        with app.state.pool.acquire() as conn, conn.cursor() as cur:
                            cur.execute(f"select 1 from dual /* out-{n} */")
                            cur.fetchone()
                        app.state.outside += 1
                        n += 1
                        stop.wait(0.002)

                outside = threading.Thread(target=run_outside, daemon=True)
                outside.start()
            yield
            stop.set()
            if outside is not None:
                outside.join(10)

    app = FastAPI(lifespan=lifespan)
    if middleware:
        app.add_middleware(EndUserSecMiddleware, client_local_users=True)

    @app.get("/whoami/{rid}")
    async def whoami(rid: str, request: Request, user: User) -> dict[str, Any]:
        db = await query_async(request.app.state.apool, rid)
        assert current_end_user() == user
        return {"db": db, "has_user": user is not None}

    @app.get("/sync-whoami/{rid}")
    def sync_whoami(rid: str, request: Request, user: User) -> dict[str, Any]:
        # A def endpoint runs in the thread pool; the context was copied into it.
        db = query_sync(request.app.state.pool, rid)
        assert current_end_user() == user
        return {"db": db, "has_user": user is not None}

    @app.get("/stream/{rid}")
    async def stream(rid: str, request: Request, user: User) -> StreamingResponse:
        pool = request.app.state.apool

        async def rows() -> AsyncIterator[str]:
            for i in range(3):
                yield f"{i}:{(await query_async(pool, rid, 1))[0]}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/stream-function-scope/{rid}")
    async def stream_function_scope(
        rid: str, request: Request, user: FunctionScopedUser
    ) -> StreamingResponse:
        pool = request.app.state.apool
        before = (await query_async(pool, rid, 1))[0]

        async def rows() -> AsyncIterator[str]:
            yield f"endpoint:{before}\n"
            yield f"stream:{(await query_async(pool, rid, 1))[0]}\n"

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/spawn/{rid}")
    async def spawn(rid: str, request: Request, user: User) -> dict[str, Any]:
        # Work that outlives the request: a task and a thread (to_thread copies
        # the context), both querying after the response has been sent.
        gate = threading.Event()

        async def later() -> Any:
            await asyncio.to_thread(gate.wait, 10)
            return (await query_async(request.app.state.apool, rid, 1))[0]

        def later_thread() -> Any:
            gate.wait(10)
            return query_sync(request.app.state.pool, rid, 1)[0]

        request.app.state.spawned = (
            gate,
            asyncio.create_task(later()),
            asyncio.ensure_future(asyncio.to_thread(later_thread)),
        )
        return {"during": (await query_async(request.app.state.apool, rid, 1))[0]}

    @app.get("/spawned")
    async def spawned(request: Request) -> dict[str, Any]:
        gate, task, thread = request.app.state.spawned
        gate.set()
        return {"after": [await task, await thread]}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("not a deepsec error")

    @app.get("/not-ready/{rid}")
    async def not_ready(rid: str, request: Request, user: User) -> dict[str, Any]:
        # A new end user inside the request, without prepare(): the asyncio
        # statement finds no token cached and raises TokenNotReadyError.
        async with request.app.state.apool.acquire() as conn:
            with deepsec.end_user(user_token(f"fresh-{rid}")):
                await conn.cursor().execute(f"{WHOAMI} {tag(rid)}")
        return {"unreachable": True}

    @app.websocket("/ws/{rid}")
    async def ws(websocket: WebSocket, rid: str, user: User) -> None:
        await websocket.accept()
        await websocket.send_text(str((await query_async(websocket.app.state.apool, rid, 1))[0]))
        await websocket.close()

    return app


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
    assert response.json() == {"db": [case.user, case.user], "has_user": case.user is not None}
    assert_ran_as(oracle_server, r, case.user, 2)


def test_streaming_response_runs_as_the_end_user(
    client: TestClient, oracle_server: OracleTestServer
) -> None:
    r1, r2 = rid(), rid()
    assert client.get(f"/stream/{r1}", headers={"Authorization": f"Bearer {ALICE}"}).text == (
        "0:alice\n1:alice\n2:alice\n"
    )
    assert client.get(f"/stream/{r2}").text == "0:None\n1:None\n2:None\n"
    assert_ran_as(oracle_server, r1, "alice", 3)
    assert_ran_as(oracle_server, r2, None, 3)


def test_identity_lasts_the_request_whatever_the_depends_scope(
    client: TestClient, oracle_server: OracleTestServer
) -> None:
    """The dependency has no exit code: the request's exit stack ends the identity,
    after the response, also with ``Depends(..., scope="function")``."""
    r = rid()
    response = client.get(
        f"/stream-function-scope/{r}", headers={"Authorization": f"Bearer {ALICE}"}
    )
    assert response.text == "endpoint:alice\nstream:alice\n"
    assert contexts_of(oracle_server, r) == ["alice", "alice"]


def test_websocket_route(client: TestClient, oracle_server: OracleTestServer) -> None:
    r = rid()
    with client.websocket_connect(f"/ws/{r}", headers={"Cookie": 'identity=["bob", null]'}) as ws:
        assert ws.receive_text() == "bob"
    assert_ran_as(oracle_server, r, "bob", 1)


def test_openapi_declares_the_security_schemes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "End-user identity token (IAM access token).",
    }
    assert schemes["APIKeyCookie"]["in"] == "cookie"
    assert schemes["APIKeyCookie"]["name"] == "identity"
    security = schema["paths"]["/whoami/{rid}"]["get"]["security"]
    assert {"HTTPBearer": []} in security and {"APIKeyCookie": []} in security
    # Only the path parameter is a real parameter: the schemes add none.
    params = schema["paths"]["/whoami/{rid}"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["rid"]


@pytest.mark.parametrize(("headers", "status", "challenge"), STRICT_REJECTIONS)
def test_strict_mode(
    headers: dict[str, str], status: int, challenge: str | None, oracle_server: OracleTestServer
) -> None:
    with TestClient(
        make_app(oracle_server, EndUserIdentity(strict=True, client_local_users=True))
    ) as client:
        r = rid()
        response = client.get(f"/sync-whoami/{r}", headers=headers)
        assert response.status_code == status
        assert response.headers.get("www-authenticate") == challenge
        assert response.json()["detail"]["error"] in ("bad_request", "invalid_token")
        with pytest.raises(WebSocketDisconnect) as closed:  # WebSocketException -> close
            client.websocket_connect(f"/ws/{r}", headers=headers).__enter__()
        assert closed.value.code == 1008
        assert client.get(f"/whoami/{r}", headers={"Authorization": f"Bearer {CAROL}"}).json()[
            "db"
        ] == ["carol", "carol"]
    assert contexts_of(oracle_server, r) == ["carol", "carol"]


def test_deny_policy(oracle_server: OracleTestServer) -> None:
    with TestClient(
        make_app(oracle_server, EndUserIdentity(no_identity="deny", client_local_users=True))
    ) as client:
        r = rid()
        response = client.get(f"/whoami/{r}")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert contexts_of(oracle_server, r) == []


def test_token_failure_is_503_without_secrets(
    client: TestClient, oracle_server: OracleTestServer, caplog: Any
) -> None:
    r = rid()
    spi_static.FAIL.append(RuntimeError(SECRET))
    try:
        responses = [
            client.get(f"/{ep}/{r}", headers={"Cookie": f'identity=["nobody-{r}", null]'})
            for ep in ("whoami", "sync-whoami")
        ]
    finally:
        spi_static.FAIL.clear()
    for response in responses:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["detail"]["error"] == "token_unavailable"
        assert_no_secret(response.text)
    assert_no_secret(caplog.text)
    assert contexts_of(oracle_server, r) == []


def test_reuses_the_middleware_context_only_under_the_same_rules(
    oracle_server: OracleTestServer,
) -> None:
    # Same settings as the middleware: its resolution is reused.
    app = make_app(oracle_server, LOCAL_USERS, middleware=True)
    with TestClient(app) as client:
        r = rid()
        assert client.get(f"/whoami/{r}").json() == {"db": [None, None], "has_user": False}
        response = client.get(f"/sync-whoami/{r}", headers={"Cookie": f"identity={ALICE}"})
        assert response.json() == {"db": ["alice", "alice"], "has_user": True}
    assert contexts_of(oracle_server, r) == [None, None, "alice", "alice"]
    # A stricter dependency behind a lenient middleware keeps its own rules:
    # it denies the anonymous request the middleware let through.
    strict = EndUserIdentity(no_identity="deny", client_local_users=True)
    with TestClient(make_app(oracle_server, strict, middleware=True)) as client:
        r = rid()
        denied = client.get(f"/whoami/{r}")
        assert denied.status_code == 401
        allowed = client.get(f"/whoami/{r}", headers={"Cookie": f"identity={ALICE}"})
        assert allowed.json() == {"db": ["alice", "alice"], "has_user": True}
    assert contexts_of(oracle_server, r) == ["alice", "alice"]


def test_dependency_resets_the_context() -> None:
    app = FastAPI()
    User = Annotated[EndUserContext | None, Depends(LOCAL_USERS)]

    @app.get("/")
    async def root(user: User) -> dict[str, Any]:
        return {"name": user.name if user else None}

    async def run() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            names = []
            for headers in ({"Cookie": 'identity=["bob", null]'}, {}):
                names.append((await http.get("/", headers=headers)).json()["name"])
                assert current_end_user() is None
            return names

    assert asyncio.run(run()) == ["bob", None]


def test_openapi_schemes_are_declared_without_a_request_and_only_where_used() -> None:
    # The schemes are added to the document, not solved per request: the
    # dependency is no security dependency and has no sub-dependency, yet
    # both schemes show up for the routes that use it -- also through routers
    # (theirs or include_router's dependencies, nested), a sub-dependency or
    # a parameter -- and only there.
    from fastapi import APIRouter
    from fastapi.security.base import SecurityBase

    app = FastAPI()
    router = APIRouter()
    guarded_router = APIRouter(dependencies=[Depends(end_user_identity)])
    included_with = APIRouter()
    outer, inner = APIRouter(), APIRouter(dependencies=[Depends(EndUserIdentity(cookie_name=None))])

    @router.get("/routed")
    async def routed(user: EndUser) -> dict[str, str]:
        return {}

    @guarded_router.get("/by-router")
    async def by_router() -> dict[str, str]:
        return {}

    @included_with.post("/by-include")
    async def by_include() -> dict[str, str]:
        return {}

    @inner.get("/deep")
    async def deep() -> dict[str, str]:
        return {}

    async def sub(user: EndUser) -> EndUserContext | None:
        return user

    @app.get("/sub")
    async def through_sub(user: Annotated[EndUserContext | None, Depends(sub)]) -> dict[str, str]:
        return {}

    @app.get("/open")
    async def open_route() -> dict[str, str]:
        return {}

    @app.get("/guarded", dependencies=[Depends(end_user_identity)])
    async def guarded() -> dict[str, str]:
        return {}

    @app.get("/hidden", dependencies=[Depends(end_user_identity)], include_in_schema=False)
    async def hidden() -> dict[str, str]:
        return {}

    app.include_router(router)
    app.include_router(guarded_router, prefix="/r")
    app.include_router(included_with, prefix="/i", dependencies=[Depends(end_user_identity)])
    outer.include_router(inner, prefix="/in")
    app.include_router(outer, prefix="/out")
    assert not isinstance(end_user_identity, SecurityBase)  # FastAPI would cost it per request
    assert end_user_identity.cookie_scheme is not None
    assert list(end_user_identity.__signature__.parameters) == ["connection"]
    schema = app.openapi()
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyCookie"}
    for path, method in [
        ("/guarded", "get"),
        ("/routed", "get"),
        ("/sub", "get"),
        ("/r/by-router", "get"),
        ("/i/by-include", "post"),
    ]:
        assert schema["paths"][path][method]["security"] == BOTH_SCHEMES, path
    assert schema["paths"]["/out/in/deep"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/open"]["get"]
    assert "/hidden" not in schema["paths"]
    assert app.openapi() is schema  # built once, not extended twice
    assert schema["paths"]["/guarded"]["get"]["security"].count({"APIKeyCookie": []}) == 1


def test_openapi_schemes_in_a_document_the_app_builds_itself() -> None:
    # An app with its own openapi function adds the schemes with one call; a
    # definition of the same name the document already has is kept.
    from fastapi.openapi.utils import get_openapi
    from fastapi.security import HTTPBearer

    app = FastAPI()
    theirs = HTTPBearer(description="the app's own")

    @app.get("/mine", dependencies=[Depends(theirs)])
    async def mine() -> dict[str, str]:
        return {}

    @app.get("/guarded", dependencies=[Depends(end_user_identity)])
    async def guarded() -> dict[str, str]:
        return {}

    def custom_openapi() -> dict[str, Any]:
        return add_security_schemes(
            get_openapi(title="t", version="1", routes=app.routes), app.routes
        )

    app.openapi = custom_openapi  # type: ignore[method-assign]
    schema = app.openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["description"] == "the app's own"
    assert schemes["APIKeyCookie"]["in"] == "cookie"
    assert schema["paths"]["/guarded"]["get"]["security"] == BOTH_SCHEMES
    assert schema["paths"]["/mine"]["get"]["security"] == [{"HTTPBearer": []}]
    # Idempotent, and a document without paths is returned as it is.
    assert add_security_schemes(schema, app.routes) == app.openapi()
    assert add_security_schemes({"openapi": "3.1.0"}, app.routes) == {"openapi": "3.1.0"}


def test_openapi_scheme_names_never_name_another_cookie() -> None:
    # FastAPI names every cookie scheme "APIKeyCookie": deepsec reuses a
    # definition only when it asks for the same cookie, else adds its own under
    # a free name, so no operation documents another cookie than it reads.
    from fastapi.security import APIKeyCookie

    app = FastAPI()
    session = APIKeyCookie(name="session")
    other = EndUserIdentity(bearer=False, cookie_name="sess")

    @app.get("/mine", dependencies=[Depends(session)])
    async def mine() -> dict[str, str]:
        return {}

    @app.get("/default", dependencies=[Depends(end_user_identity)])
    async def default() -> dict[str, str]:
        return {}

    @app.get("/other", dependencies=[Depends(other)])
    async def by_other() -> dict[str, str]:
        return {}

    @app.get("/same", dependencies=[Depends(EndUserIdentity(cookie_name="sess", bearer=False))])
    async def same() -> dict[str, str]:
        return {}

    schema = app.openapi()
    schemes = schema["components"]["securitySchemes"]
    security = {path: schema["paths"][path]["get"]["security"] for path in schema["paths"]}
    assert security["/mine"] == [{"APIKeyCookie": []}]
    assert schemes["APIKeyCookie"]["name"] == "session"
    for path, cookie in (("/default", "identity"), ("/other", "sess"), ("/same", "sess")):
        names = [name for requirement in security[path] for name in requirement]
        cookie_schemes = [n for n in names if schemes[n]["type"] == "apiKey"]
        assert [schemes[n]["name"] for n in cookie_schemes] == [cookie], path
    assert security["/other"] == security["/same"]  # the same cookie: one definition
    assert len(schemes) == 4  # session, identity, sess, the bearer


def test_openapi_schemes_for_webhooks_and_callbacks_and_once_per_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi import APIRouter

    import deepsec.fastapi as deepsec_fastapi

    app = FastAPI()
    callbacks = APIRouter()

    @callbacks.post("/notify", dependencies=[Depends(end_user_identity)])
    async def notify() -> None:
        pass

    @app.webhooks.post("/hook", dependencies=[Depends(end_user_identity)])
    async def hook() -> None:
        pass

    @app.get("/subscribe", callbacks=callbacks.routes)
    async def subscribe() -> dict[str, str]:
        return {}

    walks = []
    walk = deepsec_fastapi._find_operations
    monkeypatch.setattr(deepsec_fastapi, "_find_operations", lambda *a: walks.append(1) or walk(*a))
    schema = app.openapi()
    assert schema["webhooks"]["/hook"]["post"]["security"] == BOTH_SCHEMES
    callback = schema["paths"]["/subscribe"]["get"]["callbacks"]["notify"]["/notify"]["post"]
    assert callback["security"] == BOTH_SCHEMES
    assert "security" not in schema["paths"]["/subscribe"]["get"]
    walked = len(walks)
    assert app.openapi() is schema and len(walks) == walked  # the cached document: no walk


def test_openapi_documents_of_any_shape_never_fail() -> None:
    # /openapi.json must never become an error page because of deepsec: a
    # callback router that includes another router (FastAPI documents only
    # its APIRoutes), an app class that cannot be hashed, and parts of the
    # document that are not what FastAPI writes are all left as they are.
    from fastapi import APIRouter
    from fastapi.testclient import TestClient as Client

    callbacks, leaf = APIRouter(), APIRouter()

    @leaf.post("/leaf", dependencies=[Depends(end_user_identity)])
    async def leaf_callback() -> None:
        pass

    @callbacks.post("/notify", dependencies=[Depends(end_user_identity)])
    async def notify() -> None:
        pass

    callbacks.include_router(leaf)

    class Unhashable(FastAPI):
        def __eq__(self, other: object) -> bool:  # without __hash__: cannot be hashed
            return self is other

    app = Unhashable()

    @app.get("/subscribe", callbacks=callbacks.routes, dependencies=[Depends(end_user_identity)])
    async def subscribe() -> dict[str, str]:
        return {}

    @app.get("/odd", dependencies=[Depends(end_user_identity)], openapi_extra={"security": "x"})
    async def odd() -> dict[str, str]:
        return {}

    response = Client(app).get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["paths"]["/subscribe"]["get"]["security"] == BOTH_SCHEMES
    notified = schema["paths"]["/subscribe"]["get"]["callbacks"]["notify"]["/notify"]["post"]
    assert notified["security"] == BOTH_SCHEMES
    assert schema["paths"]["/odd"]["get"]["security"] == "x"
    for odd_document in (
        {"paths": {"/subscribe": {"get": {}}}, "components": None},
        {"paths": {"/subscribe": {"get": {}}}, "components": {"securitySchemes": []}},
    ):
        assert add_security_schemes(odd_document, app.routes) == odd_document


def test_settings() -> None:
    with pytest.raises(ConfigError, match="colour"):
        EndUserIdentity(colour="red")
    custom = EndUserIdentity(cookie_name=None, bearer=True)
    assert custom.cookie_scheme is None and custom.bearer_scheme is not None
    resolved = EndUserIdentity(resolver=lambda conn: None)
    assert resolved.cookie_scheme is None and resolved.bearer_scheme is None
    hidden = EndUserIdentity(openapi=False)
    assert hidden.cookie_scheme is None and hidden.bearer_scheme is None
    assert list(hidden.__signature__.parameters) == ["connection"]
    assert "strict=False" in repr(end_user_identity)


@pytest.mark.timeout(90)
def test_no_leak_under_load_through_uvicorn(oracle_server: OracleTestServer) -> None:
    """2,000 requests, 20 users, 16 clients; async and def endpoints; pools shared with a
    thread that runs statements outside any request."""
    app = make_app(oracle_server, background=True)
    plan = load_plan(2000, seed=23)
    since = oracle_server.mark()
    with uvicorn_server(app) as url:
        run_load(url, plan, path=lambda r: f"/{'sync-' if int(r) % 2 else ''}whoami/{r}")
        with httpx.Client(base_url=url, timeout=10) as http:
            r = rid()
            streamed = http.get(f"/stream/{r}", headers={"Cookie": 'identity=["bob", null]'})
            assert streamed.text == "0:bob\n1:bob\n2:bob\n"
    report = check_leaks(
        oracle_server,
        since,
        {r: u for r, u, _ in plan} | {r: "bob"},
        statements_per_request=2,
        counts={r: 3},
    )
    assert report.requests == 2001
    assert report.outside > 10
    assert_ran_as(oracle_server, r, "bob", 3)


@pytest.mark.parametrize("middleware", [False, True])
def test_raw_header_fields_through_uvicorn(
    oracle_server: OracleTestServer, middleware: bool
) -> None:
    """Repeated fields, nested JSON, surrogates, UTF-8: the same end user as every adapter."""
    with uvicorn_server(make_app(oracle_server, middleware=middleware)) as url:
        answers = raw_case_answers(url, lambda r: f"/whoami/{r}", lambda body: body["db"][0])
    assert answers == RAW_EXPECTED


def _assert_answers_endpoint_errors(base_url: str, oracle_server: OracleTestServer) -> None:
    """ORA-52601 and TokenNotReadyError raised *in the endpoint*: 401 / 503, never 500."""
    r = rid()
    with httpx.Client(base_url=base_url, timeout=20) as http:
        assert_token_rejected_is_401(http, oracle_server, [f"/whoami/{r}", f"/sync-whoami/{r}"])
    with httpx.Client(base_url=base_url, timeout=20) as http:
        not_ready = http.get(f"/not-ready/{r}", headers={"Authorization": f"Bearer {ALICE}"})
    assert not_ready.status_code == 503, not_ready.text
    assert int(not_ready.headers["retry-after"]) >= 1
    assert "token_unavailable" in not_ready.text


def test_dependency_answers_errors_raised_in_the_endpoint(
    oracle_server: OracleTestServer,
) -> None:
    """The README's FastAPI path (the dependency alone), under uvicorn."""
    with uvicorn_server(make_app(oracle_server)) as url:
        _assert_answers_endpoint_errors(url, oracle_server)


def test_middleware_wrapping_the_app_from_outside_answers_endpoint_errors(
    oracle_server: OracleTestServer,
) -> None:
    """``EndUserSecMiddleware(app)``: FastAPI's error middleware answers 500 first."""
    app = EndUserSecMiddleware(make_app(oracle_server), client_local_users=True)
    with uvicorn_server(app) as url:
        _assert_answers_endpoint_errors(url, oracle_server)
        # Errors that are not ours still get the framework's 500.
        with httpx.Client(base_url=url, timeout=20) as http:
            assert http.get("/boom").status_code == 500


def test_work_spawned_by_the_request_loses_the_identity_when_it_ends(
    oracle_server: OracleTestServer,
) -> None:
    """The dependency has no exit code: the request's exit stack still ends the lease."""
    r = rid()
    with uvicorn_server(make_app(oracle_server)) as url, httpx.Client(base_url=url) as http:
        during = http.get(f"/spawn/{r}", headers={"Authorization": f"Bearer {ALICE}"})
        assert during.json() == {"during": "alice"}
        assert http.get("/spawned").json() == {"after": [None, None]}
    assert contexts_of(oracle_server, r) == ["alice", None, None]


def _handler_app() -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI(dependencies=[Depends(end_user_identity)])

    @app.exception_handler(oracledb.Error)
    async def oracle_error(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the app's oracledb.Error page", 418)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("the app's ValueError page", 422)

    @app.get("/db")
    async def db() -> None:
        raise oracledb.DatabaseError("ORA-00942: table or view does not exist")

    @app.get("/config")
    async def config() -> None:
        raise ConfigError(["bad"], where="the app")  # a DeepSecError and a ValueError

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> Any:
            yield b"first chunk"
            raise oracledb.DatabaseError("ORA-03113: end-of-file on communication channel")

        return StreamingResponse(body())

    return app


def test_the_apps_own_exception_handlers_along_the_mro_win() -> None:
    """The dependency never shadows an app handler for a base class of the error."""
    with TestClient(_handler_app(), raise_server_exceptions=False) as client:
        for _ in range(2):  # also after the dependency served a request
            db = client.get("/db")
            assert (db.status_code, db.text) == (418, "the app's oracledb.Error page")
            config = client.get("/config")
            assert (config.status_code, config.text) == (422, "the app's ValueError page")


def test_a_database_error_in_a_streaming_body_passes_unchanged() -> None:
    """Not Starlette's "Caught handled exception, but response already started"."""
    app = _handler_app()
    app.exception_handlers.pop(oracledb.Error)  # no app handler: nothing handles it
    with TestClient(app) as client, pytest.raises(oracledb.DatabaseError, match="ORA-03113"):
        client.get("/stream")


@pytest.mark.parametrize("direct_push", [True, False])
def test_the_lease_ends_and_answers_only_endpoint_errors(
    monkeypatch: pytest.MonkeyPatch, direct_push: bool
) -> None:
    """The lease's exit callback, on both of FastAPI's stacks: appended directly
    where this contextlib allows it (checked at import), else pushed.

    Either way the identity ends after the response, a deepsec error raised
    in the endpoint is answered, and one raised while the response is sent
    (a streaming body, a background task) passes unchanged: answering it
    would make Starlette raise "response already started" instead.
    """
    from fastapi import BackgroundTasks

    import deepsec.fastapi as deepsec_fastapi
    from deepsec import TokenNotReadyError
    from deepsec.context import _current

    if direct_push:
        assert deepsec_fastapi._DIRECT_PUSH  # this Python's contextlib allows it
    monkeypatch.setattr(deepsec_fastapi, "_DIRECT_PUSH", direct_push)
    leases: list[Any] = []
    app = FastAPI(dependencies=[Depends(end_user_identity)])

    @app.get("/ok")
    async def ok(user: EndUser) -> dict[str, Any]:
        leases.append(_current.get())
        return {"user": user is not None}

    def not_ready() -> None:
        raise TokenNotReadyError("no token yet")

    @app.get("/not-ready")
    async def endpoint_not_ready() -> None:
        not_ready()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> Any:
            yield b"first chunk"
            not_ready()

        return StreamingResponse(body())

    @app.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(not_ready)
        return {"status": "sent"}

    headers = {"Authorization": f"Bearer {ALICE}"}
    with TestClient(app) as client:
        for _ in range(2):  # resolved in full, then the hot path
            assert client.get("/ok", headers=headers).json() == {"user": True}
        answered = client.get("/not-ready", headers=headers)
        for path in ("/stream", "/background"):
            with pytest.raises(TokenNotReadyError):
                client.get(path, headers=headers)
    assert answered.status_code == 503 and "token_unavailable" in answered.text
    assert len(leases) == 2 and all(not lease.active for lease in leases)
    assert leases[0].context is leases[1].context  # one remembered context


def test_the_dependency_reuses_the_requests_lease_under_the_same_rules() -> None:
    """Behind the middleware, or declared twice: the request's activation is reused."""
    from deepsec.context import _current

    first, twin = EndUserIdentity(), EndUserIdentity()  # equal settings, other objects
    behind = EndUserIdentity()
    strict = EndUserIdentity(no_identity="deny")

    def app_with(*dependencies: Any, middleware: bool = False) -> FastAPI:
        app = FastAPI(dependencies=[Depends(d) for d in dependencies])
        if middleware:
            app.add_middleware(EndUserSecMiddleware)

        @app.get("/")
        async def root() -> dict[str, Any]:
            return {"lease": type(_current.get()).__name__}

        return app

    headers = {"Authorization": f"Bearer {ALICE}"}
    cases = [
        (app_with(behind, middleware=True), "_Exchange"),
        (app_with(first, twin), "_DependencyLease"),
        (app_with(strict, middleware=True), "_DependencyLease"),  # its own, stricter rules
    ]
    for app, lease in cases:
        with TestClient(app) as client:
            for _ in range(2):
                assert client.get("/", headers=headers).json() == {"lease": lease}
    # Those that reused the request's resolution never resolved anything.
    assert behind.settings._resolved == twin.settings._resolved == {}
    assert behind.settings._by_raw == twin.settings._by_raw == {}
    assert first.settings._resolved and strict.settings._resolved
    # The stricter dependency denies what the middleware let through.
    with TestClient(cases[2][0]) as client:
        assert client.get("/").status_code == 401


def test_a_request_the_endpoint_makes_to_the_app_in_process_is_resolved_from_its_own_headers() -> (
    None
):
    """The outer request's lease is current while its endpoint calls the app in process.

    The inner request (httpx.ASGITransport, a batch or fan-out handler) must
    not reuse it: it runs as the user its own headers name, or as nobody.
    """
    app = FastAPI(dependencies=[Depends(end_user_identity)])

    @app.get("/whoami")
    async def whoami(user: EndUser) -> dict[str, Any]:
        return {"user": None if user is None else user.identity}

    @app.get("/outer")
    async def outer(user: EndUser) -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as c:
            as_bob = await c.get("/whoami", headers={"Authorization": f"Bearer {BOB}"})
            as_nobody = await c.get("/whoami")
        assert user is not None
        return {
            "outer": user.identity,
            "inner": [as_bob.json()["user"], as_nobody.json()["user"]],
            "after": None if current_end_user() is None else current_end_user().identity,
        }

    with TestClient(app) as client:
        got = client.get("/outer", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert got == {"outer": ALICE, "inner": [BOB, None], "after": ALICE}


def test_an_error_from_a_function_scoped_dependency_teardown_is_answered() -> None:
    """A ``yield`` dependency with ``scope="function"`` tears down before the response:
    its deepsec error gets the same 503 as one raised in the endpoint, not a 500."""
    from deepsec import TokenNotReadyError

    async def audit(user: EndUser) -> AsyncIterator[None]:
        yield
        raise TokenNotReadyError("no token for the audit statement")

    app = FastAPI()

    @app.get("/t")
    async def endpoint(_: Annotated[None, Depends(audit, scope="function")]) -> dict[str, Any]:
        return {}

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/t", headers={"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 503, response.text
