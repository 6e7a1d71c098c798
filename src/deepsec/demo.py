"""``python -m deepsec.demo``: the whole story on one machine, in a few seconds.

It starts, on ``127.0.0.1`` and sharing one throw-away test CA:

* the local HTTPS identity provider (:class:`deepsec.testing.idp.LocalIdP`),
  from which real MSAL gets the application's database-access token
  (``spi_type="azure_tokens"``, ``auth_flow="client_credentials"``);
* a **development-only** sign-in endpoint, ``GET /dev/token?user=alice``,
  that hands out an end-user token signed by that identity provider (a real
  deployment signs users in with the provider's own login flow instead);
* the Oracle wire test server (:class:`deepsec.testing.oracle.OracleTestServer`)
  over TCPS, with the canned HR table ``employees`` and a row policy shaped like
  a Deep Data Security grant (:func:`hr_row_policy`: no end user, no rows; an
  employee, their own row; the ``hr_viewer`` data role, every row) -- an
  emulation for the demo, not Oracle's policy language;
* one example application from ``example_projects/`` (FastAPI under uvicorn by
  default; ``--app flask`` or ``--app django`` under waitress), configured only
  through the ``HR_*`` environment variables.

It then signs in as alice, bob and carol (identity cookie and
``Authorization: Bearer``) and calls the app as nobody, and prints, from the
wire server's records, what the database received with each request and which
rows came back.  It exits non-zero
when any request did not reach the database with the expected context.  Unless
``--no-serve`` is given it then keeps everything running for a browser.

:class:`DemoEnvironment` (the servers and the ``HR_*`` variables) is reused by
the example projects' tests.  No token or secret is ever printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import telemetry

__all__ = [
    "DATA_ROLE_GRANTS",
    "DEMO_USERS",
    "EMPLOYEES",
    "EMPLOYEE_COLUMNS",
    "DemoEnvironment",
    "RequestReport",
    "ServedApp",
    "example_projects_dir",
    "hr_row_policy",
    "main",
    "run_scenario",
    "serve_asgi",
    "serve_wsgi",
    "visible_employees",
]

#: Users the sign-in pages offer.
DEMO_USERS: tuple[str, ...] = ("alice", "bob", "carol")
#: Columns of the canned ``employees`` table.
EMPLOYEE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "varchar"),
    ("department", "varchar"),
    ("salary", "number"),
)
#: Rows of the canned ``employees`` table (what :func:`hr_row_policy` filters).
EMPLOYEES: tuple[tuple[str, str, int], ...] = (
    ("alice", "Engineering", 9800),
    ("bob", "Sales", 7200),
    ("carol", "Human Resources", 8900),
    ("dave", "Engineering", 6500),
)
#: Data roles the example apps configure in ``end_user_sec_params``.
DEMO_DATA_ROLES: tuple[str, ...] = ("hr_viewer",)
#: Who the emulated database grants each data role to.  The apps ask for
#: ``hr_viewer`` for everyone; as in Deep Data Security, a requested data role
#: counts only for an end user it is granted to.
DATA_ROLE_GRANTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {"hr_viewer": frozenset({"carol@example.test"})}
)


def hr_row_policy(context: Any, row: Mapping[str, Any]) -> bool:
    """The demo database's grant on ``employees``, for the wire test server's ``row_policy``.

    Shaped like a typical Deep Data Security grant: no end user sees no rows;
    an end user holding the ``hr_viewer`` data role (requested by the app and
    granted in :data:`DATA_ROLE_GRANTS`) sees every row; any other end user
    sees only their own row (``name`` is the part of the user name before
    ``@``).  An emulation for the demo and tests, not Oracle's policy language.
    """
    user = getattr(context, "username", None)
    if not user:
        return False
    requested = getattr(context, "data_roles", None) or ()
    if any(user in DATA_ROLE_GRANTS.get(role, ()) for role in requested):
        return True
    return bool(row["name"] == user.partition("@")[0])


def visible_employees(db_user: str | None) -> list[str]:
    """The names :func:`hr_row_policy` shows ``db_user`` (the apps request ``hr_viewer``)."""
    from types import SimpleNamespace

    context = SimpleNamespace(username=db_user, data_roles=DEMO_DATA_ROLES)
    return [
        name
        for name, department, salary in sorted(EMPLOYEES)
        if hr_row_policy(context, {"name": name, "department": department, "salary": salary})
    ]


def example_projects_dir() -> Path | None:
    """The repository's ``example_projects`` folder, when running from a checkout."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "example_projects"
        if candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------
# Development sign-in endpoint
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The servers an example app needs
# ---------------------------------------------------------------------------


