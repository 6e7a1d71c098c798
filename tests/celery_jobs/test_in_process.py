"""deepsec.celery without a broker: eager tasks, the worker's tracer, strict mode, keys.

Eager tasks (``task_always_eager``, ``apply()``) run in the caller's thread;
``run_as_worker`` drives Celery's own tracer (``build_tracer``, what a worker
runs for each message it decodes) with a message's request, so strict mode
and the per-task base class are checked through the code path a worker takes.
Statements go to the session's wire test server.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import oracledb
import pytest
from celery import Celery, signals
from celery.app.trace import build_tracer

import deepsec
import deepsec.celery
from adapter_support import WHOAMI, connect_kwargs, user_token
from deepsec.celery import HEADER, EndUserExpired, EndUserHeaderRefused, EndUserTask
from deepsec.celery.settings import installed
from deepsec.celery.signing import CLOCK_SKEW, HeaderRefused, body_digest, derive_key, sign, verify
from deepsec.celery.worker import _stack

KEY = "in-process-signing-key-0123456789"
ALICE = user_token("alice")


@pytest.fixture(scope="module")
def pool(oracle_server: Any) -> Iterator[oracledb.ConnectionPool]:
    p = oracledb.create_pool(min=0, max=4, **connect_kwargs(oracle_server))
    yield p
    p.close(force=True)


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def users_of(server: Any, tag: str) -> list[str | None]:
    return [
        t.context.username if t.context is not None else None
        for t in server.find_statements(f"/* req-{tag} */")
    ]


def make_app(pool: oracledb.ConnectionPool, name: str, **conf: Any) -> Any:
    """A Celery app whose tasks run the tagged WHOAMI on ``pool``."""
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def add_tasks(app: Any, pool: oracledb.ConnectionPool, **options: Any) -> dict[str, Any]:
    def run(tag: str) -> str | None:
        with pool.acquire() as conn, conn.cursor() as cur:
            cur.execute(f"{WHOAMI} /* req-{tag} */")
            return cur.fetchone()[0]

    @app.task(name=f"{app.main}.whoami", **options)
    def whoami(tag: str) -> str | None:
        return run(tag)

    @app.task(name=f"{app.main}.then", **options)
    def then(_previous: Any, tag: str) -> str | None:
        return run(tag)

    @app.task(name=f"{app.main}.impersonate", **options)
    def impersonate(tag: str) -> str | None:
        # Task code changing its own end user must not leak into the caller.
        deepsec.set_end_user_identity(user_token("mallory"))
        return run(tag)

    @app.task(name=f"{app.main}.publish_inside", **options)
    def publish_inside(tag: str, child: str) -> str | None:
        whoami.delay(child)  # eager: runs here, inside this task
        return run(tag)

    @app.task(name=f"{app.main}.fails", **options)
    def fails() -> None:
        raise RuntimeError("boom")

    return {
        "whoami": whoami,
        "then": then,
        "impersonate": impersonate,
        "publish_inside": publish_inside,
        "fails": fails,
    }


def header_for(
    task_id: str,
    name: str,
    ctx: Any,
    args: tuple[Any, ...] = (),
    *,
    key: str = KEY,
    embed: dict[str, Any] | None = None,
    issued_at: float | None = None,
) -> dict[str, Any]:
    """A header as a publisher with ``key`` signs it for this message."""
    digest = body_digest(args, {}, embed)
    return sign(derive_key(key), task_id, name, ctx, digest, issued_at or time.time())


def run_as_worker(
    task: Any,
    args: tuple[Any, ...],
    header: Any,
    task_id: str | None = None,
    **request_extra: Any,
) -> Any:
    """Run ``task`` through Celery's worker tracer with this end-user header; its Info."""
    task_id = task_id or str(uuid.uuid4())
    request = {"id": task_id, "task": task.name, "is_eager": False, "delivery_info": {}}
    request.update(request_extra)  # what a message body's "embed" adds (Celery's update)
    if header is not None:
        request[HEADER] = header
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task.app)
    return tracer(task_id, args, {}, request)


# -- eager ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager(pool: oracledb.ConnectionPool) -> dict[str, Any]:
    app = make_app(pool, "eager", task_always_eager=True)
    deepsec.celery.install(app, signing_key=KEY)
    return add_tasks(app, pool)


def test_eager_tasks_run_as_the_caller_and_leave_its_context(
    eager: dict[str, Any], oracle_server: Any
) -> None:
    a, b, c, d = (new_tag() for _ in range(4))
    with deepsec.end_user(ALICE, data_roles=["clerk"]) as ctx:
        assert eager["whoami"].delay(a).get() == "alice"
        assert eager["impersonate"].apply((b,)).get() == "mallory"
        assert deepsec.current_end_user() is ctx  # the task's change did not leak
        assert eager["publish_inside"].delay(c, d).get() == "alice"
    assert users_of(oracle_server, a) == ["alice"]
    assert users_of(oracle_server, b) == ["mallory"]
    assert users_of(oracle_server, c) == users_of(oracle_server, d) == ["alice"]
    trip = oracle_server.find_statements(f"/* req-{a} */")[0]
    assert trip.context.data_roles == ("clerk",)
    t = new_tag()
    assert eager["whoami"].delay(t).get() is None  # no end user: none
    assert users_of(oracle_server, t) == [None]


