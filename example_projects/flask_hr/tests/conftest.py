"""flask_hr under waitress (``hr_env`` and ``client``: ``example_projects/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hr_common.settings import HRSettings

from deepsec.demo import DemoEnvironment, ServedApp, serve_wsgi


@pytest.fixture(scope="module")
def served(hr_env: DemoEnvironment) -> Iterator[ServedApp]:
    """The app, configured from the environment's HR_* values, under waitress."""
    from flask_hr import create_app

    server = serve_wsgi(create_app(HRSettings.from_env(hr_env.environ())), label="flask_hr")
    try:
        yield server
    finally:
        server.stop()
