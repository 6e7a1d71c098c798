"""Tasks run by a real worker process (prefork and threads) as the end user who published them.

The test process publishes through Redis; the worker runs ``jobs_app`` in its
own process and reaches the wire test server over TCPS; every statement is
judged by what the server recorded on the wire.
"""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import deepsec
from adapter_support import TOKENS, USERS, user_token
from deepsec.celery import HEADER, EndUserExpired
from deepsec.celery.signing import body_digest, derive_key, sign

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 45.0


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def statements(server: Any, tag: str) -> list[Any]:
    return server.find_statements(f"/* req-{tag} */")


def wait_statements(server: Any, expected: dict[str, int], timeout: float = TIMEOUT) -> None:
    """Until every tag has its number of statements on the wire (no more, no less)."""
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[str, int] = {}
        for trip in server.statements():
            for tag in _tags_in(trip.sql or "", expected):
                seen[tag] = seen.get(tag, 0) + 1
        missing = {t: n for t, n in expected.items() if seen.get(t, 0) < n}
        if not missing:
            extra = {t: seen[t] for t in expected if seen.get(t, 0) > expected[t]}
            assert not extra, f"statements ran more often than published: {extra}"
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} tags lack statements, e.g. {list(missing)[:5]}")
        time.sleep(0.2)


def _tags_in(sql: str, expected: dict[str, int]) -> list[str]:
    start = sql.find("/* req-")
    if start < 0:
        return []
    tag = sql[start + 7 : sql.find(" */", start)]
    return [tag] if tag in expected else []


def username(trip: Any) -> str | None:
    return trip.context.username if trip.context is not None else None


def identity_of(name: str) -> tuple[Any, dict[str, Any]]:
    """Half the users are token identities with data roles, half local users."""
    index = USERS.index(name)
    attributes = {"who": name, "n": index}
    if index % 2 == 0:
        return TOKENS[name], {"data_roles": [f"role_{name}"], "attributes": attributes}
    return (name, None), {"attributes": attributes}


# -- the leak test --------------------------------------------------------------------


def test_500_tasks_of_20_users_each_run_as_their_publisher(worker: Any, oracle_server: Any) -> None:
    rng = random.Random(12)
    plan: list[tuple[str, str | None]] = [(new_tag(), rng.choice(USERS)) for _ in range(500)]
    plan += [(new_tag(), None) for _ in range(50)]
    rng.shuffle(plan)
    whoami = worker.jobs.whoami

    def publish(item: tuple[str, str | None]) -> None:
        tag, name = item
        if name is None:
            whoami.apply_async((tag,), ignore_result=True)
            return
        identity, extra = identity_of(name)
        with deepsec.end_user(identity, **extra):
            whoami.apply_async((tag,), ignore_result=True)

    with ThreadPoolExecutor(8) as publishers:  # publishers run concurrently too
        list(publishers.map(publish, plan))
    wait_statements(oracle_server, {tag: 1 for tag, _ in plan}, timeout=60)

    wrong = []
    for tag, name in plan:
        (trip,) = statements(oracle_server, tag)
        ctx = trip.context
        if name is None:
            if ctx is not None:
                wrong.append((tag, None, ctx.username))
            continue
        identity, extra = identity_of(name)
        roles = extra.get("data_roles")
        ok = (
            ctx is not None
            and ctx.username == name
            and dict(ctx.attributes) == extra["attributes"]
            and ctx.data_roles == (tuple(roles) if roles else None)
            and ctx.end_user_token == (identity if isinstance(identity, str) else None)
        )
        if not ok:
            wrong.append((tag, name, ctx))
    assert not wrong, f"{len(wrong)} tasks ran as someone else: {wrong[:5]}"


# -- chains, groups, chords, tasks published by tasks ----------------------------------


def test_canvas_published_by_the_client_carries_the_end_user(
    worker: Any, oracle_server: Any
) -> None:
    from celery import chord, group

    jobs = worker.jobs
    t = new_tag()
    with deepsec.end_user(TOKENS["user04"], data_roles=["role_user04"]):
        (jobs.whoami.si(f"{t}-c1") | jobs.whoami_after.s(f"{t}-c2")).apply_async()
        group(jobs.whoami.si(f"{t}-g1"), jobs.whoami.si(f"{t}-g2")).apply_async()
        chord([jobs.whoami.si(f"{t}-h1"), jobs.whoami.si(f"{t}-h2")])(jobs.whoami_after.s(f"{t}-b"))
    tags = [f"{t}-{s}" for s in ("c1", "c2", "g1", "g2", "h1", "h2", "b")]
    wait_statements(oracle_server, dict.fromkeys(tags, 1))
    for tag in tags:
        assert [username(s) for s in statements(oracle_server, tag)] == ["user04"], tag