def test_eager_chain_and_failure(eager: dict[str, Any], oracle_server: Any) -> None:
    a, b = new_tag(), new_tag()
    with deepsec.end_user(("bob", None)) as ctx:
        (eager["whoami"].si(a) | eager["then"].s(b)).apply_async().get()
        with pytest.raises(RuntimeError, match="boom"):
            eager["fails"].delay().get()
        assert deepsec.current_end_user() is ctx
    assert users_of(oracle_server, a) == users_of(oracle_server, b) == ["bob"]
    assert deepsec.current_end_user() is None
    assert _stack() == []  # every scope ended


# -- the worker's tracer: verification, strict mode, tainted re-publishes -------------


@pytest.fixture(scope="module")
def strict(pool: oracledb.ConnectionPool) -> dict[str, Any]:
    app = make_app(pool, "strict")
    deepsec.celery.install(app, signing_key=KEY, strict=True)
    return add_tasks(app, pool, autoretry_for=(Exception,), max_retries=3)


def expired_token(exp: Any = None) -> str:
    """A token whose ``exp`` is ``exp`` (default: ten minutes ago)."""
    import spi_static

    exp = int(time.time() - 600) if exp is None else exp
    return str(spi_static.make_jwt({"preferred_username": "old", "exp": exp}))


def test_strict_mode_fails_a_refused_header_before_the_body(
    strict: dict[str, Any], oracle_server: Any
) -> None:
    whoami = strict["whoami"]
    alice = deepsec.EndUserContext(ALICE)
    refused = (
        None,
        "garbage",
        header_for("t", whoami.name, alice, key="x" * 32),
        {**header_for("t", whoami.name, alice), "sig": "é" * 64},
    )
    for header in refused:
        t = new_tag()
        info = run_as_worker(whoami, (t,), header).info
        assert info.state == "FAILURE"
        assert isinstance(info.retval, EndUserHeaderRefused)
        assert ALICE not in str(info.retval)
        assert users_of(oracle_server, t) == []
    t, task_id = new_tag(), str(uuid.uuid4())
    info = run_as_worker(whoami, (t,), header_for(task_id, whoami.name, alice, (t,)), task_id).info
    assert info is None  # success
    assert users_of(oracle_server, t) == ["alice"]
    assert deepsec.current_end_user() is None


def test_is_eager_in_the_message_body_is_not_trusted(
    strict: dict[str, Any], oracle_server: Any
) -> None:
    # Celery merges the body's "embed" into the request after is_eager=False,
    # so a broker writer can claim an eager run; strict mode must still refuse.
    t = new_tag()
    info = run_as_worker(strict["whoami"], (t,), None, is_eager=True).info
    assert info is not None and isinstance(info.retval, EndUserHeaderRefused)
    assert users_of(oracle_server, t) == []


def test_expired_token_fails_without_retry(strict: dict[str, Any], oracle_server: Any) -> None:
    whoami = strict["whoami"]
    for token in (expired_token(), expired_token(exp=float("nan")), expired_token(exp=10**400)):
        task_id, t = str(uuid.uuid4()), new_tag()
        header = header_for(task_id, whoami.name, deepsec.EndUserContext(token), (t,))
        info = run_as_worker(whoami, (t,), header, task_id).info
        assert info is not None, token[-12:]
        assert info.state == "FAILURE"  # not RETRY, although autoretry_for=(Exception,)
        assert isinstance(info.retval, EndUserExpired)
        assert token not in str(info.retval)
        assert users_of(oracle_server, t) == []
    # Within the documented clock skew, a token is still accepted.
    task_id, t = str(uuid.uuid4()), new_tag()
    fresh = deepsec.EndUserContext(expired_token(int(time.time() - deepsec.celery.CLOCK_SKEW / 2)))
    assert (
        run_as_worker(whoami, (t,), header_for(task_id, whoami.name, fresh, (t,)), task_id).info
        is None
    )
    assert users_of(oracle_server, t) == ["old"]


