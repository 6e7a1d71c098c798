"""fastapi_hr end to end: HTTP -> uvicorn -> FastAPI -> async pool -> TCPS wire server."""

from __future__ import annotations

import re

import pytest

from deepsec.demo import EMPLOYEES

pytestmark = pytest.mark.timeout(60)


def db_user_on_page(html: str) -> str | None:
    found = re.search(r'data-db-user="([^"]*)"', html)
    assert found, "page does not show the database user"
    return found.group(1) or None


def contexts_since(env, mark):
    return [t.context for t in env.oracle.statements(since=mark)]


def test_sign_in_sets_a_safe_cookie_and_the_database_sees_alice(client, hr_env):
    response = client.post("/signin", data={"user": "alice"}, follow_redirects=False)
    assert response.status_code == 303
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith("identity=")
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie.replace("Lax", "lax")
    assert "Secure" not in set_cookie  # plain http in this test
    mark = hr_env.oracle.mark()
    page = client.get("/")
    assert page.status_code == 200
    assert db_user_on_page(page.text) == "alice@example.test"
    for name, *_ in EMPLOYEES:
        assert f"<td>{name}</td>" in page.text
    contexts = contexts_since(hr_env, mark)
    assert contexts and all(c is not None and c.username == "alice@example.test" for c in contexts)
    assert all(c.data_roles == ("hr_viewer",) for c in contexts)
    assert all(c.attributes.get("channel") in ("web", ["web"]) for c in contexts)
    # The database-access token is the app's own, from MSAL client credentials.
    assert all(c.database_access_claims["sub"] == hr_env.client_id for c in contexts)


def test_sign_out_deletes_the_cookie(client, hr_env):
    client.post("/signin", data={"user": "bob"})
    assert db_user_on_page(client.get("/").text) == "bob@example.test"
    response = client.post("/signout", follow_redirects=False)
    assert response.status_code == 303
    assert (
        'identity=""' in response.headers["set-cookie"]
        or "Max-Age=0" in (response.headers["set-cookie"])
    )
    assert "identity" not in client.cookies  # the client dropped the expired cookie
    mark = hr_env.oracle.mark()
    assert db_user_on_page(client.get("/").text) is None
    assert all(c is None for c in contexts_since(hr_env, mark))


def test_bearer_api_runs_as_the_token_user(client, hr_env):
    mark = hr_env.oracle.mark()
    token = hr_env.user_token("bob")
    body = client.get("/api/employees", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["db_user"] == "bob@example.test"
    assert [e["name"] for e in body["employees"]] == [row[0] for row in EMPLOYEES]
    contexts = contexts_since(hr_env, mark)
    assert contexts and all(c.username == "bob@example.test" for c in contexts)
    assert all(c.attributes.get("channel") in ("api", ["api"]) for c in contexts)


def test_no_identity_is_least_privilege(client, hr_env):
    mark = hr_env.oracle.mark()
    assert client.get("/api/whoami").json() == {"db_user": None}
    assert all(c is None for c in contexts_since(hr_env, mark))


def test_malformed_cookie_is_no_identity_not_a_500(client, hr_env):
    response = client.get("/api/whoami", headers={"Cookie": 'identity=["bad'})
    assert response.status_code == 200
    assert response.json() == {"db_user": None}


def test_unknown_user_cannot_sign_in(client):
    assert client.post("/signin", data={"user": "mallory"}).status_code == 400
