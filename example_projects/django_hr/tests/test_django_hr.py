"""django_hr end to end: HTTP -> waitress -> Django -> persistent connection -> wire server."""

from __future__ import annotations

import re

import pytest
from hr_common.testing import (
    HRAppContract,
    assert_page_runs_as,
    assert_page_runs_as_nobody,
    db_user_on_page,
)

pytestmark = pytest.mark.timeout(60)


class TestDjangoHRApi(HRAppContract):
    """The JSON API and identity checks every app passes (``hr_common.testing``)."""


def post_form(client, page, path, data):
    """POST a form the way a browser does: with the page's CSRF token."""
    html = client.get(page).text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    return client.post(path, data={**data, "csrfmiddlewaretoken": token})


def test_sign_in_sets_a_safe_cookie_and_the_database_sees_alice(client, hr_env):
    response = post_form(client, "/signin", "/signin", {"user": "alice"})
    assert response.status_code == 303
    set_cookie = response.headers["set-cookie"]
    assert "identity=" in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert_page_runs_as(client, hr_env, "alice")


def test_post_without_csrf_token_is_refused(client):
    assert client.post("/signin", data={"user": "alice"}).status_code == 403


def test_sign_out_deletes_the_cookie(client, hr_env):
    post_form(client, "/signin", "/signin", {"user": "bob"})
    assert db_user_on_page(client.get("/").text) == "bob@example.test"
    response = post_form(client, "/", "/signout", {})
    assert response.status_code == 303
    assert "identity" not in client.cookies
    assert_page_runs_as_nobody(client, hr_env)


def test_persistent_connection_follows_each_request(client, hr_env):
    """CONN_MAX_AGE=60: the same connections serve alice, then nobody, then bob."""
    seen = []
    for user in ("alice", None, "bob", None):
        headers = {"Authorization": f"Bearer {hr_env.user_token(user)}"} if user else {}
        seen.append(client.get("/api/whoami", headers=headers).json()["db_user"])
    assert seen == ["alice@example.test", None, "bob@example.test", None]


def test_system_checks_pass(hr_env):
    from django.core.management import call_command

    call_command("check", "--fail-level", "WARNING")