def test_a_refused_task_cannot_launder_its_errbacks(
    strict: dict[str, Any], oracle_server: Any
) -> None:
    whoami = strict["whoami"]
    published: list[dict[str, Any]] = []

    def capture(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        if sender == whoami.name:
            published.append(dict(headers))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        for case in ("refused header", "expired end user"):
            task_id, t, errback_tag = str(uuid.uuid4()), new_tag(), new_tag()
            errbacks = [dict(whoami.si(errback_tag))]
            header = None
            if case == "expired end user":
                expired = deepsec.EndUserContext(expired_token())
                embed = {"errbacks": errbacks}
                header = header_for(task_id, whoami.name, expired, (t,), embed=embed)
            info = run_as_worker(whoami, (t,), header, task_id, errbacks=errbacks).info
            assert info is not None and info.state == "FAILURE", case
    finally:
        signals.before_task_publish.disconnect(capture)
    assert len(published) == 2  # Celery published each errback
    for header in published:
        errback = header[HEADER]
        assert errback["tainted"] is True and errback["end_user"] == "null"
        with pytest.raises(HeaderRefused, match="whose own end user was refused"):
            verify(
                derive_key(KEY), errback, header["id"], whoami.name, errback["body"],
                now=time.time(), max_age=3600,
            )  # fmt: skip


def test_a_task_with_a_foreign_base_cannot_fail_early_so_runs_as_nobody(
    pool: oracledb.ConnectionPool, oracle_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import celery

    app = make_app(pool, "foreign_base")
    deepsec.celery.install(app, signing_key=KEY)
    seen: list[Any] = []

    @app.task(name="foreign_base.t", base=celery.Task)
    def t() -> None:
        seen.append((deepsec.current_end_user(), HEADER in t.request.__dict__))

    expired = expired_token()
    task_id = str(uuid.uuid4())
    header = header_for(task_id, t.name, deepsec.EndUserContext(expired))
    with caplog.at_level("ERROR", logger="deepsec.celery"):
        assert run_as_worker(t, (), header, task_id).info is None
    assert seen == [(None, False)]
    assert "EndUserExpired" in caplog.text and "not deepsec.celery.EndUserTask" in caplog.text
    assert expired not in caplog.text


# -- publishing: what cannot be signed fails in the caller -----------------------------


def test_signing_failures_reach_the_caller_and_drop_a_callers_header(
    pool: oracledb.ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(deepsec.IdentityError, match="NaN"):
        deepsec.EndUserContext(ALICE, attributes={"x": float("nan")})
    with pytest.raises(deepsec.IdentityError, match="NaN"):
        deepsec.EndUserContext(ALICE, attributes={"x": [float("inf")]})
    app = make_app(pool, "unsignable", task_serializer="pickle", accept_content=["pickle"])
    deepsec.celery.install(app, signing_key=KEY)
    tasks = add_tasks(app, pool)
    published: list[dict[str, Any]] = []

    def capture(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        if sender == tasks["whoami"].name:
            published.append(dict(headers))

    forged = header_for("x", tasks["whoami"].name, deepsec.EndUserContext(ALICE))
    signals.before_task_publish.connect(capture, weak=False)
    try:
        with deepsec.end_user(ALICE):
            # Caught before publishing: nothing goes out.
            with pytest.raises(TypeError, match="type set"):
                tasks["whoami"].apply_async(({1, 2},), headers={HEADER: forged})
            assert published == []
            # send_task() has no precheck: the signal fails, the caller's header is gone.
            with caplog.at_level("ERROR", logger="deepsec.celery"):
                app.send_task(tasks["whoami"].name, args=({1, 2},), headers={HEADER: forged})
    finally:
        signals.before_task_publish.disconnect(capture)
    (headers,) = published
    assert HEADER not in headers
    assert "could not be signed" in caplog.text and ALICE not in caplog.text


# -- EndUserTask without install(): settings from the app's configuration --------------


def test_end_user_task_reads_its_key_from_the_app_conf(
    pool: oracledb.ConnectionPool, oracle_server: Any
) -> None:
    app = make_app(pool, "per_task", deepsec_signing_key=KEY)
    tasks = add_tasks(app, pool, base=EndUserTask)

    @app.task(name="per_task.plain")
    def plain() -> None: ...

    published: list[dict[str, Any]] = []

    def capture(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        if sender in (tasks["whoami"].name, plain.name):
            published.append(dict(headers))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        t = new_tag()
        with deepsec.end_user(("carol", None)):
            # A header passed by the caller is replaced, never trusted.
            result = tasks["whoami"].apply_async((t,), headers={HEADER: {"end_user": "x"}})
            plain.apply_async()
    finally:
        signals.before_task_publish.disconnect(capture)
    first, second = published
    assert HEADER not in second  # not an EndUserTask, app not installed: untouched
    info = run_as_worker(tasks["whoami"], (t,), first[HEADER], result.id).info
    assert info is None
    assert users_of(oracle_server, t) == ["carol"]


# -- the header ------------------------------------------------------------------------


def test_header_round_trip_and_every_refusal() -> None:
    key = derive_key(KEY)
    now = time.time()
    body = body_digest(("a",), {"k": 1}, None)

    def check(header: Any, task_id: str = "id1", name: str = "t", digest: str = body) -> Any:
        return verify(key, header, task_id, name, digest, now=now, max_age=3600)

    def make(ctx: Any, task_id: str = "id1", iat: float = now, **kw: Any) -> dict[str, Any]:
        return sign(key, task_id, "t", ctx, body, iat, **kw)

    ctx = deepsec.EndUserContext(ALICE, data_roles=["a"], attributes={"x": [1, "y"]})
    assert check(make(ctx)) == ctx
    local = deepsec.EndUserContext(("bob", "k3y"))
    assert check(make(local)) == local
    assert check(make(None)) is None
    good = make(ctx)
    refusals = {
        "is missing": None,
        "is malformed": "x",
        "has an unknown format version": {**good, "v": 1},
        "is not signed": {**good, "sig": ""},
        "bad signature": {**good, "sig": "é" * 64},
        "has a bad signature": {**good, "end_user": good["end_user"].replace('"a"', '"b"')},
        "was made for another message": make(ctx, "id2"),
        "older than the maximum age": make(ctx, iat=now - 3600 - CLOCK_SKEW - 1),
        "issued in the future": make(ctx, iat=now + CLOCK_SKEW + 5),
        "whose own end user was refused": make(None, tainted=True),
        "malformed ": {**good, "iat": float("nan")},
    }
    for reason, header in refusals.items():
        with pytest.raises(HeaderRefused, match=reason.strip()) as info:
            check(header)
        assert ALICE not in str(info.value)
    assert check(make(ctx, iat=now - 3600)) == ctx  # within the maximum age
    with pytest.raises(HeaderRefused, match="another message"):
        check(good, name="other-task")
    with pytest.raises(HeaderRefused, match="bad signature"):
        verify(derive_key("another-key-0123456789"), good, "id1", "t", body, now=now, max_age=60)
    forged = {**good, "end_user": json.dumps({"identity": 5})}
    forged["sig"] = make(None)["sig"]  # a real MAC of something else
    with pytest.raises(HeaderRefused, match="bad signature"):
        check(forged)
    # The body digest covers args, kwargs and every follow-up task Celery keeps in the body.
    for other in (
        body_digest(("b",), {"k": 1}, None),
        body_digest(("a",), {"k": 2}, None),
        body_digest(("a",), {"k": 1}, {"chain": [{"task": "delete_everything"}]}),
        body_digest(("a",), {"k": 1}, {"callbacks": [{"task": "x"}]}),
        body_digest(("a",), {"k": 1}, {"errbacks": [{"task": "x"}]}),
        body_digest(("a",), {"k": 1}, {"chord": {"task": "x"}}),
    ):
        with pytest.raises(HeaderRefused, match="does not match the message body"):
            check(good, digest=other)
    # ... in a form that survives a JSON round trip (tuples, int keys, datetimes).
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    sent = ((1, (2, 3)), {"when": stamp, "m": {1: "x"}}, {"chain": None})
    received = ([1, [2, 3]], {"when": stamp, "m": {"1": "x"}}, {})
    assert body_digest(*sent) == body_digest(*received)


def test_install_makes_new_tasks_end_user_tasks(pool: oracledb.ConnectionPool) -> None:
    app = make_app(pool, "base")
    deepsec.celery.install(app, signing_key=KEY)
    deepsec.celery.install(app, signing_key=KEY)  # idempotent

    @app.task(name="base.t")
    def t() -> None: ...

    assert isinstance(t, EndUserTask)
    assert issubclass(app.Task, EndUserTask)
    # Documented: Celery's built-ins too, so what chord_unlock publishes keeps the end user.
    assert isinstance(app.tasks["celery.chord_unlock"], EndUserTask)
    assert KEY not in repr(installed[app])


_KEYS_SCRIPT = r"""
import json, sys
from celery import Celery
import deepsec.celery
from deepsec import ConfigError
from deepsec.celery.signing import derive_key
out = {}
for label, kwargs in (("none", {}), ("short", {"signing_key": "short-s3cret"})):
    try:
        deepsec.celery.install(Celery(label, set_as_current=False), **kwargs)
        out[label] = "installed"
    except ConfigError as exc:
        out[label] = str(exc)
from django.conf import settings
settings.configure(SECRET_KEY="django-secret-key-0123456789-abcdef")
app = Celery("django", set_as_current=False)
deepsec.celery.install(app)
out["django"] = deepsec.celery.settings.installed[app].key == derive_key(settings.SECRET_KEY)
print(json.dumps(out))
"""


def test_signing_key_defaults_to_django_else_is_required() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _KEYS_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no signing key" in out["none"] and "signing_key=" in out["none"]
    assert "signing_key is 12 bytes long" in out["short"]
    assert "short-s3cret" not in out["short"]
    assert out["django"] is True
