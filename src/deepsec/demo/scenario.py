"""The scripted requests: sign in as each demo user, call the app, check what the database saw.

:func:`run_scenario` compares, per request, the wire server's records (the
database user, context kind, data roles, the app's access token) and the
rows the page shows with what :func:`~deepsec.demo.hr.visible_employees` expects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .environment import DemoEnvironment
from .hr import DEMO_DATA_ROLES, DEMO_USERS, visible_employees


@dataclass
class RequestReport:
    """What the database received for one HTTP request."""

    label: str
    method: str
    path: str
    expected_user: str | None
    status: int = 0
    db_users: list[str | None] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    data_roles: list[tuple[str, ...] | None] = field(default_factory=list)
    attributes: list[dict[str, Any]] = field(default_factory=list)
    app_tokens: list[str | None] = field(default_factory=list)
    statements: int = 0
    page_user: str | None = None
    rows_seen: list[str] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every statement carried the expected context."""
        return not self.problems


def _collect(
    report: RequestReport,
    trips: Sequence[Any],
    expected_roles: tuple[str, ...],
    client_id: str,
) -> None:
    statements = [t for t in trips if t.is_statement]
    report.statements = len(statements)
    if not statements:
        report.problems.append("no statement reached the database")
    for trip in statements:
        ctx = trip.context
        if ctx is None:
            report.db_users.append(None)
            report.kinds.append("none")
            report.data_roles.append(None)
            report.attributes.append({})
            report.app_tokens.append(None)
        else:
            report.db_users.append(ctx.username)
            report.kinds.append(ctx.kind)
            report.data_roles.append(ctx.data_roles)
            report.attributes.append(dict(ctx.attributes))
            # The database-access token MSAL got for the app: show whose it is.
            sub = ctx.database_access_claims.get("sub")
            report.app_tokens.append(sub if isinstance(sub, str) else "?")
    expected = report.expected_user
    if any(u != expected for u in report.db_users):
        report.problems.append(
            f"database saw {sorted({str(u) for u in report.db_users})}, expected {expected}"
        )
    if expected is not None:
        if any(k != "token" for k in report.kinds):
            report.problems.append("a statement ran without the end user's token context")
        if any(r != expected_roles for r in report.data_roles):
            report.problems.append("data roles differ from the configured ones")
        if any(t != client_id for t in report.app_tokens):
            report.problems.append("the database-access token is not the app's (MSAL) token")
    if report.status != 200:
        report.problems.append(f"HTTP status {report.status}")
    if report.page_user != expected:
        report.problems.append(f"the app reported {report.page_user!r} as the database user")


def run_scenario(env: DemoEnvironment, base_url: str) -> list[RequestReport]:
    """Sign in as alice, bob and carol (cookie and bearer), call as nobody; report each."""
    import httpx

    reports: list[RequestReport] = []
    server = env.oracle

    def record(
        label: str,
        client: httpx.Client,
        path: str,
        expected: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        report = RequestReport(label, "GET", path, expected)
        mark = server.mark()
        response = client.get(path, headers=dict(headers or {}))
        report.status = response.status_code
        trips = server.round_trips(since=mark)
        if response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
            report.page_user = body.get("db_user")
            report.rows_seen = [e.get("name") for e in body.get("employees", [])]
        else:
            found = re.search(r'data-db-user="([^"]*)"', response.text)
            report.page_user = (found.group(1) or None) if found else "<not shown>"
            report.rows_seen = re.findall(r"<tr><td>([^<]*)</td>", response.text)
        _collect(report, trips, DEMO_DATA_ROLES, env.client_id)
        expected_rows = visible_employees(expected)
        if report.rows_seen != expected_rows:
            report.problems.append(f"rows {report.rows_seen}, expected {expected_rows}")
        reports.append(report)

    timeout = httpx.Timeout(20.0)
    for user in DEMO_USERS:
        expected = env.expected_db_user(user)
        with httpx.Client(base_url=base_url, timeout=timeout) as browser:
            form = {"user": user}
            page = browser.get("/signin")
            csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            if csrf:  # Django's CSRF protection
                form["csrfmiddlewaretoken"] = csrf.group(1)
            signin = browser.post("/signin", data=form)
            if signin.status_code not in (200, 302, 303):
                raise RuntimeError(f"sign-in as {user} failed with HTTP {signin.status_code}")
            record(f"{user} (identity cookie)", browser, "/", expected)
        with httpx.Client(base_url=base_url, timeout=timeout) as api:
            token = env.user_token(user)
            record(
                f"{user} (Bearer token)",
                api,
                "/api/employees",
                expected,
                {"Authorization": f"Bearer {token}"},
            )
    with httpx.Client(base_url=base_url, timeout=timeout) as anonymous:
        record("nobody (no identity)", anonymous, "/", None)
        record("nobody (no identity)", anonymous, "/api/employees", None)
    return reports