class DemoEnvironment:
    """The local identity provider (with its dev sign-in endpoint) and the wire server.

    Use as a context manager.  :meth:`environ` gives the ``HR_*`` variables
    the example apps read; :meth:`apply_environ` sets them in ``os.environ``.
    The client secret and database password are random per run and never
    printed.
    """

    def __init__(self, *, app_name: str = "hr-app") -> None:
        from .testing.idp import LocalIdP
        from .testing.oracle import OracleTestServer
        from .testing.tls import TestCA

        self.ca = TestCA()
        self.client_id = app_name
        self._client_secret = secrets.token_urlsafe(24)
        self.db_user = "hr_app"
        self._db_password = secrets.token_urlsafe(16)
        self.idp = LocalIdP(
            tenant="hr-tenant", clients={self.client_id: self._client_secret}, ca=self.ca
        )
        self.oracle = OracleTestServer(
            users={self.db_user: self._db_password}, ca=self.ca, row_policy=hr_row_policy
        )

    def start(self) -> DemoEnvironment:
        """Start every server and create the canned HR table."""
        self.idp.start()
        self.oracle.start()
        self.seed()
        return self

    def seed(self) -> None:
        """(Re)create the canned ``employees`` table and its row policy on the wire server."""
        self.oracle.add_table("employees", EMPLOYEE_COLUMNS, EMPLOYEES)
        self.oracle.row_policy = hr_row_policy

    def stop(self) -> None:
        """Stop every server and remove the CA directory."""
        self.oracle.stop()
        self.idp.stop()
        self.ca.close()

    def __enter__(self) -> DemoEnvironment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def environ(self) -> dict[str, str]:
        """The ``HR_*`` variables that point an example app at these servers."""
        assert self.idp.running, "start() first"
        return {
            "HR_DB_DSN": self.oracle.dsn,
            "HR_DB_USER": self.db_user,
            "HR_DB_PASSWORD": self._db_password,
            "HR_DB_CA_FILE": str(self.ca.ca_pem_path),
            "HR_IDP_AUTHORITY": self.idp.authority,
            "HR_IDP_CA_FILE": str(self.ca.ca_pem_path),
            "HR_CLIENT_ID": self.client_id,
            "HR_CLIENT_SECRET": self._client_secret,
            "HR_DB_SCOPES": "api://oracle-db/.default",
            "HR_DATA_ROLES": ",".join(DEMO_DATA_ROLES),
            "HR_DEV_SIGNIN_URL": self.idp.dev_signin_url,
        }

    def apply_environ(self) -> None:
        """Set :meth:`environ` in ``os.environ``."""
        os.environ.update(self.environ())

    def user_token(self, user: str) -> str:
        """An end-user token for ``user`` (what the dev sign-in endpoint returns)."""
        return self.idp.issue_user_token(user)

    @staticmethod
    def expected_db_user(user: str) -> str:
        """What ``xs_sys_context('xs$session','username')`` answers for ``user``."""
        return f"{user}@example.test"


# ---------------------------------------------------------------------------
# Example apps, served on 127.0.0.1
# ---------------------------------------------------------------------------


class ServedApp:
    """An app served over HTTP on 127.0.0.1 (:func:`serve_asgi`, :func:`serve_wsgi`)."""

    def __init__(self, name: str, port: int, stop: Any, thread: threading.Thread) -> None:
        self.name = name
        self.port = port
        self._stop = stop
        self._thread = thread

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        self._stop()
        self._thread.join(10)


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the example app did not start listening on port {port}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_or_free(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1, else a free port (0: a free port)."""
    import socket

    if port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                print(f"  (port {port} is in use; using a free port instead)")
            else:
                return port
    return _free_port()


def _import_example(module: str) -> Any:
    import importlib

    folder = example_projects_dir()
    if folder is None:
        raise SystemExit(
            "example_projects/ not found: run the demo from a checkout of the repository"
        )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(module)


def serve_asgi(app: Any, port: int = 0, label: str = "ASGI app") -> ServedApp:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (lifespan on)."""
    import uvicorn

    port = port or _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True

    _wait_listening(port)
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return ServedApp(label, port, stop, thread)


def serve_wsgi(app: Any, port: int = 0, label: str = "WSGI app") -> ServedApp:
    """Serve a WSGI app with waitress on 127.0.0.1 in a daemon thread."""
    from waitress.server import create_server  # type: ignore[import-untyped]

    port = port or _free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=8)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    _wait_listening(port)
    return ServedApp(label, port, server.close, thread)


def serve_app(app_name: str, port: int = 0) -> ServedApp:
    """Serve the ``fastapi``, ``flask`` or ``django`` example on 127.0.0.1 (HR_* must be set)."""
    port = _port_or_free(port)
    if app_name == "fastapi":
        app = _import_example("fastapi_hr").create_app()
        return serve_asgi(app, port, "fastapi_hr (FastAPI, uvicorn)")
    if app_name == "flask":
        app = _import_example("flask_hr").create_app()
        return serve_wsgi(app, port, "flask_hr (Flask, waitress)")
    if app_name == "django":
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_hr.settings")
        _import_example("django_hr")
        from django.core.wsgi import get_wsgi_application

        return serve_wsgi(get_wsgi_application(), port, "django_hr (Django, waitress)")
    raise ValueError(f"unknown app {app_name!r}: fastapi, flask or django")


