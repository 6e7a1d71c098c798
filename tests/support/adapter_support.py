"""Shared helpers of the framework adapter tests (Flask, ASGI, FastAPI).

The identities, the request cases every adapter must handle the same way, the
connection parameters for the wire test server, real servers on 127.0.0.1
(waitress, uvicorn) in a thread, and the leak checker that reads the wire
server's per-round-trip records.
"""

from __future__ import annotations

import contextlib
import errno
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import oracledb

import spi_static
from deepsec.testing.oracle import OracleTestServer

USER = "app_user"
PASSWORD = "app_password"
#: ``end_user_sec_params`` of every adapter test: the custom spi_type module.
SEC_PARAMS: dict[str, Any] = {"spi_type": "spi_static", "client_id": "adapters-app"}
#: The one query the test endpoints run; the wire server answers the end user's name.
WHOAMI = "select xs_sys_context('xs$session','username') from dual"
TAG = re.compile(r"/\* (req|out)-([\w-]+) \*/")


def user_token(name: str) -> str:
    """An end-user IAM token (unsigned JWT) whose ``preferred_username`` is ``name``."""
    return spi_static.make_jwt(
        {"sub": name, "preferred_username": name, "exp": int(time.time()) + 3600}
    )


ALICE = user_token("alice")
CAROL = user_token("carol")
SECRET = "s3cr3t-never-shown"


def connect_kwargs(server: OracleTestServer) -> dict[str, Any]:
    """Connect/pool keyword arguments with deepsec's ``end_user_sec_params``."""
    return {
        "user": USER,
        "password": PASSWORD,
        "dsn": server.dsn,
        "ssl_context": server.client_ssl_context(),
        "extra_auth_params": {"end_user_sec_params": dict(SEC_PARAMS)},
    }


@dataclass(frozen=True)
class Case:
    """One request every adapter must answer the same way (lenient defaults)."""

    name: str
    headers: dict[str, str]
    user: str | None  # the end user the database must see (None: no context)


CASES: list[Case] = [
    Case("cookie-token", {"Cookie": f"identity={ALICE}"}, "alice"),
    Case("cookie-json-token", {"Cookie": f'theme=dark; identity="{ALICE}"'}, "alice"),
    Case("cookie-local", {"Cookie": 'identity=["bob", null]'}, "bob"),
    Case("cookie-local-encoded", {"Cookie": "identity=%5B%22bob%22%2Cnull%5D"}, "bob"),
    Case("bearer", {"Authorization": f"Bearer {CAROL}"}, "carol"),
    Case("bearer-lowercase", {"Authorization": f"bearer {CAROL}"}, "carol"),
    Case(
        "cookie-before-bearer",
        {"Cookie": 'identity=["bob", null]', "Authorization": f"Bearer {CAROL}"},
        "bob",
    ),
    Case("no-identity", {}, None),
    Case("basic-auth-is-not-ours", {"Authorization": "Basic YWxpY2U6cHc="}, None),
    Case("malformed-cookie", {"Cookie": 'identity=["bob"'}, None),
    Case("malformed-cookie-type", {"Cookie": "identity={}"}, None),
    Case("malformed-bearer", {"Authorization": "Bearer not a token"}, None),
    Case("oversized-bearer", {"Authorization": "Bearer " + "a" * 17_000}, None),
    Case("oversized-cookie", {"Cookie": "identity=" + "a" * 17_000}, None),
]

#: A cookie that made json raise RecursionError (a 500 in every adapter before).
NESTED_COOKIE = "identity=" + "[" * 1000
#: A lone surrogate in a local user's name (UnicodeEncodeError -> 500 before).
SURROGATE_COOKIE = 'identity=["\\ud800", null]'

#: ``(headers, status, WWW-Authenticate)``: what strict mode answers a malformed identity.
STRICT_REJECTIONS: list[tuple[dict[str, str], int, str | None]] = [
    ({"Cookie": 'identity=["bob"'}, 400, None),
    ({"Cookie": NESTED_COOKIE}, 400, None),
    ({"Cookie": SURROGATE_COOKIE}, 400, None),
    ({"Authorization": "Bearer not a token"}, 401, 'Bearer error="invalid_token"'),
    ({"Authorization": "Bearer " + "a" * 17_000}, 401, 'Bearer error="invalid_token"'),
]


@dataclass(frozen=True)
class RawCase:
    """Raw header fields (repeats, bytes) that must name the same end user everywhere."""

    name: str
    headers: list[tuple[str, bytes]]
    user: str | None


