"""deepsec.celery without a broker: eager tasks, the worker's tracer, strict mode, keys.

Eager tasks (``task_always_eager``, ``apply()``) run in the caller's thread;
``run_as_worker`` drives Celery's own tracer (``build_tracer``, what a worker
runs for each message it decodes) with a message's request, so strict mode
and the per-task base class are checked through the code path a worker takes.
Statements go to the session's wire test server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
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
from deepsec.celery.signing import HeaderRefused, derive_key, sign, verify

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


def run_as_worker(task: Any, args: tuple[Any, ...], header: Any, task_id: str | None = None) -> Any:
    """Run ``task`` through Celery's worker tracer with this end-user header; its Info."""
    task_id = task_id or str(uuid.uuid4())
    request = {"id": task_id, "task": task.name, "is_eager": False, "delivery_info": {}}
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
    assert deepsec.celery._stack() == []  # every scope ended


# -- the worker's tracer: verification, strict mode, revoke ----------------------------


@pytest.fixture(scope="module")
def strict(pool: oracledb.ConnectionPool) -> dict[str, Any]:
    app = make_app(pool, "strict")
    deepsec.celery.install(app, signing_key=KEY, strict=True)
    return add_tasks(app, pool, autoretry_for=(Exception,), max_retries=3)


def test_strict_mode_fails_a_refused_header_before_the_body(
    strict: dict[str, Any], oracle_server: Any
) -> None:
    key = derive_key(KEY)
    whoami = strict["whoami"]
    alice = deepsec.EndUserContext(ALICE)
    refused = (
        None,
        "garbage",
        sign(derive_key("x" * 32), "t", whoami.name, alice),
        {**sign(key, "t", whoami.name, alice), "sig": "é" * 64},
    )
    for header in refused:
        t = new_tag()
        info = run_as_worker(whoami, (t,), header).info
        assert info.state == "FAILURE"
        assert isinstance(info.retval, EndUserHeaderRefused)
        assert ALICE not in str(info.retval)
        assert users_of(oracle_server, t) == []
    t, task_id = new_tag(), str(uuid.uuid4())
    info = run_as_worker(whoami, (t,), sign(key, task_id, whoami.name, alice), task_id).info
    assert info is None  # success
    assert users_of(oracle_server, t) == ["alice"]
    assert deepsec.current_end_user() is None


def test_expired_token_fails_without_retry(strict: dict[str, Any], oracle_server: Any) -> None:
    import spi_static

    expired = spi_static.make_jwt({"preferred_username": "old", "exp": int(time.time()) - 1})
    whoami, task_id, t = strict["whoami"], str(uuid.uuid4()), new_tag()
    header = sign(derive_key(KEY), task_id, whoami.name, deepsec.EndUserContext(expired))
    info = run_as_worker(whoami, (t,), header, task_id).info
    assert info.state == "FAILURE"  # not RETRY, although autoretry_for=(Exception,)
    assert isinstance(info.retval, EndUserExpired)
    assert expired not in str(info.retval)
    assert users_of(oracle_server, t) == []


def test_a_task_with_a_foreign_base_cannot_fail_early_so_runs_as_nobody(
    pool: oracledb.ConnectionPool, oracle_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import celery

    import spi_static

    app = make_app(pool, "foreign_base")
    deepsec.celery.install(app, signing_key=KEY)
    seen: list[Any] = []

    @app.task(name="foreign_base.t", base=celery.Task)
    def t() -> None:
        seen.append((deepsec.current_end_user(), HEADER in t.request.__dict__))

    expired = spi_static.make_jwt({"preferred_username": "old", "exp": int(time.time()) - 1})
    task_id = str(uuid.uuid4())
    header = sign(derive_key(KEY), task_id, t.name, deepsec.EndUserContext(expired))
    with caplog.at_level("ERROR", logger="deepsec.celery"):
        assert run_as_worker(t, (), header, task_id).info is None
    assert seen == [(None, False)]
    assert "EndUserExpired" in caplog.text and "not deepsec.celery.EndUserTask" in caplog.text
    assert expired not in caplog.text


def test_revoke_ends_the_scope_of_a_running_task(pool: oracledb.ConnectionPool) -> None:
    app = make_app(pool, "revoke")
    deepsec.celery.install(app, signing_key=KEY)
    seen: list[Any] = []

    @app.task(name="revoke.watch")
    def watch() -> None:
        seen.append(deepsec.current_end_user())
        request = watch.request
        revoker = threading.Thread(
            target=signals.task_revoked.send,
            kwargs={"sender": watch, "request": request, "terminated": True, "signum": 15},
        )
        revoker.start()
        revoker.join()
        seen.append(deepsec.current_end_user())

    task_id = str(uuid.uuid4())
    header = sign(derive_key(KEY), task_id, watch.name, deepsec.EndUserContext(("bob", None)))
    run_as_worker(watch, (), header, task_id)
    assert seen[0] is not None and seen[0].name == "bob"
    assert seen[1] is None


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
    ctx = deepsec.EndUserContext(ALICE, data_roles=["a"], attributes={"x": [1, "y"]})
    assert verify(key, sign(key, "id1", "t", ctx), "id1", "t") == ctx
    local = deepsec.EndUserContext(("bob", "k3y"))
    assert verify(key, sign(key, "id1", "t", local), "id1", "t") == local
    assert verify(key, sign(key, "id1", "t", None), "id1", "t") is None
    good = sign(key, "id1", "t", ctx)
    refusals = {
        "is missing": None,
        "is malformed": "x",
        "has an unknown format version": {**good, "v": 2},
        "is not signed": {**good, "sig": ""},
        "bad signature": {**good, "sig": "é" * 64},
        "has a bad signature": {**good, "end_user": good["end_user"].replace('"a"', '"b"')},
        "was made for another message": sign(key, "id2", "t", ctx),
    }
    for reason, header in refusals.items():
        with pytest.raises(HeaderRefused, match=reason) as info:
            verify(key, header, "id1", "t")
        assert ALICE not in str(info.value)
    with pytest.raises(HeaderRefused, match="another message"):
        verify(key, good, "id1", "other-task")
    with pytest.raises(HeaderRefused, match="bad signature"):
        verify(derive_key("another-key-0123456789"), good, "id1", "t")
    forged = {**good, "end_user": json.dumps({"identity": 5})}
    forged["sig"] = sign(key, "id1", "t", None)["sig"]  # a real MAC of something else
    with pytest.raises(HeaderRefused, match="bad signature"):
        verify(key, forged, "id1", "t")


def test_install_makes_new_tasks_end_user_tasks(pool: oracledb.ConnectionPool) -> None:
    app = make_app(pool, "base")
    deepsec.celery.install(app, signing_key=KEY)
    deepsec.celery.install(app, signing_key=KEY)  # idempotent

    @app.task(name="base.t")
    def t() -> None: ...

    assert isinstance(t, EndUserTask)
    assert issubclass(app.Task, EndUserTask)
    assert KEY not in repr(deepsec.celery._installed[app])


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
out["django"] = deepsec.celery._installed[app].key == derive_key(settings.SECRET_KEY)
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