# ---------------------------------------------------------------------------
# The scripted requests and the report
# ---------------------------------------------------------------------------


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


def _fmt_roles(values: Sequence[tuple[str, ...] | None]) -> str:
    shown = {",".join(v) if v else "-" for v in values}
    return " | ".join(sorted(shown)) or "-"


def _fmt_attrs(values: Sequence[Mapping[str, Any]]) -> str:
    shown = {
        ", ".join(f"{k}={_attr_value(v)}" for k, v in sorted(a.items())) or "-" for a in values
    }
    return " | ".join(sorted(shown)) or "-"


def _attr_value(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return str(value)


def format_reports(reports: Sequence[RequestReport]) -> str:
    """The table the demo prints (no token or secret in it)."""
    headers = (
        "request",
        "GET",
        "db user (xs$session)",
        "context",
        "access token of",
        "data roles",
        "attributes",
        "stmts",
        "rows the database returned",
        "",
    )
    rows = []
    for r in reports:
        users = sorted({u or "-" for u in r.db_users}) or ["-"]
        kinds = sorted(set(r.kinds)) or ["-"]
        attached = "attached (" + ",".join(kinds) + ")" if r.expected_user else ",".join(kinds)
        if not r.expected_user and kinds == ["none"]:
            attached = "none"
        rows.append(
            (
                r.label,
                r.path,
                ",".join(users),
                attached,
                ",".join(sorted({t or "-" for t in r.app_tokens})) or "-",
                _fmt_roles(r.data_roles),
                _fmt_attrs(r.attributes),
                str(r.statements),
                ", ".join(r.rows_seen) if r.rows_seen else "(none)",
                "ok" if r.ok else "FAIL",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in reports:
        for problem in r.problems:
            out.append(f"FAIL {r.label} {r.path}: {problem}")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepsec.demo",
        description="Run an example HR app against a local identity provider and Oracle wire "
        "test server, show what the database receives per request, then keep serving.",
        # ./run picks the packages to install from the literal --app flag: an
        # abbreviation (--ap flask) would get the demo's set and fail to import.
        allow_abbrev=False,
    )
    parser.add_argument(
        "--no-serve", action="store_true", help="run the scripted requests and exit (CI)"
    )
    parser.add_argument(
        "--app",
        choices=("fastapi", "flask", "django"),
        default="fastapi",
        help="which example to run (default: fastapi)",
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    return parser.parse_args(argv)


def _wait_forever() -> None:
    import signal

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop cleanly (servers stopped, CA files removed).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    import logging

    logging.getLogger("deepsec").setLevel(logging.ERROR)
    yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when every request reached the database as expected."""
    args = _parse_args(argv)
    print("deepsec demo: starting the local identity provider and Oracle wire test server...")
    with _quiet_logs(), DemoEnvironment() as env:
        env.apply_environ()
        try:
            served = serve_app(args.app, args.port)
        except OSError as exc:
            print(f"error: cannot serve on port {args.port}: {exc}", file=sys.stderr)
            return 1
        except ImportError as exc:
            # The `demo` extra carries only the FastAPI example's dependencies.
            print(
                f"error: the {args.app} example needs {exc.name or 'a package'}: "
                "./run demo --app " + args.app + " installs it (pip install -e '.[test]')",
                file=sys.stderr,
            )
            return 1
        try:
            print(f"  identity provider : {env.idp.authority} (MSAL client_credentials)")
            print(f"  dev sign-in       : {env.idp.dev_signin_url}?user=NAME")
            print(f"  Oracle wire server: {env.oracle.dsn} (TCPS)")
            print(f"  example app       : {served.name} at {served.base_url}")
            print()
            with telemetry.collect_summary() as metrics_summary:
                reports = run_scenario(env, served.base_url)
                if args.app == "fastapi":  # its Celery task runs as the end user who queued it
                    jobs = _import_example("fastapi_hr.jobs")
                    reports += jobs.run_demo_jobs(env, served.base_url)
            print("What the database received with each request:")
            print(format_reports(reports))
            print()
            print(metrics_summary())
            print()
            ok = all(r.ok for r in reports)
            print(
                "RESULT: every request reached the database with the right end-user context"
                if ok
                else "RESULT: FAILED (see above)"
            )
            print(
                "Rows: the wire test server applies an emulated row policy shaped like a Deep "
                "Data Security grant\n(no end user: none; an employee: own row; carol, granted "
                "the hr_viewer data role: all).\nA real Oracle AI Database 26ai enforces the "
                "grants written in the database instead."
            )
            if args.no_serve:
                return 0 if ok else 1
            print()
            print(f"Open {served.base_url}/ in a browser and sign in as {', '.join(DEMO_USERS)}.")
            print("Press Ctrl-C to stop.")
            _wait_forever()
            return 0 if ok else 1
        finally:
            served.stop()


if __name__ == "__main__":
    raise SystemExit(main())
