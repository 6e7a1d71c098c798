"""The demo's scripted requests: each signed-in user gets different rows back (FastAPI example)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from deepsec import telemetry
from deepsec.demo import (
    EMPLOYEES,
    DemoEnvironment,
    format_reports,
    hr_row_policy,
    run_scenario,
    serve_app,
    visible_employees,
)
from deepsec.testing.oracle import WireContext

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def env() -> Iterator[DemoEnvironment]:
    with DemoEnvironment() as environment:
        yield environment


def test_the_demo_grant_is_shaped_like_a_dds_grant() -> None:
    row = {"name": "alice"}

    def ctx(user: str, roles: list[str] | None = None) -> WireContext:
        return WireContext(end_user_name=user, data_roles=tuple(roles) if roles else None)

    assert not hr_row_policy(None, row)  # no end user
    assert not hr_row_policy(WireContext(), row)  # a context without a user
    assert hr_row_policy(ctx("alice@example.test"), row)  # own row
    assert not hr_row_policy(ctx("bob@example.test"), row)
    # The requested role counts only for a user it is granted to.
    assert not hr_row_policy(ctx("bob@example.test", ["hr_viewer"]), row)
    assert hr_row_policy(ctx("carol@example.test", ["hr_viewer"]), row)
    assert not hr_row_policy(ctx("carol@example.test"), row)


def test_demo_scenario_shows_different_rows_per_user(
    env: DemoEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.environ().items():
        monkeypatch.setenv(key, value)
    served = serve_app("fastapi", 0)
    try:
        with telemetry.collect_summary() as summary:
            reports = run_scenario(env, served.base_url)
    finally:
        served.stop()
    assert all(r.ok for r in reports), format_reports(reports)
    rows = {(r.label.split()[0], r.path): r.rows_seen for r in reports}
    everyone = [e[0] for e in EMPLOYEES]
    for path in ("/", "/api/employees"):
        assert rows[("alice", path)] == ["alice"]
        assert rows[("bob", path)] == ["bob"]
        assert rows[("carol", path)] == everyone
        assert rows[("nobody", path)] == []
    assert visible_employees(None) == []
    table = format_reports(reports)
    assert "rows the database returned" in table
    assert "alice, bob, carol, dave" in table and "(none)" in table
    # The metrics summary printed after the table (the demo's MSAL client_credentials
    # token: fetched once, then served from the in-process cache).
    text = summary()
    fetched = re.search(r"tokens fetched\s+: (\d+) identity-provider call", text)
    cached = re.search(r"token lookups\s+: (\d+) from the in-process cache", text)
    assert fetched is not None and cached is not None, text
    assert int(fetched[1]) >= 1 and int(cached[1]) >= 1, text
    contexts = re.search(r"contexts\s+: (\d+) set, (\d+) switched, (\d+) cleared", text)
    assert contexts is not None and int(contexts[1]) >= 1, text
    assert "rejected requests  : 0" in text
