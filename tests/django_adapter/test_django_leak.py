"""No identity leaks between requests: 2,000 requests through a real threaded WSGI server.

20 end users (10 with an IAM-style token sent as cookie or bearer header, 10
local ``(name, None)`` end users) and anonymous requests, in random order,
from 16 concurrent keep-alive clients, through waitress (8 worker threads)
into Django's Oracle backend with persistent connections
(``CONN_MAX_AGE=600``) or the python-oracledb pool (``OPTIONS["pool"]``).
Every tenth request also makes its worker thread run a statement *after* the
request has finished, on the same thread-bound (or pooled) connection.

Each view statement carries ``/* req-N */``; each after-request statement
``/* out-N */``.  The wire server's per-round-trip records must show every
request statement with exactly that request's end user, every after-request
statement with none, and Django's own connection set-up statements with the
identity of whatever they were run for.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
from django.core.wsgi import get_wsgi_application
from django.db import connections

import deepsec
from django_adapter_support import WsgiServer
from django_project.wire import user_token

pytestmark = pytest.mark.timeout(90)

REQUESTS = 2000
CLIENTS = 16
USERS = [f"user{i:02d}" for i in range(20)]
OUTSIDE_EVERY = 10


def leak_app(opened: list[Any]) -> Any:
    """Django's WSGI app, plus a statement after the response when ``outside=N``."""
    django_app = get_wsgi_application()
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        result = django_app(environ, start_response)
        try:
            yield from result
        finally:
            result.close()  # request_finished: Django's request is over
            query = parse_qs(environ.get("QUERY_STRING", ""))
            if "outside" in query:
                alias = query["db"][0]
                assert deepsec.current_end_user() is None
                conn = connections[alias]
                with conn.cursor() as cursor:
                    cursor.execute(f"select 1 /* out-{query['outside'][0]} */ from dual")
                    cursor.fetchall()
                if conn.is_pool:
                    conn.close()  # back to the pool
                else:
                    with lock:
                        if conn not in opened:
                            opened.append(conn)

    return app


def plan(seed: int) -> list[tuple[int, str | None, str]]:
    """(request id, user or None, how the identity is sent), in random order."""
    rng = random.Random(seed)
    requests = []
    for n in range(REQUESTS):
        user = rng.choice([*USERS, None])
        if user is None:
            how = "none"
        elif USERS.index(user) < 10:
            how = rng.choice(["cookie-token", "bearer"])
        else:
            how = "cookie-local"
        requests.append((n, user, how))
    return requests


def headers_for(user: str | None, how: str) -> dict[str, str]:
    if how == "cookie-token":
        return {"Cookie": f"identity={user_token(str(user))}"}
    if how == "bearer":
        return {"Authorization": f"Bearer {user_token(str(user))}"}
    if how == "cookie-local":
        return {"Cookie": f'identity=["{user}", null]'}
    return {}


