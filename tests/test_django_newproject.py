"""A fresh ``django-admin startproject``, set up as docs/django.md says, passes its own tests.

The ``conftest.py``, the test module and the view are read from the code blocks
of docs/django.md ("Testing a Django app"), so the documentation is what runs.
The project's pytest runs in its own process (Django settings are process-wide)
against the wire test server and local identity provider of deepsec.testing.django.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
DJANGO_DOC = REPO / "docs" / "django.md"

SETTINGS_ADDITIONS = """
# -- deepsec, as docs/django.md says ------------------------------------------
INSTALLED_APPS += ["deepsec.django"]
MIDDLEWARE.insert(
    MIDDLEWARE.index("django.contrib.auth.middleware.AuthenticationMiddleware") + 1,
    "deepsec.django.middleware.EndUserSecMiddleware",
)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.oracle",
        "NAME": "tcps://db.example.invalid:1522/sales",
        "USER": "app_user",
        "PASSWORD": "not-used-in-tests",
        "OPTIONS": {
            "extra_auth_params": {
                "end_user_sec_params": {
                    "spi_type": "azure_tokens",
                    "auth_flow": "client_credentials",
                    "authority": "https://login.microsoftonline.com/tenant",
                    "client_id": "app-id",
                    "client_credential": "not-used-in-tests",
                    "scopes": ["https://db.example.invalid/.default"],
                },
            },
        },
    },
}
DEEPSEC = {}
"""


# Beyond the documented tests: the bearer header, a token of one's own, and the
# local ["name", null] cookie that is refused unless DEEPSEC["client_local_users"].
EXTRA_TESTS = """
import base64, json


def unsigned_jwt(claims):
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}.x"


def test_bearer(deepsec_client):
    deepsec_client.sign_in("bob", via="bearer")
    assert deepsec_client.get("/whoami/").json() == {"username": "bob"}
    assert set(deepsec_client.usernames()) == {"bob"}


def test_own_token(deepsec_client):
    deepsec_client.sign_in("x", token=unsigned_jwt({"preferred_username": "erin", "sub": "e"}))
    assert deepsec_client.get("/whoami/").json() == {"username": "erin"}


def test_local_user_cookie_is_refused_by_default(deepsec_client):
    deepsec_client.django_client.cookies["identity"] = '["carol", null]'
    assert deepsec_client.get("/whoami/").json() == {"username": None}
"""


def documented_files() -> dict[str, str]:
    """The code blocks of docs/django.md whose first line is ``# <file name>``."""
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", DJANGO_DOC.read_text(), flags=re.S)
    files = {}
    for block in blocks:
        first, _, _ = block.partition("\n")
        match = re.fullmatch(r"# ([\w/]+\.py)", first.strip())
        if match:
            files[match.group(1)] = block
    return files


def test_documented_files_are_there() -> None:
    assert set(documented_files()) >= {"conftest.py", "test_whoami.py", "mysite/views.py"}


def test_fresh_startproject_runs_its_documented_tests(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO / "src"),
        "HOME": str(tmp_path),
    }
    project = tmp_path / "mysite"
    project.mkdir()
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite", str(project)],
        check=True,
        env=env,
        timeout=60,
    )
    settings = project / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + SETTINGS_ADDITIONS)
    for name, text in documented_files().items():
        (project / name).write_text(text)
    (project / "test_extra.py").write_text(EXTRA_TESTS)
    urls = project / "mysite" / "urls.py"
    urls.write_text(
        urls.read_text().replace(
            "urlpatterns = [",
            "from mysite.views import whoami\n\nurlpatterns = [\n    path('whoami/', whoami),",
        )
    )
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.pytest.ini_options]
            DJANGO_SETTINGS_MODULE = "mysite.settings"
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PASSED test_whoami.py::test_alice_runs_as_alice" in output
    assert "PASSED test_whoami.py::test_no_identity_runs_with_none" in output
    assert re.search(r"\b5 passed\b", output), output
