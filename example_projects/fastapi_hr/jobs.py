"""Background jobs of fastapi_hr: a Celery task that runs as the end user who queued it.

``POST /api/exports`` queues :func:`export_employees` while the request's end
user is current; ``deepsec.celery`` signs that end user into the message and
the worker runs the task as them, so the export sees exactly the rows the
requester may see.  ``GET /api/exports/<task id>`` returns the result.

Configuration (environment):

* ``HR_CELERY_BROKER``: the broker URL (e.g. ``redis://host:6379/0``), also the
  result backend.  Default ``memory://``: an in-process broker served by an
  embedded worker thread -- for the demo and tests only.
* ``HR_CELERY_SIGNING_KEY``: the key that signs end users into messages; every
  web process and worker needs the same one.  Required with a real broker;
  with ``memory://`` publisher and worker are this process, so a random key
  is made per process.

A real worker: ``celery -A fastapi_hr.jobs worker`` (from ``example_projects/``,
with the same ``HR_*`` variables as the web app).
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import Any

import oracledb
from celery import Celery
from hr_common import EMPLOYEES_SQL, USERNAME_SQL
from hr_common.settings import HRSettings

import deepsec.celery

BROKER = os.environ.get("HR_CELERY_BROKER", "memory://")
EMBEDDED = BROKER.startswith("memory://")

celery_app = Celery(
    "fastapi_hr",
    broker=BROKER,
    backend="cache+memory://" if EMBEDDED else BROKER,
)
celery_app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_transport_options={"polling_interval": 0.05},
)
_key = os.environ.get("HR_CELERY_SIGNING_KEY") or (secrets.token_urlsafe(32) if EMBEDDED else None)
# No key with a real broker: install() raises deepsec.ConfigError, naming what to set.
deepsec.celery.install(celery_app, signing_key=_key)

_settings: HRSettings | None = None
_pool: oracledb.ConnectionPool | None = None
_lock = threading.Lock()


def configure(settings: HRSettings) -> None:
    """Use these settings for the task's database pool (default: ``HR_*`` of the worker)."""
    global _settings, _pool
    with _lock:
        if settings != _settings:
            _settings, _pool = settings, None  # the next task opens a pool with these


def _database() -> oracledb.ConnectionPool:
    global _pool
    with _lock:
        if _pool is None:
            cfg = _settings or HRSettings.from_env()
            _pool = oracledb.create_pool(
                **cfg.pool_params(),
                min=0,
                max=2,
            )
        return _pool


@celery_app.task
def export_employees() -> dict[str, Any]:
    """The employees the task's end user may see (the queued request's end user)."""
    with _database().acquire() as conn, conn.cursor() as cursor:
        cursor.execute(USERNAME_SQL)
        row = cursor.fetchone()
        cursor.execute(EMPLOYEES_SQL)
        rows = cursor.fetchall()
    return {
        "db_user": row[0] if row else None,
        "employees": [{"name": n, "department": d, "salary": int(s)} for n, d, s in rows],
    }


_worker_started = False


def ensure_worker() -> None:
    """With ``memory://``, start the embedded worker thread once (threads pool)."""
    global _worker_started
    with _lock:
        if _worker_started or not EMBEDDED:
            return
        # The worker's threads look tasks up in the default app.
        celery_app.set_default()
        worker = celery_app.WorkController(
            pool="threads",
            concurrency=2,
            loglevel="WARNING",
            hostname="fastapi_hr-embedded@localhost",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        threading.Thread(target=worker.start, name="celery-embedded", daemon=True).start()
        _worker_started = True


def run_demo_jobs(env: Any, base_url: str) -> list[Any]:
    """For ``python -m deepsec.demo``: queue an export as alice and as nobody, report each."""
    import time

    import httpx

    from deepsec.demo import DEMO_DATA_ROLES, RequestReport, _collect, visible_employees

    reports = []
    for user in ("alice", None):
        expected = env.expected_db_user(user) if user else None
        headers = {"Authorization": f"Bearer {env.user_token(user)}"} if user else {}
        label = f"{user or 'nobody'} (Celery task)"
        report = RequestReport(label, "POST", "/api/exports", expected)
        mark = env.oracle.mark()
        with httpx.Client(base_url=base_url, timeout=20.0, headers=headers) as client:
            task_id = client.post("/api/exports").json()["task_id"]
            deadline = time.monotonic() + 20
            while True:
                answer = client.get(f"/api/exports/{task_id}")
                body = answer.json()
                if body.get("state") in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        report.status = answer.status_code
        report.page_user = body.get("db_user")
        report.rows_seen = [e.get("name") for e in body.get("employees", [])]
        _collect(report, env.oracle.round_trips(since=mark), DEMO_DATA_ROLES, env.client_id)
        expected_rows = visible_employees(expected)
        if report.rows_seen != expected_rows:
            report.problems.append(f"rows {report.rows_seen}, expected {expected_rows}")
        reports.append(report)
    return reports
