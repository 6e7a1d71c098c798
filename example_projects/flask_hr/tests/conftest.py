"""Fixtures of the flask_hr tests: the demo's servers and the app under waitress."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

EXAMPLES = Path(__file__).resolve().parents[2]
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from deepsec.demo import DemoEnvironment, ServedApp, serve_wsgi  # noqa: E402


@pytest.fixture(scope="module")
def hr_env() -> Iterator[DemoEnvironment]:
    """Local IdP, dev sign-in endpoint and Oracle wire server with the HR table."""
    with DemoEnvironment() as env:
        yield env


@pytest.fixture(scope="module")
def served(hr_env: DemoEnvironment) -> Iterator[ServedApp]:
    """The app, configured from the environment's HR_* values, under waitress."""
    from flask_hr import create_app
    from flask_hr.settings import HRSettings

    app = create_app(HRSettings.from_env(hr_env.environ()))
    server = serve_wsgi(app, label="flask_hr")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(served: ServedApp) -> Iterator[httpx.Client]:
    """A fresh HTTP client (empty cookie jar) for one test."""
    with httpx.Client(base_url=served.base_url, timeout=20) as http:
        yield http