ZOE = "zo\u00eb"
RAW_CASES: list[RawCase] = [
    RawCase("nested-json-cookie", [("Cookie", NESTED_COOKIE.encode())], None),
    RawCase("surrogate-cookie", [("Cookie", SURROGATE_COOKIE.encode())], None),
    RawCase(
        "surrogate-cookie-percent",
        [("Cookie", b"identity=%5B%22%ED%A0%80%22%2Cnull%5D")],
        None,
    ),
    RawCase("utf8-name", [("Cookie", f'identity=["{ZOE}", null]'.encode())], ZOE),
    RawCase("utf8-name-percent", [("Cookie", b"identity=%5B%22zo%C3%AB%22%2Cnull%5D")], ZOE),
    RawCase("latin1-byte-is-malformed", [("Cookie", b'identity=["zo\xeb", null]')], None),
    RawCase(
        "two-cookie-fields",
        [("Cookie", b"theme=dark"), ("Cookie", f"identity={ALICE}".encode())],
        "alice",
    ),
    RawCase(
        "identity-twice-same-value",
        [("Cookie", f"identity={ALICE}; identity={ALICE}".encode())],
        "alice",
    ),
    RawCase(
        "identity-twice-different",
        [("Cookie", f"identity={ALICE}; identity={CAROL}".encode())],
        None,
    ),
    RawCase(
        "identity-in-two-fields-different",
        [("Cookie", f"identity={ALICE}".encode()), ("Cookie", f"identity={CAROL}".encode())],
        None,
    ),
    RawCase(
        "two-bearer-fields",
        [
            ("Authorization", f"Bearer {ALICE}".encode()),
            ("Authorization", f"Bearer {CAROL}".encode()),
        ],
        None,
    ),
    RawCase(
        "bearer-and-basic-fields",
        [("Authorization", b"Basic YWxpY2U6cHc="), ("Authorization", f"Bearer {CAROL}".encode())],
        None,
    ),
    # Servers join repeated Cookie fields with "," (gunicorn, werkzeug, Django
    # under ASGI; waitress ", "): a value split across fields reads the same.
    RawCase(
        "cookie-value-across-two-fields",
        [("Cookie", b'identity=["bob"'), ("Cookie", b"null]")],
        "bob",
    ),
    # ... but a join inside a name reads "bo,b" or "bo, b" by server: malformed.
    RawCase(
        "cookie-name-across-two-fields",
        [("Cookie", b'identity=["bo'), ("Cookie", b'b", null]')],
        None,
    ),
    RawCase(
        "cookie-value-cut-by-next-field",
        [("Cookie", b'identity=["bob"'), ("Cookie", b"theme=dark")],
        None,
    ),
    RawCase(
        "bad-cookie-field-then-bearer",
        [("Cookie", b'identity=["bob"'), ("Authorization", f"Bearer {CAROL}".encode())],
        "carol",
    ),
]


#: What every adapter must answer for :data:`RAW_CASES`: (status, end user).
RAW_EXPECTED = {case.name: (200, case.user) for case in RAW_CASES}


def raw_case_answers(
    base_url: str, path: Callable[[str], str], user_of: Callable[[Any], str | None]
) -> dict[str, tuple[int, str | None]]:
    """Send every :data:`RAW_CASES` request to a real server: (status, end user) by case.

    Header fields go out exactly as given (repeats kept, bytes as they are).
    """
    answers: dict[str, tuple[int, str | None]] = {}
    with httpx.Client(base_url=base_url, timeout=20) as client:
        for case in RAW_CASES:
            response = client.get(path(rid()), headers=case.headers)
            user = user_of(response.json()) if response.status_code == 200 else None
            answers[case.name] = (response.status_code, user)
    return answers


def assert_token_rejected_is_401(client: Any, server: OracleTestServer, paths: list[str]) -> None:
    """The wire server rejects end-user tokens (ORA-52601): each path answers 401.

    ``client`` is an httpx client or a framework's TestClient (httpx-based).
    """
    server.token_validator = lambda kind, token: kind != "end_user_token"
    try:
        responses = [
            client.get(path, headers={"Authorization": f"Bearer {CAROL}"}) for path in paths
        ]
    finally:
        server.token_validator = None
    for response in responses:
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert response.json() and CAROL not in response.text


def rid() -> str:
    """A fresh request id (see :func:`tag`)."""
    return uuid.uuid4().hex[:12]


def tag(request_id: str) -> str:
    """The SQL comment that ties a statement to one request."""
    return f"/* req-{request_id} */"


async def query_async(pool: Any, request_id: str, times: int = 2) -> list[Any]:
    """Run the request's tagged :data:`WHOAMI` ``times`` on one pooled async connection."""
    async with pool.acquire() as conn:
        cur = conn.cursor()
        out = []
        for _ in range(times):
            await cur.execute(f"{WHOAMI} {tag(request_id)}")
            out.append((await cur.fetchone())[0])
        return out


def query_sync(pool: oracledb.ConnectionPool, request_id: str, times: int = 2) -> list[Any]:
    """Run the request's tagged :data:`WHOAMI` ``times`` on one pooled connection."""
    with pool.acquire() as conn, conn.cursor() as cur:
        out = []
        for _ in range(times):
            cur.execute(f"{WHOAMI} {tag(request_id)}")
            out.append(cur.fetchone()[0])
        return out


@contextlib.asynccontextmanager
async def app_pools(state: Any, server: OracleTestServer) -> AsyncIterator[None]:
    """For an ASGI app's lifespan: ``state.apool`` (async) and ``state.pool`` (sync)."""
    state.apool = oracledb.create_pool_async(min=1, max=4, **connect_kwargs(server))
    state.pool = oracledb.create_pool(min=1, max=4, **connect_kwargs(server))
    try:
        yield
    finally:
        await state.apool.close(force=True)
        state.pool.close(force=True)


