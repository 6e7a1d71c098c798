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

The package has one module per job; this module re-exports the public names,
so ``from deepsec.demo import DemoEnvironment`` is the import to use:

* :mod:`.hr`: the canned ``employees`` table, the demo users and the emulated grant;
* :mod:`.environment`: :class:`DemoEnvironment`, the servers and the ``HR_*`` variables;
* :mod:`.serve`: serving an app (or one of ``example_projects``) on ``127.0.0.1``;
* :mod:`.scenario`: the scripted requests and what the database saw for each;
* :mod:`.report`: the table the demo prints;
* :mod:`.cli`: the command line (``python -m deepsec.demo``).
"""

from __future__ import annotations

from .cli import main
from .environment import DemoEnvironment
from .hr import (
    DATA_ROLE_GRANTS,
    DEMO_USERS,
    EMPLOYEE_COLUMNS,
    EMPLOYEES,
    hr_row_policy,
    visible_employees,
)
from .hr import DEMO_DATA_ROLES as DEMO_DATA_ROLES
from .report import format_reports as format_reports
from .scenario import RequestReport, run_scenario

# fastapi_hr.jobs checks its Celery task's statements with the scenario's own check.
from .scenario import _collect as _collect
from .serve import ServedApp, example_projects_dir, serve_asgi, serve_wsgi
from .serve import serve_app as serve_app

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