def test_tasks_published_inside_a_task_inherit_its_end_user(
    worker: Any, oracle_server: Any
) -> None:
    jobs = worker.jobs
    t, child = new_tag(), new_tag()
    with deepsec.end_user(("carol", None)):
        parent = jobs.whoami_then_publish.delay(t, child)
        fan = jobs.canvas.delay(t)
    parent.get(timeout=TIMEOUT)
    fan.get(timeout=TIMEOUT)
    tags = [t, child] + [f"{t}-{s}" for s in ("c1", "c2", "g1", "g2", "h1", "h2", "b")]
    wait_statements(oracle_server, dict.fromkeys(tags, 1))
    for tag in tags:
        assert [username(s) for s in statements(oracle_server, tag)] == ["carol"], tag
    # ... and a task published by a task with no end user has none.
    t2, child2 = new_tag(), new_tag()
    jobs.whoami_then_publish.delay(t2, child2).get(timeout=TIMEOUT)
    wait_statements(oracle_server, {t2: 1, child2: 1})
    assert [username(s) for s in statements(oracle_server, child2)] == [None]


def test_retry_and_async_body_keep_the_end_user(worker: Any, oracle_server: Any) -> None:
    jobs = worker.jobs
    retried, asynchronous = new_tag(), new_tag()
    with deepsec.end_user(TOKENS["user06"]):
        first = jobs.retry_once.delay(retried)
        second = jobs.async_whoami.delay(asynchronous)
    assert first.get(timeout=TIMEOUT) == "user06"
    assert second.get(timeout=TIMEOUT) == "user06"
    assert [username(s) for s in statements(oracle_server, retried)] == ["user06", "user06"]
    assert [username(s) for s in statements(oracle_server, asynchronous)] == ["user06"]


def test_no_end_user_runs_with_none_and_no_warning(worker: Any, oracle_server: Any) -> None:
    t = new_tag()
    result = worker.jobs.whoami.delay(t)
    assert result.get(timeout=TIMEOUT) is None
    assert [s.context for s in statements(oracle_server, t)] == [None]
    warned = [line for line in worker.log().splitlines() if "WARNING" in line and result.id in line]
    assert warned == []


# -- messages published by hand: a broker writer's view --------------------------------


def publish_by_hand(
    jobs: Any,
    task_id: str,
    tag: str,
    header: Any,
    *,
    chain: list[Any] | None = None,
    extra_embed: dict[str, Any] | None = None,
) -> None:
    """Publish a protocol-2 message the way a broker writer could, bypassing Celery's signals."""
    app = jobs.app
    name = jobs.whoami.name
    headers, properties, body, _ = app.amqp.as_task_v2(task_id, name, args=(tag,), chain=chain)
    if extra_embed:
        args, kwargs, embed = body
        body = (args, kwargs, {**embed, **extra_embed})
    if header is not None:
        headers[HEADER] = header
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=app.conf.task_default_queue,
            headers=headers,
            serializer="json",
            **properties,
        )


