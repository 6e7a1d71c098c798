"""fastapi_hr's Celery export: queued by a request, run by a worker as that request's end user."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hr_common.testing import contexts_since

pytestmark = pytest.mark.timeout(60)


def run_export(client: Any, headers: dict[str, str]) -> dict[str, Any]:
    queued = client.post("/api/exports", headers=headers)
    assert queued.status_code == 202
    task_id = queued.json()["task_id"]
    deadline = time.monotonic() + 20
    while True:
        body = client.get(f"/api/exports/{task_id}", headers=headers).json()
        if body["state"] in ("SUCCESS", "FAILURE"):
            return {**body, "task_id": task_id}
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_the_export_runs_as_the_user_who_queued_it(client: Any, hr_env: Any) -> None:
    mark = hr_env.oracle.mark()
    body = run_export(client, {"Authorization": f"Bearer {hr_env.user_token('carol')}"})
    assert body["state"] == "SUCCESS"
    assert body["db_user"] == "carol@example.test"
    assert len(body["employees"]) == 4
    contexts = contexts_since(hr_env, mark)
    assert len(contexts) == 3  # the export's two statements, the status check's one
    assert all(c is not None and c.username == "carol@example.test" for c in contexts)
    assert all(c.data_roles == ("hr_viewer",) for c in contexts)
    assert all(c.attributes.get("channel") in ("api", ["api"]) for c in contexts)


def test_an_export_queued_by_nobody_runs_as_nobody(client: Any, hr_env: Any) -> None:
    mark = hr_env.oracle.mark()
    body = run_export(client, {})
    assert body["state"] == "SUCCESS"
    assert body["db_user"] is None
    contexts = contexts_since(hr_env, mark)
    assert contexts == [None, None, None]


def test_an_export_is_only_returned_to_the_user_who_queued_it(client: Any, hr_env: Any) -> None:
    alice = {"Authorization": f"Bearer {hr_env.user_token('alice')}"}
    body = run_export(client, alice)
    assert body["state"] == "SUCCESS" and body["employees"]
    task_id = body["task_id"]
    for other in ({"Authorization": f"Bearer {hr_env.user_token('carol')}"}, {}):
        answer = client.get(f"/api/exports/{task_id}", headers=other)
        assert answer.status_code == 404
        assert "employees" not in answer.text
