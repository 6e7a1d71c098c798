"""Adapters with ``auth_flow="on_behalf_of"``: the identity must be a bearer token.

Real MSAL against the local identity provider, real thin driver to the wire
test server.  A ``(name, key)`` identity cannot be exchanged on behalf of the
user, and an expired user token is refused by the provider: both are the
client's to fix, so both answer 401 ``invalid_token`` — never a 500 or 503.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import oracledb
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

with warnings.catch_warnings():  # Starlette 1.x prefers httpx2 for its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from deepsec.asgi import EndUserSecMiddleware
from deepsec.flask import DeepSec
from deepsec.testing.idp import LocalIdP
from deepsec.testing.oracle import OracleTestServer

WHOAMI = "select xs_sys_context('xs$session','username') from dual"
pytestmark = pytest.mark.timeout(60)


def _kwargs(server: OracleTestServer, idp: LocalIdP) -> dict[str, Any]:
    return {
        "user": "app_user",
        "password": "app_password",
        "dsn": server.dsn,
        "ssl_context": server.client_ssl_context(),
        "extra_auth_params": {"end_user_sec_params": idp.azure_params("on_behalf_of")},
    }


@pytest.fixture
def flask_client(oracle: OracleTestServer, idp: LocalIdP) -> Iterator[Any]:
    pool = oracledb.create_pool(min=0, max=2, **_kwargs(oracle, idp))
    app = Flask(__name__)
    DeepSec(app, client_local_users=True)  # to show a (name, key) user is refused

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        with pool.acquire() as conn, conn.cursor() as cur:
            cur.execute(WHOAMI)
            return {"db": cur.fetchone()[0]}

    yield app.test_client(use_cookies=False)
    pool.close(force=True)


@pytest.fixture
def asgi_client(oracle: OracleTestServer, idp: LocalIdP) -> Iterator[TestClient]:
    state: dict[str, Any] = {}

    async def whoami(request: Request) -> JSONResponse:
        async with state["pool"].acquire() as conn:
            cur = conn.cursor()
            await cur.execute(WHOAMI)
            return JSONResponse({"db": (await cur.fetchone())[0]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state["pool"] = oracledb.create_pool_async(min=0, max=2, **_kwargs(oracle, idp))
        yield
        # Close and drop it: deepsec prefetches tokens for every pool still alive.
        await state.pop("pool").close(force=True)

    # Inside Starlette's error middleware (the documented form), so a deepsec
    # error raised by a query still becomes deepsec's response, not a 500.
    app = Starlette(
        routes=[Route("/whoami", whoami)],
        lifespan=lifespan,
        middleware=[Middleware(EndUserSecMiddleware, client_local_users=True)],
    )
    with TestClient(app) as client:
        yield client


def _check_401(response: Any, body: dict[str, Any]) -> None:
    assert response.status_code == 401, body
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert body["error"] == "invalid_token"


def test_flask(flask_client: Any, idp: LocalIdP, oracle: OracleTestServer) -> None:
    alice = idp.issue_user_token("alice")
    ok = flask_client.get("/whoami", headers={"Authorization": f"Bearer {alice}"})
    assert ok.status_code == 200 and ok.json["db"] == "alice@example.test"
    mark = oracle.mark()
    local = flask_client.get("/whoami", headers={"Cookie": 'identity=["bob", null]'})
    _check_401(local, local.json)
    expired = idp.issue_user_token("carol", expires_in=-60)
    late = flask_client.get("/whoami", headers={"Authorization": f"Bearer {expired}"})
    _check_401(late, late.json)
    assert expired not in late.text
    assert oracle.statements(since=mark) == []  # failed closed: nothing ran as the app


def test_asgi(asgi_client: TestClient, idp: LocalIdP, oracle: OracleTestServer) -> None:
    alice = idp.issue_user_token("alice")
    ok = asgi_client.get("/whoami", headers={"Authorization": f"Bearer {alice}"})
    assert ok.status_code == 200 and ok.json()["db"] == "alice@example.test"
    mark = oracle.mark()
    local = asgi_client.get("/whoami", headers={"Cookie": 'identity=["bob", null]'})
    _check_401(local, local.json())
    expired = idp.issue_user_token("carol", expires_in=-60)
    late = asgi_client.get("/whoami", headers={"Authorization": f"Bearer {expired}"})
    _check_401(late, late.json())
    assert expired not in late.text
    assert oracle.statements(since=mark) == []
