"""The command line, ``python -m deepsec.demo``: start everything, run the scenario, print.

With the FastAPI example it also queues Celery tasks (the example's
``fastapi_hr.jobs``), which run as the end user who queued them.  Unless
``--no-serve`` is given it then keeps serving for a browser until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence

from .. import telemetry
from .environment import DemoEnvironment
from .hr import DEMO_USERS
from .report import format_reports
from .scenario import run_scenario
from .serve import _import_example, serve_app


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
