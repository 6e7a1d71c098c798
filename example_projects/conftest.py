"""Fixtures shared by the example apps' tests (each app's ``tests/conftest.py`` adds ``served``).

The example apps and ``hr_common`` are top-level packages in this folder, as
``python -m deepsec.demo`` imports them: put the folder on ``sys.path`` once here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from deepsec.demo import DemoEnvironment, ServedApp  # noqa: E402


@pytest.fixture(scope="module")
def hr_env() -> Iterator[DemoEnvironment]:
    """Local IdP (with its dev sign-in endpoint) and Oracle wire server with the HR table."""
    with DemoEnvironment() as env:
        yield env


@pytest.fixture
def client(served: ServedApp) -> Iterator[httpx.Client]:
    """A fresh HTTP client (empty cookie jar) for one test."""
    with httpx.Client(base_url=served.base_url, timeout=20) as http:
        yield http
