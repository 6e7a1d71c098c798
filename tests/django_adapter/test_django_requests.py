"""Django requests end to end: middleware -> Django's Oracle backend -> wire server.

Each view tags its SQL with ``/* <tag> */``; the assertions read the end-user
context that the wire server decoded from each statement's round trip.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from django.http import HttpResponse
from django.test import Client, override_settings

import deepsec
import spi_static
from django_project.wire import tagged, user_token, usernames

pytestmark = pytest.mark.timeout(30)

ALIASES = ("default", "persistent", "pooled")


def get(path: str, **headers: str) -> Any:
    return Client().get(path, **headers)


def outside_statement(server: Any, alias: str, tag: str) -> set[str | None]:
    """Run a tagged statement in this thread outside any request; its contexts."""
    mark = server.mark()
    with connections[alias].cursor() as cursor:
        cursor.execute(f"select 1 /* {tag} */ from dual")
        cursor.fetchall()
    return usernames(server, tag, since=mark)


@pytest.mark.parametrize("alias", ALIASES)
def test_cookie_token(server: Any, alias: str) -> None:
    mark = server.mark()
    response = get(
        f"/whoami?db={alias}&tag=ck-{alias}", HTTP_COOKIE=f"identity={user_token('alice')}"
    )
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert usernames(server, f"ck-{alias}", since=mark, minimum=2) == {"alice"}
    trips = tagged(server, f"ck-{alias}", since=mark)
    assert all(t.context.kind == "token" for t in trips)
    # The database-access token came from the configured spi_type module.
    assert trips[0].context.database_access_claims["sub"] == "django-app"
    assert deepsec.current_end_user() is None


@pytest.mark.parametrize("alias", ALIASES)
def test_cookie_local_user_then_anonymous_on_same_connection(server: Any, alias: str) -> None:
    mark = server.mark()
    response = get(f"/whoami?db={alias}&tag=lo-{alias}", HTTP_COOKIE='identity=["bob", null]')
    assert response.status_code == 200
    assert response.json()["username"] == "bob"
    assert usernames(server, f"lo-{alias}", since=mark, minimum=2) == {"bob"}
    assert {t.context.kind for t in tagged(server, f"lo-{alias}", since=mark)} == {"local"}
    # The next request has no identity: it must not run as bob, whichever
    # connection (persistent or pooled) it gets.
    response = get(f"/whoami?db={alias}&tag=anon-{alias}")
    assert response.json() == {"username": None, "context": None}
    assert usernames(server, f"anon-{alias}", since=mark, minimum=2) == {None}
    # Work outside any request on this thread's connection carries nothing.
    assert outside_statement(server, alias, f"out-{alias}") == {None}
    connections[alias].close()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_header_any_case(server: Any, scheme: str) -> None:
    mark = server.mark()
    tag = f"br-{scheme}"
    response = get(f"/whoami?tag={tag}", HTTP_AUTHORIZATION=f"{scheme} {user_token('carol')}")
    assert response.status_code == 200
    assert response.json()["username"] == "carol"
    assert usernames(server, tag, since=mark, minimum=2) == {"carol"}


def test_cookie_wins_over_header(server: Any) -> None:
    mark = server.mark()
    response = get(
        "/whoami?tag=both",
        HTTP_COOKIE='identity=["dave", null]',
        HTTP_AUTHORIZATION=f"Bearer {user_token('erin')}",
    )
    assert response.json()["username"] == "dave"
    assert usernames(server, "both", since=mark, minimum=2) == {"dave"}


def test_no_identity_runs_without_context(server: Any) -> None:
    mark = server.mark()
    response = get("/whoami?tag=none", HTTP_AUTHORIZATION="Basic dXNlcjpwYXNz")
    assert response.status_code == 200
    assert response.json() == {"username": None, "context": None}
    assert usernames(server, "none", since=mark, minimum=2) == {None}


@pytest.mark.parametrize(
    "cookie", ["identity={not-json", 'identity=["a", 1]', "identity=[]", 'identity="a b"']
)
def test_malformed_cookie_is_no_identity(
    server: Any, cookie: str, caplog: pytest.LogCaptureFixture
) -> None:
    mark = server.mark()
    with caplog.at_level(logging.WARNING, logger="deepsec.web"):
        response = get("/whoami?tag=badck", HTTP_COOKIE=cookie)
    assert response.status_code == 200
    assert response.json()["username"] is None
    assert usernames(server, "badck", since=mark, minimum=2) == {None}
    assert any("malformed" in r.getMessage() for r in caplog.records)


def test_malformed_cookie_strict_is_400(server: Any) -> None:
    mark = server.mark()
    with override_settings(DEEPSEC={"STRICT": True, "client_local_users": True}):
        response = get("/whoami?tag=strict400", HTTP_COOKIE="identity={not-json")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert "not-json" not in response.content.decode()
    assert tagged(server, "strict400", since=mark) == []


def test_oversized_header(server: Any) -> None:
    huge = "Bearer " + "a" * 20000
    mark = server.mark()
    response = get("/whoami?tag=huge", HTTP_AUTHORIZATION=huge)
    assert response.status_code == 200
    assert usernames(server, "huge", since=mark, minimum=2) == {None}
    with override_settings(DEEPSEC={"strict": True, "client_local_users": True}):
        response = get("/whoami?tag=huge-strict", HTTP_AUTHORIZATION=huge)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error"] == "invalid_token"
    assert "aaaa" not in response.content.decode()
    assert tagged(server, "huge-strict", since=mark) == []


def test_no_identity_deny_is_401(server: Any) -> None:
    mark = server.mark()
    with override_settings(DEEPSEC={"no_identity": "deny", "client_local_users": True}):
        response = get("/whoami?tag=deny")
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Bearer"
        assert tagged(server, "deny", since=mark) == []
        ok = get("/whoami?tag=deny-ok", HTTP_COOKIE='identity=["frank", null]')
    assert ok.status_code == 200
    assert usernames(server, "deny-ok", since=mark, minimum=2) == {"frank"}


def test_token_failure_is_503_without_secrets(server: Any) -> None:
    spi_static.FAIL.append(RuntimeError("client_secret=hunter2 leaked"))
    mark = server.mark()
    token = user_token("grace-fails")
    response = get("/whoami?tag=fail", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    body = response.json()
    assert body["error"] == "token_unavailable"
    text = response.content.decode()
    assert "hunter2" not in text and token not in text
    assert spi_static.CALLS, "the token module was not called"
    # Fail closed: nothing ran as the application instead.
    assert tagged(server, "fail", since=mark) == []
    assert deepsec.current_end_user() is None


def test_resolver_data_roles_attributes_from_dotted_paths(server: Any) -> None:
    mark = server.mark()
    with override_settings(
        DEEPSEC={
            "data_roles": "django_project.views.data_roles",
            "attributes": "django_project.views.attributes",
        }
    ):
        response = get(
            "/whoami?tag=roles",
            HTTP_AUTHORIZATION=f"Bearer {user_token('heidi')}",
            HTTP_X_TENANT="acme",
        )
    assert response.status_code == 200
    trips = tagged(server, "roles", since=mark)
    assert trips and all(t.context.username == "heidi" for t in trips)
    assert {t.context.data_roles for t in trips} == {("hr_reader",)}
    assert all("tenant" in t.context.attributes for t in trips)


def test_django_user_resolver(server: Any) -> None:
    mark = server.mark()
    with override_settings(DEEPSEC={"resolver": "deepsec.django.resolvers.django_user"}):
        response = get(
            "/whoami?tag=djuser",
            HTTP_X_TEST_USER="ivan",
            # Ignored: a resolver replaces the cookie and the header.
            HTTP_COOKIE='identity=["mallory", null]',
        )
        anon = get("/whoami?tag=djanon", HTTP_COOKIE='identity=["mallory", null]')
    assert response.json()["username"] == "ivan"
    assert usernames(server, "djuser", since=mark, minimum=2) == {"ivan"}
    assert anon.json()["username"] is None
    assert usernames(server, "djanon", since=mark, minimum=2) == {None}


def test_view_exception_resets_context(server: Any) -> None:
    mark = server.mark()
    client = Client(raise_request_exception=False)
    response = client.get("/boom?db=persistent&tag=boom", HTTP_COOKIE='identity=["judy", null]')
    assert response.status_code == 500
    assert usernames(server, "boom", since=mark, minimum=2) == {"judy"}
    assert deepsec.current_end_user() is None
    assert outside_statement(server, "persistent", "after-boom") == {None}
    connections["persistent"].close()


# -- streaming -----------------------------------------------------------------


def test_streaming_body_runs_as_the_request_user(server: Any) -> None:
    mark = server.mark()
    response = get("/stream?db=persistent&tag=st&chunks=3", HTTP_COOKIE='identity=["kim", null]')
    assert response.status_code == 200
    # The view has returned and the middleware is done: nothing is current...
    assert deepsec.current_end_user() is None
    assert tagged(server, "st-0", since=mark) == []
    # ...yet each chunk's query runs as kim while the body is produced.
    body = b"".join(response.streaming_content).decode()
    response.close()
    assert body == "kim\nkim\nkim\n"
    for tag in ("st-0", "st-1", "st-2", "st-finally"):
        assert usernames(server, tag, since=mark, minimum=2) == {"kim"}
    assert deepsec.current_end_user() is None
    assert outside_statement(server, "persistent", "after-stream") == {None}
    connections["persistent"].close()


def test_streaming_body_closed_early_runs_finally_as_the_user(server: Any) -> None:
    mark = server.mark()
    response = get("/stream?db=persistent&tag=sc&chunks=5", HTTP_COOKIE='identity=["leo", null]')
    first = next(iter(response.streaming_content))
    assert first == b"leo\n"
    response.close()  # the client went away: the generator's finally runs now
    assert usernames(server, "sc-finally", since=mark, minimum=2) == {"leo"}
    assert tagged(server, "sc-1", since=mark) == []
    assert outside_statement(server, "persistent", "after-close") == {None}
    connections["persistent"].close()


def test_a_response_class_without_streaming_is_returned_as_it_is() -> None:
    """A view may return an HttpResponseBase of the app's own that lacks
    ``streaming``: the middleware reads the attribute directly (no getattr call
    per request) and must treat its absence as "not streaming", not raise."""
    from django.http import HttpResponseBase
    from django.test import RequestFactory

    from deepsec.django.middleware import EndUserSecMiddleware

    class Bare(HttpResponseBase):
        pass

    assert not hasattr(Bare(), "streaming")
    seen: list[Any] = []

    def view(request: Any) -> Bare:
        seen.append(deepsec.current_end_user())
        return bare

    async def aview(request: Any) -> Bare:
        return view(request)

    bare = Bare()
    request = RequestFactory().get("/", HTTP_COOKIE='identity=["una", null]')
    with override_settings(DEEPSEC={"client_local_users": True}):
        assert EndUserSecMiddleware(view)(request) is bare
        assert asyncio.run(EndUserSecMiddleware(aview)(request)) is bare
    assert [ctx.identity if ctx else None for ctx in seen] == [("una", None)] * 2
    assert deepsec.current_end_user() is None


def test_the_middleware_follows_the_settings_as_they_change() -> None:
    """The middleware reads conf's parsed settings without a call: what
    override_settings sets (and restores) still applies from the next request."""
    from django.test import RequestFactory

    from deepsec.django.conf import get_settings
    from deepsec.django.middleware import EndUserSecMiddleware

    seen: list[Any] = []

    def view(request: Any) -> Any:
        ctx = deepsec.current_end_user()
        seen.append(None if ctx is None else ctx.identity)
        return HttpResponse(b"ok")

    middleware = EndUserSecMiddleware(view)
    cookie = 'identity=["vic", null]'

    def call() -> None:
        middleware(RequestFactory().get("/", HTTP_COOKIE=cookie))

    with override_settings(DEEPSEC={"client_local_users": True}):
        call()
        assert get_settings().client_local_users  # (now cached)
        with override_settings(DEEPSEC={}):  # local users off: the cookie names nobody
            call()
        call()
    assert seen == [("vic", None), None, ("vic", None)]


# -- ASGI ----------------------------------------------------------------------


async def _asgi_requests(requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=ASGIHandler())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await asyncio.gather(*(client.get(url, headers=h) for url, h in requests))


@pytest.mark.parametrize("view", ["awhoami", "whoami"])
def test_asgi_concurrent_requests_are_isolated(server: Any, view: str) -> None:
    people = ["mia", "ned", None, "olga", "pete", None]
    requests = []
    for i, name in enumerate(people):
        headers = {} if name is None else {"cookie": f"identity={user_token(name)}"}
        requests.append((f"/{view}?tag={view}-{i}", headers))
    mark = server.mark()
    responses = asyncio.run(_asgi_requests(requests))
    for i, (name, response) in enumerate(zip(people, responses, strict=True)):
        assert response.status_code == 200, response.text
        assert response.json()["username"] == name
        assert usernames(server, f"{view}-{i}", since=mark, minimum=2) == {name}


def test_asgi_async_streaming(server: Any) -> None:
    mark = server.mark()
    (response,) = asyncio.run(
        _asgi_requests(
            [("/astream?tag=as&chunks=3", {"authorization": f"bearer {user_token('quinn')}"})]
        )
    )
    assert response.status_code == 200
    assert response.text == "quinn\nquinn\nquinn\n"
    for i in range(3):
        assert usernames(server, f"as-{i}", since=mark, minimum=2) == {"quinn"}


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
def test_asgi_sync_streaming_and_rejection(server: Any) -> None:
    mark = server.mark()
    with override_settings(DEEPSEC={"strict": True, "client_local_users": True}):
        ok, bad = asyncio.run(
            _asgi_requests(
                [
                    ("/stream?tag=ss&chunks=2", {"cookie": 'identity=["rita", null]'}),
                    ("/whoami?tag=ss-bad", {"cookie": "identity={oops"}),
                ]
            )
        )
    assert ok.text == "rita\nrita\n"
    for tag in ("ss-0", "ss-1", "ss-finally"):
        assert usernames(server, tag, since=mark, minimum=2) == {"rita"}
    assert bad.status_code == 400
    assert json.loads(bad.text)["error"] == "bad_request"
    assert tagged(server, "ss-bad", since=mark) == []


def test_asgi_django_user_resolver_and_token_failure(server: Any) -> None:
    mark = server.mark()
    spi_static.FAIL.append(RuntimeError("secret-value"))
    with override_settings(DEEPSEC={"resolver": "deepsec.django.resolvers.django_user"}):
        failed, ok = asyncio.run(
            _asgi_requests(
                [
                    ("/awhoami?tag=af", {"x-test-user": "sam-fails"}),
                    ("/awhoami?tag=aok", {}),
                ]
            )
        )
    assert failed.status_code == 503
    assert "secret-value" not in failed.text
    assert tagged(server, "af", since=mark) == []
    assert ok.json()["username"] is None
    assert usernames(server, "aok", since=mark, minimum=2) == {None}


def test_database_rejecting_the_end_user_token_is_401(server: Any) -> None:
    """ORA-52601 (expired or revoked user token) means: sign in again."""
    token = user_token("hank")
    server.token_validator = lambda kind, value: kind != "end_user_token"
    try:
        response = get("/whoami?tag=rejected", HTTP_AUTHORIZATION=f"Bearer {token}")
    finally:
        server.token_validator = None
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error"] == "invalid_token"
    assert token not in response.content.decode()


def test_raw_header_fields_through_waitress(server: Any) -> None:
    """Repeated fields, nested JSON, surrogates, UTF-8: the same end user as every adapter."""
    from django.core.wsgi import get_wsgi_application

    from adapter_support import RAW_EXPECTED, raw_case_answers
    from django_adapter_support import WsgiServer

    wsgi = WsgiServer(get_wsgi_application()).start()
    try:
        answers = raw_case_answers(
            wsgi.base_url, lambda r: f"/whoami?tag=raw-{r}", lambda body: body["username"]
        )
    finally:
        wsgi.stop()
    assert answers == RAW_EXPECTED