def run_clients(port: int, alias: str, requests: list[tuple[int, str | None, str]]) -> list[str]:
    work: queue.Queue[tuple[int, str | None, str]] = queue.Queue()
    for item in requests:
        work.put(item)
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while True:
                try:
                    n, user, how = work.get_nowait()
                except queue.Empty:
                    return
                path = f"/whoami?db={alias}&tag=req-{n}"
                if n % OUTSIDE_EVERY == 0:
                    path += f"&outside={n}"
                conn.request("GET", path, headers=headers_for(user, how))
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or json.loads(body)["username"] != user:
                    errors.append(f"req-{n} as {user}: {response.status} {body[:200]!r}")
        except Exception as exc:
            errors.append(f"client failed: {exc!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def _tag(sql: str | None) -> str | None:
    if sql is None or "/* " not in sql:
        return None
    return sql.split("/* ", 1)[1].split(" */", 1)[0]


@pytest.mark.parametrize("alias", ["persistent", "pooled"])
def test_no_leak_across_2000_requests(server: Any, alias: str) -> None:
    requests = plan(seed={"persistent": 1, "pooled": 2}[alias])
    expected: dict[str, str | None] = {f"req-{n}": user for n, user, _ in requests}
    expected.update({f"out-{n}": None for n, _, _ in requests if n % OUTSIDE_EVERY == 0})
    opened: list[Any] = []
    wsgi = WsgiServer(leak_app(opened), threads=8).start()
    mark = server.mark()
    started = time.monotonic()
    try:
        errors = run_clients(wsgi.port, alias, requests)
    finally:
        wsgi.stop()
        for conn in opened:  # persistent connections of the (now idle) worker threads
            if conn.connection is not None:
                conn.connection.close()
    elapsed = time.monotonic() - started
    assert errors == [], errors[:5]

    statements = server.statements(since=mark)
    by_conn: dict[int, list[Any]] = defaultdict(list)
    for trip in statements:
        by_conn[trip.conn_id].append(trip)
    seen: dict[str, int] = defaultdict(int)
    setup_statements = 0
    for trips in by_conn.values():
        trips.sort(key=lambda t: t.seq)
        pending: list[Any] = []  # Django's untagged set-up statements on connect
        for trip in trips:
            tag = _tag(trip.sql)
            if tag is None:
                pending.append(trip)
                continue
            assert tag in expected, f"unexpected statement {trip.sql!r}"
            seen[tag] += 1
            want = expected[tag]
            for t in [*pending, trip]:
                got = t.context.username if t.context is not None else None
                assert got == want, f"{t.sql!r} on conn {t.conn_id} ran as {got!r}, not {want!r}"
            setup_statements += len(pending)
            pending = []
        assert pending == [], f"statements after the last tagged one: {pending}"

    # Nothing is vacuous: every request ran its two statements, every
    # after-request statement ran, and connections were really reused.
    assert all(seen[f"req-{n}"] == 2 for n, _, _ in requests), "a request's statements are missing"
    assert sum(1 for tag in seen if tag.startswith("out-")) == REQUESTS // OUTSIDE_EVERY
    assert len(by_conn) <= 16, f"{len(by_conn)} connections: not reused"
    assert setup_statements > 0
    identities = {t.context.username for t in statements if t.context is not None}
    assert identities == set(USERS)
    print(
        f"{alias}: {REQUESTS} requests, {len(statements)} statements, "
        f"{len(by_conn)} connections in {elapsed:.1f}s"
    )


@pytest.mark.timeout(30)
def test_streaming_and_rejections_through_waitress(server: Any) -> None:
    """A streamed body queried per chunk over real HTTP; afterwards nothing carries it."""
    opened: list[Any] = []
    wsgi = WsgiServer(leak_app(opened), threads=1).start()
    mark = server.mark()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", wsgi.port, timeout=20)
        conn.request(
            "GET",
            "/stream?db=persistent&tag=ws&chunks=3&outside=ws",
            headers=headers_for("user03", "bearer"),
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"user03\nuser03\nuser03\n"
        conn.request("GET", "/whoami?db=persistent&tag=ws-anon", headers={"Cookie": "identity=%"})
        anon = conn.getresponse()
        assert json.loads(anon.read())["username"] is None
        conn.close()
    finally:
        wsgi.stop()
        for db in opened:
            if db.connection is not None:
                db.connection.close()
    for tag in ("ws-0", "ws-1", "ws-2", "ws-finally"):
        trips = server.find_statements(f"/* {tag} */", since=mark)
        assert len(trips) == 2 and {t.context.username for t in trips} == {"user03"}
    after = server.find_statements("/* out-ws */", since=mark)
    anon_trips = server.find_statements("/* ws-anon */", since=mark)
    assert len(after) == 1 and after[0].context is None
    assert len(anon_trips) == 2 and all(t.context is None for t in anon_trips)
    # One worker thread, one persistent connection: the same connection served
    # the streamed request, the after-request statement and the anonymous request.
    assert len({t.conn_id for t in [*after, *anon_trips]}) == 1