def contexts_of(server: OracleTestServer, request_id: str) -> list[str | None]:
    """The end user (``None``: no context) of each recorded statement of a request."""
    trips = server.find_statements(tag(request_id))
    return [t.context.username if t.context is not None else None for t in trips]


def assert_ran_as(server: OracleTestServer, request_id: str, user: str | None, count: int) -> None:
    """Exactly ``count`` statements of the request reached the server, all as ``user``."""
    seen = contexts_of(server, request_id)
    assert len(seen) == count, (request_id, seen)
    assert seen == [user] * count, (request_id, seen)


def assert_no_secret(text: str) -> None:
    """Neither a token nor the test secret appears in a response."""
    for secret in (SECRET, ALICE, CAROL, "s3cr3t"):
        assert secret not in text


# -- leak checking ---------------------------------------------------------------


@dataclass
class LeakReport:
    """What the wire server saw for a load run."""

    requests: int
    statements: int
    outside: int


def check_leaks(
    server: OracleTestServer,
    since: int,
    expected: dict[str, str | None],
    *,
    statements_per_request: int,
    counts: dict[str, int] | None = None,
) -> LeakReport:
    """Every tagged statement carried its own request's end user, and nothing else.

    ``expected`` maps request ids to end users; each ran ``statements_per_request``
    statements unless ``counts`` says otherwise.  ``out-*`` statements were run
    on the same connections outside any request: they must carry no context.
    """
    by_request: dict[str, list[str | None]] = {}
    outside = 0
    for trip in server.statements(since=since):
        match = TAG.search(trip.sql or "")
        if match is None:
            continue
        user = trip.context.username if trip.context is not None else None
        if match.group(1) == "out":
            assert trip.context is None, f"outside statement {match.group(2)} carried {user!r}"
            outside += 1
            continue
        by_request.setdefault(match.group(2), []).append(user)
    wrong = {
        rid: (expected.get(rid, "<unknown request>"), seen)
        for rid, seen in by_request.items()
        if seen != [expected.get(rid, "<unknown request>")] * len(seen)
    }
    assert not wrong, f"{len(wrong)} requests ran as someone else: {list(wrong.items())[:5]}"
    counts = counts or {}
    missing = [
        rid
        for rid in expected
        if len(by_request.get(rid, ())) != counts.get(rid, statements_per_request)
    ]
    assert not missing, f"{len(missing)} requests lack statements: {missing[:5]}"
    return LeakReport(len(by_request), sum(map(len, by_request.values())), outside)


USERS = [f"user{i:02d}" for i in range(20)]
TOKENS = {name: user_token(name) for name in USERS}


def identity_headers(name: str, rng: random.Random) -> dict[str, str]:
    """Send ``name`` in one of the three forms, chosen at random."""
    form = rng.randrange(3)
    if form == 0:
        return {"Cookie": f"identity={TOKENS[name]}"}
    if form == 1:
        return {"Authorization": f"Bearer {TOKENS[name]}"}
    return {"Cookie": f'identity=["{name}", null]'}


def load_plan(count: int, seed: int) -> list[tuple[str, str | None, dict[str, str]]]:
    """``count`` requests in random order: (request id, end user, headers).

    One request in ten carries no identity at all.
    """
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        if rng.random() < 0.1:
            plan.append((f"{i}", None, {}))
        else:
            name = rng.choice(USERS)
            plan.append((f"{i}", name, identity_headers(name, rng)))
    return plan


def run_load(
    base_url: str,
    plan: list[tuple[str, str | None, dict[str, str]]],
    *,
    clients: int = 16,
    path: Callable[[str], str] = lambda rid: f"/whoami/{rid}",
) -> None:
    """Send the plan with ``clients`` concurrent keep-alive clients; check each answer."""
    local = threading.local()
    all_clients: list[httpx.Client] = []
    lock = threading.Lock()

    def one(item: tuple[str, str | None, dict[str, str]]) -> None:
        rid, user, headers = item
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=base_url, timeout=20)
            with lock:
                all_clients.append(client)
        response = client.get(path(rid), headers=headers)
        assert response.status_code == 200, (rid, response.status_code, response.text)
        assert response.json()["db"] == [user, user], (rid, user, response.text)

    try:
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(one, item) for item in plan]:
                future.result()
    finally:
        for client in all_clients:
            client.close()


# -- real servers on 127.0.0.1 ----------------------------------------------------


@contextlib.contextmanager
def waitress_server(app: Any, threads: int = 16) -> Iterator[str]:
    """Serve a WSGI app with waitress in a thread; yield its base URL."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=threads)
    closing = threading.Event()

    def run() -> None:
        try:
            server.run()
        except OSError as exc:
            # close() from this thread races the loop's select() on the closed
            # socket (EBADF; Pylons/waitress#468, fixed upstream by #506): that
            # is the server stopping, not a failure.
            if not (closing.is_set() and exc.errno == errno.EBADF):
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        closing.set()
        server.close()
        server.task_dispatcher.shutdown()
        thread.join(5)


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread (lifespan on); yield its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