def genuine_header(jobs: Any, tag: str, identity: Any) -> tuple[str, Any]:
    """A header signed by Celery's real publish path as ``identity``, for ``whoami(tag)``.

    The message goes to a queue no worker reads: the test then resends the
    header the way a broker writer who copied it could.
    """
    from celery import signals

    captured: dict[str, Any] = {}

    def grab(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        if sender == jobs.whoami.name and headers and HEADER in headers:
            captured.update(headers)

    signals.before_task_publish.connect(grab, weak=False)
    try:
        with deepsec.end_user(identity):
            jobs.whoami.apply_async((tag,), queue=f"nowhere-{new_tag()}", ignore_result=True)
    finally:
        signals.before_task_publish.disconnect(grab)
    return str(captured["id"]), captured[HEADER]


def signed(jobs: Any, task_id: str, tag: str, ctx: Any, **kw: Any) -> dict[str, Any]:
    """A header signed with the app's key for ``whoami(tag)`` (what only a key holder can make)."""
    key = kw.pop("key", derive_key(jobs.SIGNING_KEY))
    name = kw.pop("name", jobs.whoami.name)
    issued_at = kw.pop("issued_at", time.time())
    return sign(key, task_id, name, ctx, body_digest((tag,), {}, None), issued_at)


def test_forged_tampered_foreign_moved_swapped_and_old_headers_never_become_an_end_user(
    worker: Any, oracle_server: Any
) -> None:
    jobs = worker.jobs
    alice = deepsec.EndUserContext(user_token("alice"), data_roles=["admin"])
    cases: dict[str, Any] = {}

    def case(label: str, header_for: Any, **publish: Any) -> None:
        task_id, tag = str(uuid.uuid4()), new_tag()
        cases[label] = (task_id, tag, header_for(task_id, tag), publish)

    case("missing", lambda tid, tag: None)
    case("garbage", lambda tid, tag: "alice")

    def unsigned(tid: str, tag: str) -> Any:
        return {k: v for k, v in signed(jobs, tid, tag, alice).items() if k != "sig"}

    case("unsigned", unsigned)

    def tampered(tid: str, tag: str) -> Any:
        header = signed(jobs, tid, tag, deepsec.EndUserContext(("bob", None)))
        header["end_user"] = header["end_user"].replace("bob", "alice")
        return header

    case("tampered", tampered)
    case(
        "foreign",
        lambda tid, tag: signed(jobs, tid, tag, alice, key=derive_key("another-apps-key-0123456")),
    )
    case("moved", lambda tid, tag: signed(jobs, str(uuid.uuid4()), tag, alice))
    case("other task", lambda tid, tag: signed(jobs, tid, tag, alice, name="jobs_app.other"))
    case("old", lambda tid, tag: signed(jobs, tid, tag, alice, issued_at=time.time() - 7 * 3600))
    # A message claiming to be an eager run (Celery lets the body set is_eager).
    case("claims eager", lambda tid, tag: None, extra_embed={"is_eager": True})

    for task_id, tag, header, publish in cases.values():
        publish_by_hand(jobs, task_id, tag, header, **publish)
    # alice's genuine header, resent on the same task id with other arguments.
    swapped_id, genuine = genuine_header(jobs, new_tag(), alice.identity)
    swapped_tag = new_tag()
    publish_by_hand(jobs, swapped_id, swapped_tag, genuine)
    cases["swapped body"] = (swapped_id, swapped_tag, genuine, {})

    wait_statements(oracle_server, {tag: 1 for _, tag, _, _ in cases.values()})
    for label, (_, tag, _, _) in cases.items():
        assert [s.context for s in statements(oracle_server, tag)] == [None], label

    log = worker.log()
    for label, (task_id, _, _, _) in cases.items():
        warnings = [line for line in log.splitlines() if "WARNING" in line and task_id in line]
        assert len(warnings) == 1, (label, warnings)
        assert "runs with no end user" in warnings[0]
    assert "was made for another message" in log
    assert "bad signature" in log
    assert "does not match the message body" in log
    assert "older than the maximum age" in log
    assert user_token("alice").split(".")[1] not in log


def test_a_chain_injected_into_a_genuine_message_runs_as_nobody(
    worker: Any, oracle_server: Any
) -> None:
    # The reviewer's attack: alice's genuine header on a harmless task, resent
    # with the same id and a chain appended.  Celery publishes the chain step
    # from inside the task's scope; it must not be signed as alice.
    jobs = worker.jobs
    tag, injected = new_tag(), new_tag()
    task_id, genuine = genuine_header(jobs, tag, user_token("alice"))
    publish_by_hand(jobs, task_id, tag, genuine, chain=[dict(jobs.whoami.si(injected))])
    wait_statements(oracle_server, {tag: 1, injected: 1})
    assert [username(s) for s in statements(oracle_server, tag)] == [None]
    assert [username(s) for s in statements(oracle_server, injected)] == [None]
    log = worker.log()
    assert "whose own end user was refused" in log


# -- expired tokens --------------------------------------------------------------------


def test_an_expired_token_fails_the_task_before_any_statement(
    worker: Any, oracle_server: Any
) -> None:
    import spi_static

    expired = spi_static.make_jwt(
        {"sub": "dora", "preferred_username": "dora", "exp": int(time.time()) - 600}
    )
    t = new_tag()
    with deepsec.end_user(expired):
        result = worker.jobs.whoami_autoretry.delay(t)  # autoretry_for=(Exception,)
    with pytest.raises(EndUserExpired) as info:
        result.get(timeout=TIMEOUT)
    assert result.state == "FAILURE"
    assert expired not in str(info.value) and "dora" not in str(info.value)
    time.sleep(0.5)  # a retry would have been queued by now
    assert statements(oracle_server, t) == []
    log = worker.log()
    assert not [line for line in log.splitlines() if result.id in line and "Retry in" in line]
    assert expired.split(".")[1] not in log


def test_the_worker_log_holds_no_token_or_key(worker: Any) -> None:
    log = worker.log()
    assert worker.jobs.SIGNING_KEY not in log
    for token in TOKENS.values():
        assert token.split(".")[1] not in log
    # Every traceback in the log is a task failed on purpose by deepsec.celery.
    expected = ("deepsec.celery.errors.EndUserExpired:",)
    for chunk in log.split("Traceback (most recent call last):")[1:]:
        last = next(line for line in chunk.splitlines() if line and not line[0].isspace())
        assert last.startswith(expected), last
