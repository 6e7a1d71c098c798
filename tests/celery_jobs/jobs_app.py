"""The Celery app of the Celery tests; its worker runs as ``celery -A jobs_app worker``.

Configured from ``DEEPSEC_TEST_*`` environment variables so a worker process
reaches the test process's Redis and Oracle wire test server:
``DEEPSEC_TEST_BROKER`` (Redis URL, also the result backend),
``DEEPSEC_TEST_DSN`` and ``DEEPSEC_TEST_CA`` (the wire server's DSN and CA
PEM file).  Every statement is tagged ``/* req-<tag> */`` so the test can tie
what the wire server recorded to the task that ran it.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

import oracledb
from celery import Celery, chord, group

import deepsec
import deepsec.celery

SIGNING_KEY = "celery-test-signing-key-0123456789abcdef"
USER = "app_user"
PASSWORD = "app_password"
WHOAMI = "select xs_sys_context('xs$session','username') from dual"
SEC_PARAMS = {"spi_type": "spi_static", "client_id": "celery-app"}

broker = os.environ.get("DEEPSEC_TEST_BROKER", "memory://")
app = Celery("jobs_app", broker=broker, backend=os.environ.get("DEEPSEC_TEST_BROKER"))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("DEEPSEC_TEST_QUEUE", "deepsec-tests"),
    result_expires=600,
)
deepsec.celery.install(app, signing_key=SIGNING_KEY)

_pools: dict[int, Any] = {}
_lock = threading.Lock()


def connect_kwargs() -> dict[str, Any]:
    """Where the wire server is (from the environment), with deepsec's params."""
    return {
        "user": USER,
        "password": PASSWORD,
        "dsn": os.environ["DEEPSEC_TEST_DSN"],
        "ssl_context": ssl.create_default_context(cafile=os.environ["DEEPSEC_TEST_CA"]),
        "extra_auth_params": {"end_user_sec_params": dict(SEC_PARAMS)},
    }


def pool() -> oracledb.ConnectionPool:
    """This process's pool (a prefork child makes its own after the fork)."""
    pid = os.getpid()
    with _lock:
        if pid not in _pools:
            _pools[pid] = oracledb.create_pool(min=0, max=4, **connect_kwargs())
        return _pools[pid]


def run_tagged(tag: str) -> str | None:
    """Run the tagged WHOAMI once; the end user the database answered."""
    with pool().acquire() as conn, conn.cursor() as cur:
        cur.execute(f"{WHOAMI} /* req-{tag} */")
        row = cur.fetchone()
        return row[0] if row else None


@app.task
def whoami(tag: str) -> str | None:
    return run_tagged(tag)


@app.task
def whoami_after(_previous: Any, tag: str) -> str | None:
    """A chain or chord step: ignores what the previous step returned."""
    return run_tagged(tag)


@app.task
def whoami_then_publish(tag: str, child_tag: str) -> str:
    """Run as the end user, then queue a task from inside this one."""
    run_tagged(tag)
    return str(whoami.delay(child_tag).id)


@app.task
def canvas(tag: str) -> list[str]:
    """Publish a chain, a group and a chord from inside a task (the worker is the publisher)."""
    ids = [
        (whoami.si(f"{tag}-c1") | whoami_after.s(f"{tag}-c2")).apply_async().id,
        group(whoami.si(f"{tag}-g1"), whoami.si(f"{tag}-g2")).apply_async().id,
        chord([whoami.si(f"{tag}-h1"), whoami.si(f"{tag}-h2")], whoami_after.s(f"{tag}-b"))
        .apply_async()
        .id,
    ]
    return [str(i) for i in ids]


@app.task(bind=True, max_retries=1)
def retry_once(self: Any, tag: str) -> str | None:
    """A statement, a retry, a statement: the retried run keeps the end user."""
    user = run_tagged(tag)
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return user


@app.task(autoretry_for=(Exception,), max_retries=5, retry_backoff=False, default_retry_delay=0)
def whoami_autoretry(tag: str) -> str | None:
    """Would be retried on any error raised by its body."""
    return run_tagged(tag)


@app.task
def async_whoami(tag: str) -> str | None:
    """An asyncio task body: an async connection, run with deepsec.celery.run_async."""

    async def body() -> str | None:
        conn = await oracledb.connect_async(**connect_kwargs())
        try:
            cur = conn.cursor()
            await cur.execute(f"{WHOAMI} /* req-{tag} */")
            row = await cur.fetchone()
            return row[0] if row else None
        finally:
            await conn.close()

    return deepsec.celery.run_async(body())
