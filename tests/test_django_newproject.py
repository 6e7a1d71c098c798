"""A fresh ``django-admin startproject``, set up as docs/django.md says, passes its own tests.

The settings (the Quickstart's ``# settings.py`` block), the ``conftest.py``, the
test module and the view are read from the code blocks of docs/django.md, so the
documentation is what runs.
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
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
DJANGO_DOC = REPO / "docs" / "django.md"

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


def test_statements_tagged_finds_a_trailing_tag(deepsec_client):
    deepsec_client.sign_in("dave")
    deepsec_client.get("/tagged/")
    (trip,) = deepsec_client.statements_tagged("t1")
    assert trip.context.username == "dave"
    assert deepsec_client.statements_tagged("t10") == []


def test_sign_out_keeps_other_cookies(deepsec_client):
    deepsec_client.django_client.cookies["sessionid"] = "kept"
    deepsec_client.sign_in("bob")
    deepsec_client.sign_out()
    assert deepsec_client.django_client.cookies["sessionid"].value == "kept"
    assert "identity" not in deepsec_client.django_client.cookies


@pytest.mark.django_db(databases=["default", "other"])
def test_a_non_oracle_alias_gets_a_test_database():
    from django.db import connections

    with connections["other"].cursor() as cursor:
        cursor.execute("create table deepsec_probe (x integer)")
    assert "real.sqlite3" not in str(connections["other"].settings_dict["NAME"])
"""
EXTRA_TESTS = "import pytest\n" + EXTRA_TESTS

TAGGED_VIEW = """
from django.db import connection
from django.http import JsonResponse


def tagged(request):
    with connection.cursor() as cursor:
        cursor.execute("select 1 from dual /* t1 */")
        cursor.fetchone()
    return JsonResponse({})
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


def _merged(project: list[str], documented: list[str]) -> list[str]:
    """``project`` plus the documented entries it lacks, each after its documented predecessor."""
    merged = list(project)
    previous: str | None = None
    for entry in documented:
        if entry not in merged:
            at = merged.index(previous) + 1 if previous in merged else len(merged)
            merged.insert(at, entry)
        previous = entry
    return merged


def settings_additions(project_settings: str) -> str:
    """The Quickstart's ``# settings.py`` block, applied to a startproject settings module.

    The block's lists are merged into the project's (its ``# ...`` stand for
    the project's own entries); ``DATABASES`` and ``DEEPSEC`` are taken as
    documented (the fixtures point the database at the wire test server).
    """
    documented: dict[str, Any] = {}
    exec(documented_files()["settings.py"], documented)
    project: dict[str, Any] = {"__file__": "/nonexistent/mysite/settings.py"}
    exec(project_settings, project)
    values = {
        "INSTALLED_APPS": _merged(project["INSTALLED_APPS"], documented["INSTALLED_APPS"]),
        "MIDDLEWARE": _merged(project["MIDDLEWARE"], documented["MIDDLEWARE"]),
        "DATABASES": documented["DATABASES"],
        "DEEPSEC": documented["DEEPSEC"],
    }
    lines = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return "\n# -- deepsec, from docs/django.md's Quickstart --\n" + lines


def test_documented_files_are_there() -> None:
    files = set(documented_files())
    assert files >= {"settings.py", "conftest.py", "test_whoami.py", "mysite/views.py"}


def test_documented_settings_are_merged_in_order() -> None:
    additions = settings_additions(
        "INSTALLED_APPS = ['django.contrib.auth']\n"
        "MIDDLEWARE = ['django.contrib.sessions.middleware.SessionMiddleware',\n"
        "    'django.contrib.auth.middleware.AuthenticationMiddleware',\n"
        "    'django.contrib.messages.middleware.MessageMiddleware']\n"
    )
    values: dict[str, Any] = {}
    exec(additions, values)
    assert values["INSTALLED_APPS"] == ["django.contrib.auth", "deepsec.django"]
    assert values["MIDDLEWARE"][1:3] == [
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "deepsec.django.middleware.EndUserSecMiddleware",
    ]
    assert "end_user_sec_params" in values["DATABASES"]["default"]["OPTIONS"]["extra_auth_params"]


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
    real_sqlite = tmp_path / "real.sqlite3"  # must stay untouched: tests get a test database
    settings.write_text(
        settings.read_text()
        + settings_additions(settings.read_text())
        + f"DATABASES['other'] = {{'ENGINE': 'django.db.backends.sqlite3', "
        f"'NAME': {str(real_sqlite)!r}}}\n"
    )
    (project / "mysite" / "extra_views.py").write_text(TAGGED_VIEW)
    for name, text in documented_files().items():
        if name != "settings.py":  # merged into the project's own above
            (project / name).write_text(text)
    (project / "test_extra.py").write_text(EXTRA_TESTS)
    urls = project / "mysite" / "urls.py"
    urls.write_text(
        urls.read_text().replace(
            "urlpatterns = [",
            "from mysite.views import whoami\nfrom mysite.extra_views import tagged\n\n"
            "urlpatterns = [\n    path('whoami/', whoami),\n    path('tagged/', tagged),",
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
    assert re.search(r"\b8 passed\b", output), output
    assert not real_sqlite.exists()
