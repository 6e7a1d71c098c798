"""What every HR example app's tests check, whatever the framework.

An app's test module subclasses :class:`HRAppContract` (all three apps) or
:class:`PlainFormSignInContract` (the apps whose forms carry no CSRF token) and
adds its framework's own tests.  The fixtures ``client`` (an ``httpx.Client``
on the served app) and ``hr_env`` (the :class:`deepsec.demo.DemoEnvironment`)
come from ``example_projects/conftest.py`` and the app's ``tests/conftest.py``.
"""

from __future__ import annotations

import re
from typing import Any

from deepsec.demo import EMPLOYEES, visible_employees


def db_user_on_page(html: str) -> str | None:
    """The end user the page says the database saw (``None``: no end user)."""
    found = re.search(r'data-db-user="([^"]*)"', html)
    assert found, "page does not show the database user"
    return found.group(1) or None


def rows_on_page(html: str) -> list[str]:
    """The employee names in the page's table, in order."""
    return re.findall(r"<tr><td>([^<]*)</td>", html)


def contexts_since(env: Any, mark: Any) -> list[Any]:
    """The end-user context of every statement the wire server ran since ``mark``."""
    return [t.context for t in env.oracle.statements(since=mark)]


def assert_page_runs_as(client: Any, hr_env: Any, user: str) -> None:
    """The page, and every statement behind it, run as ``user`` with the app's token."""
    mark = hr_env.oracle.mark()
    page = client.get("/")
    assert page.status_code == 200
    assert db_user_on_page(page.text) == f"{user}@example.test"
    # The wire server's emulated row policy: alice and bob see their own row only.
    assert rows_on_page(page.text) == visible_employees(f"{user}@example.test")
    contexts = contexts_since(hr_env, mark)
    assert contexts and all(
        c is not None and c.username == f"{user}@example.test" for c in contexts
    )
    assert all(c.data_roles == ("hr_viewer",) for c in contexts)
    assert all(c.attributes.get("channel") in ("web", ["web"]) for c in contexts)
    # The database-access token is the app's own, from MSAL client credentials.
    assert all(c.database_access_claims["sub"] == hr_env.client_id for c in contexts)


def assert_page_runs_as_nobody(client: Any, hr_env: Any) -> None:
    """The page shows no end user and no statement behind it carried one."""
    mark = hr_env.oracle.mark()
    page = client.get("/").text
    assert db_user_on_page(page) is None
    assert rows_on_page(page) == []  # no end user: the policy returns no rows
    assert "The database returned no rows." in page
    assert all(c is None for c in contexts_since(hr_env, mark))


class HRAppContract:
    """The JSON API and the identity rules, the same in every app."""

    def test_bearer_api_runs_as_the_token_user(self, client, hr_env):
        mark = hr_env.oracle.mark()
        token = hr_env.user_token("bob")
        body = client.get("/api/employees", headers={"Authorization": f"Bearer {token}"}).json()
        assert body["db_user"] == "bob@example.test"
        assert [e["name"] for e in body["employees"]] == ["bob"]
        contexts = contexts_since(hr_env, mark)
        assert contexts and all(c.username == "bob@example.test" for c in contexts)
        assert all(c.attributes.get("channel") in ("api", ["api"]) for c in contexts)

    def test_each_end_user_sees_the_rows_the_row_policy_grants(self, client, hr_env):
        seen = {}
        for user in ("alice", "bob", "carol"):
            token = hr_env.user_token(user)
            body = client.get("/api/employees", headers={"Authorization": f"Bearer {token}"})
            seen[user] = [e["name"] for e in body.json()["employees"]]
        seen["nobody"] = [e["name"] for e in client.get("/api/employees").json()["employees"]]
        assert seen == {
            "alice": ["alice"],  # an employee: their own row
            "bob": ["bob"],
            "carol": [row[0] for row in EMPLOYEES],  # granted the hr_viewer data role
            "nobody": [],  # no end user: no rows
        }
        # Carol's request is what the policy needed: her name and the requested role.
        mark = hr_env.oracle.mark()
        token = hr_env.user_token("carol")
        client.get("/api/employees", headers={"Authorization": f"Bearer {token}"})
        trips = [t for t in hr_env.oracle.round_trips(since=mark) if "employees" in (t.sql or "")]
        assert sum(t.rows for t in trips) == len(EMPLOYEES)  # execute and fetch round trips
        assert all(t.context.username == "carol@example.test" for t in trips)
        assert all(t.context.data_roles == ("hr_viewer",) for t in trips)

    def test_no_identity_is_least_privilege(self, client, hr_env):
        mark = hr_env.oracle.mark()
        assert client.get("/api/whoami").json() == {"db_user": None}
        assert all(c is None for c in contexts_since(hr_env, mark))

    def test_malformed_cookie_is_no_identity_not_a_500(self, client, hr_env):
        response = client.get("/api/whoami", headers={"Cookie": 'identity=["bad'})
        assert response.status_code == 200
        assert response.json() == {"db_user": None}


class PlainFormSignInContract(HRAppContract):
    """Sign-in and sign-out through the shared Jinja2 forms (no CSRF token)."""

    def test_sign_in_sets_a_safe_cookie_and_the_database_sees_alice(self, client, hr_env):
        response = client.post("/signin", data={"user": "alice"}, follow_redirects=False)
        assert response.status_code == 303
        set_cookie = response.headers["set-cookie"]
        assert set_cookie.startswith("identity=")
        assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie.replace("Lax", "lax")
        assert "Secure" not in set_cookie  # plain http in this test
        assert_page_runs_as(client, hr_env, "alice")

    def test_sign_out_deletes_the_cookie(self, client, hr_env):
        client.post("/signin", data={"user": "bob"})
        assert db_user_on_page(client.get("/").text) == "bob@example.test"
        response = client.post("/signout", follow_redirects=False)
        assert response.status_code == 303
        assert (
            'identity=""' in response.headers["set-cookie"]
            or "Max-Age=0" in (response.headers["set-cookie"])
        )
        assert "identity" not in client.cookies  # the client dropped the expired cookie
        assert_page_runs_as_nobody(client, hr_env)

    def test_unknown_user_cannot_sign_in(self, client):
        assert client.post("/signin", data={"user": "mallory"}).status_code == 400
