"""``python -m deepsec doctor``: exit codes, report contents, and no secret in the output."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spi_static
from deepsec.doctor import EXIT_CONFIG, EXIT_OK, EXIT_TOKEN, EXIT_USAGE, main

pytestmark = pytest.mark.timeout(60)
TESTS_DIR = Path(__file__).resolve().parent / "support"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), stream=out)
    return code, out.getvalue()


def write_json(tmp_path: Path, data: object) -> str:
    path = tmp_path / "deepsec.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(autouse=True)
def _reset_spi():
    spi_static.reset()
    yield
    spi_static.reset()


def test_azure_client_credentials_against_the_local_idp(idp, tmp_path):
    params = idp.azure_params("client_credentials", data_roles=["hr_viewer"])
    user = idp.issue_user_token("alice")
    code, text = run(
        "--config", write_json(tmp_path, {"end_user_sec_params": params}), "--identity", user
    )
    assert code == EXIT_OK, text
    assert "spi_type   : azure_tokens" in text
    assert "auth_flow  : client_credentials" in text
    assert "user name claim: preferred_username=alice@example.test" in text
    assert "data roles : hr_viewer" in text
    assert "expires  : " in text and "(in " in text
    assert 'sub: "test-client"' in text  # the app's token, from MSAL
    assert "security context: built offline, OK" in text
    assert idp.token_requests("client_credentials") == 1
    assert idp.client_secret not in text and user not in text
    for token in idp.issued_tokens():
        assert token not in text
    assert text.rstrip().endswith("doctor: OK")


def test_on_behalf_of_needs_an_identity_then_works(idp, tmp_path):
    config = write_json(
        tmp_path, {"extra_auth_params": {"end_user_sec_params": idp.azure_params("on_behalf_of")}}
    )
    code, text = run("--config", config)
    assert code == EXIT_USAGE and "needs --identity" in text
    user = idp.issue_user_token("bob")
    code, text = run("--config", config, "--identity", user)
    assert code == EXIT_OK, text
    assert idp.token_requests("on_behalf_of") == 1
    assert "preferred_username=bob@example.test" in text
    for token in idp.issued_tokens():
        assert token not in text
    assert idp.client_secret not in text


def test_token_failure_is_exit_2_without_secrets(idp, tmp_path):
    idp.faults.status(401, "invalid_client", times=None)
    params = idp.azure_params("client_credentials")
    code, text = run("--config", write_json(tmp_path, params))
    assert code == EXIT_TOKEN, text
    assert "FAILED" in text and "invalid_client" in text
    assert idp.client_secret not in text
    assert "TOKEN ACQUISITION FAILED" in text


def test_invalid_config_is_exit_1_and_never_echoes_the_secret(tmp_path):
    secret = "pasted-secret-value-12345"
    params = {
        "spi_type": "azure_tokens",
        "auth_flow": "sideways",
        "client_id": "x",
        "client_credential": secret,
        "timeout": secret,
    }
    code, text = run("--config", write_json(tmp_path, params))
    assert code == EXIT_CONFIG
    assert "INVALID" in text and "auth_flow must be one of" in text and "timeout" in text
    assert secret not in text


def test_custom_spi_module_local_identity(tmp_path):
    params = {"spi_type": "spi_static", "client_id": "hr-app", "attributes": {"region": "eu"}}
    code, text = run("--config", write_json(tmp_path, params), "--identity", '["carol", null]')
    assert code == EXIT_OK, text
    assert "local end user 'carol' (no key)" in text
    assert 'attributes : {"region": "eu"}' in text
    assert spi_static.CALLS == ["hr-app"]


def test_custom_spi_module_failure_is_exit_2(tmp_path):
    spi_static.FAIL.append(RuntimeError("backend down"))
    code, text = run("--config", write_json(tmp_path, {"spi_type": "spi_static", "client_id": "a"}))
    assert code == EXIT_TOKEN, text


def test_local_identity_with_data_roles_is_a_config_error(tmp_path):
    params = {"spi_type": "spi_static", "client_id": "a", "data_roles": ["r"]}
    code, text = run("--config", write_json(tmp_path, params), "--identity", '["carol", null]')
    assert code == EXIT_CONFIG, text


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("--config", "/nonexistent/deepsec.json"),
        ("--settings", "no_such_settings_module_xyz"),
        ("--config", "a.json", "--settings", "b"),
        ("--bogus",),
    ],
)
def test_usage_errors_are_exit_3(argv):
    code, text = run(*argv)
    assert code == EXIT_USAGE
    assert "usage" in text


def test_json_without_params_is_a_usage_error(tmp_path):
    code, _ = run("--config", write_json(tmp_path, {"hello": 1}))
    assert code == EXIT_USAGE


def test_django_settings_module(idp, tmp_path, monkeypatch):
    options = {"extra_auth_params": {"end_user_sec_params": idp.azure_params()}}
    (tmp_path / "doctor_site_settings.py").write_text(
        textwrap.dedent(
            f"""
            DATABASES = {{
                "default": {{
                    "ENGINE": "django.db.backends.oracle",
                    "NAME": "tcps://db.example.com:1522/hr",
                    "OPTIONS": {options!r},
                }},
                "other": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            }}
            DEEPSEC = {{"strict": True, "attributes": "json.dumps"}}
            INSTALLED_APPS = ["deepsec.django"]
            MIDDLEWARE = ["deepsec.django.middleware.EndUserSecMiddleware"]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text = run("--settings", "doctor_site_settings")
    assert code == EXIT_OK, text
    assert "DATABASES['default']" in text and "'other'" not in text
    assert "strict=True" in text
    assert "identity   : none" in text
    assert idp.client_secret not in text
    code, text = run("--settings", "doctor_site_settings", "--database", "other")
    assert code == EXIT_USAGE


def test_django_settings_with_bad_deepsec_setting(idp, tmp_path, monkeypatch):
    (tmp_path / "doctor_bad_settings.py").write_text(
        "DATABASES = {'default': {'ENGINE': 'django.db.backends.oracle', 'OPTIONS': "
        f"{{'extra_auth_params': {{'end_user_sec_params': {idp.azure_params()!r}}}}}}}}}\n"
        "DEEPSEC = {'no_identity': 'maybe', 'colour': 'blue'}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, text = run("--settings", "doctor_bad_settings")
    assert code == EXIT_CONFIG
    assert "colour" in text


def test_command_line_entry_point(tmp_path):
    config = write_json(tmp_path, {"spi_type": "spi_static", "client_id": "cli"})
    result = subprocess.run(
        [sys.executable, "-m", "deepsec", "doctor", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS_DIR,
        env={"PYTHONPATH": str(TESTS_DIR), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "doctor: OK" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "deepsec", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 3


# -- doctor --settings runs deepsec's Django system checks ----------------------------

GOOD_SETTINGS = {
    "SECRET_KEY": "doctor-tests-only",
    "INSTALLED_APPS": ["django.contrib.contenttypes", "django.contrib.auth", "deepsec.django"],
    "MIDDLEWARE": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "deepsec.django.middleware.EndUserSecMiddleware",
    ],
    "DATABASES": {
        "default": {
            "ENGINE": "django.db.backends.oracle",
            "NAME": "tcps://db.example.com:1522/hr",
            "USER": "app_user",
            "PASSWORD": "db-password-not-to-print",
            "OPTIONS": {
                "extra_auth_params": {
                    "end_user_sec_params": {"spi_type": "spi_static", "client_id": "doctor"}
                }
            },
        }
    },
    "DEEPSEC": {},
}
SRC_DIR = TESTS_DIR.parents[1] / "src"


def doctor_on_settings(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """``python -m deepsec doctor --settings`` on ``source``, in a fresh process."""
    (tmp_path / "doctor_case_settings.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "deepsec", "doctor", "--settings", "doctor_case_settings"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{SRC_DIR}:{TESTS_DIR}", "PATH": "/usr/bin:/bin"},
    )


def settings_source(**changes: object) -> str:
    values = {**copy.deepcopy(GOOD_SETTINGS), **changes}
    return "".join(f"{name} = {value!r}\n" for name, value in values.items())


def test_doctor_settings_all_good(tmp_path):
    result = doctor_on_settings(tmp_path, settings_source())
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "OK: INSTALLED_APPS, MIDDLEWARE, DEEPSEC and DATABASES" in result.stdout
    assert result.stdout.rstrip().endswith("doctor: OK")
    assert "db-password-not-to-print" not in result.stdout


def _with_tcp_name(name: str) -> dict[str, object]:
    databases = copy.deepcopy(GOOD_SETTINGS["DATABASES"])
    databases["default"]["NAME"] = name  # type: ignore[index]
    return {"DATABASES": databases}


def _with_host_port() -> dict[str, object]:
    databases = copy.deepcopy(GOOD_SETTINGS["DATABASES"])
    databases["default"].update(NAME="hr", HOST="db.example.com", PORT="1521")  # type: ignore[union-attr]
    return {"DATABASES": databases}


MIDDLEWARE = GOOD_SETTINGS["MIDDLEWARE"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"MIDDLEWARE": MIDDLEWARE[:2]},  # type: ignore[index]
            [
                "deepsec.E001 ERROR: deepsec.django.middleware.EndUserSecMiddleware is not in "
                "MIDDLEWARE",
                "fix: Add 'deepsec.django.middleware.EndUserSecMiddleware' to MIDDLEWARE, after "
                "'django.contrib.auth.middleware.AuthenticationMiddleware'.",
            ],
            id="middleware-missing",
        ),
        pytest.param(
            {"MIDDLEWARE": [MIDDLEWARE[0], MIDDLEWARE[2], MIDDLEWARE[1]]},  # type: ignore[index]
            [
                "deepsec.E002 ERROR: deepsec.django.middleware.EndUserSecMiddleware comes before "
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "fix: Move 'deepsec.django.middleware.EndUserSecMiddleware' below "
                "'django.contrib.auth.middleware.AuthenticationMiddleware' in MIDDLEWARE.",
            ],
            id="middleware-before-auth",
        ),
        pytest.param(
            _with_tcp_name("tcp://db.example.com:1521/hr"),
            [
                "deepsec.E008 ERROR: DATABASES['default'] has end_user_sec_params but NAME: "
                "the connect string uses 'tcp', not TCPS",
                "fix: Write NAME as 'tcps://host:port/service'",
            ],
            id="tcp-dsn",
        ),
        pytest.param(
            _with_tcp_name(
                "(DESCRIPTION=(ADDRESS=(PROTOCOL=TCP)(HOST=db)(PORT=1521))"
                "(CONNECT_DATA=(SERVICE_NAME=hr)))"
            ),
            ["deepsec.E008 ERROR:", "not TCPS", "(PROTOCOL=TCPS)"],
            id="tcp-descriptor",
        ),
        pytest.param(
            _with_host_port(),
            [
                "deepsec.E008 ERROR: DATABASES['default'] has end_user_sec_params but HOST/PORT",
                "fix: Leave HOST and PORT empty",
            ],
            id="host-and-port",
        ),
        pytest.param(
            {"DEEPSEC": {"colour": "blue"}},
            ["deepsec.E004 ERROR: settings.DEEPSEC is invalid: unknown setting(s): colour"],
            id="bad-deepsec-key",
        ),
        pytest.param(
            {"INSTALLED_APPS": ["django.contrib.contenttypes", "django.contrib.auth"]},
            [
                "deepsec.E009 ERROR: 'deepsec.django' is not in INSTALLED_APPS",
                "fix: Add 'deepsec.django' to INSTALLED_APPS.",
            ],
            id="app-missing",
        ),
    ],
)
def test_doctor_settings_one_misconfiguration(tmp_path, changes, expected):
    result = doctor_on_settings(tmp_path, settings_source(**changes))
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    for line in expected:
        assert line in result.stdout, result.stdout
    assert result.stdout.count(" ERROR: ") == 1, result.stdout  # that problem, and only it
    assert "doctor: INVALID CONFIGURATION" in result.stdout
    assert "db-password-not-to-print" not in result.stdout


def test_doctor_settings_reports_every_problem(tmp_path):
    source = settings_source(
        MIDDLEWARE=[],
        DEEPSEC={"colour": "blue", "no_identity": "maybe", "resolver": "no_such_mod.f"},
        **_with_tcp_name("db.example.com:1521/hr"),
    )
    result = doctor_on_settings(tmp_path, source)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    for fragment in (
        "deepsec.E001",
        "unknown setting(s): colour",
        "no_identity must be 'least_privilege' or 'deny'",
        "resolver: cannot import 'no_such_mod.f'",
        "deepsec.E008",
    ):
        assert fragment in result.stdout, result.stdout


def test_doctor_settings_missing_environment_variable(tmp_path):
    source = "import os\n" + settings_source().replace(
        "'db-password-not-to-print'", "os.environ['HR_DB_PASSWORD_FOR_DOCTOR']"
    )
    result = doctor_on_settings(tmp_path, source)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "KeyError 'HR_DB_PASSWORD_FOR_DOCTOR'" in result.stdout
    assert "environment variable HR_DB_PASSWORD_FOR_DOCTOR" in result.stdout
    assert "doctor_case_settings.py, line" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_config_file_with_a_tcp_dsn_is_invalid(tmp_path):
    params = {"spi_type": "spi_static", "client_id": "a"}
    config = write_json(tmp_path, {"end_user_sec_params": params, "dsn": "db:1521/hr"})
    code, text = run("--config", config)
    assert code == EXIT_CONFIG, text
    assert "ERROR: dsn: the connect string uses 'tcp', not TCPS" in text
    config = write_json(tmp_path, {"end_user_sec_params": params, "dsn": "tcps://db:1522/hr"})
    code, text = run("--config", config)
    assert code == EXIT_OK, text


def test_settings_import_error_never_prints_its_message(tmp_path):
    # int() puts the default value, a secret here, in its ValueError message.
    source = 'import os\nPORT = int(os.environ.get("DBP_FOR_DOCTOR", "hunter2-secret"))\n'
    result = doctor_on_settings(tmp_path, source)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "ValueError (at doctor_case_settings.py, line 2)" in result.stdout


def test_settings_calling_sys_exit_is_reported(tmp_path):
    result = doctor_on_settings(tmp_path, 'import sys\nsys.exit("exit-secret-value")\n')
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "SystemExit (at doctor_case_settings.py, line 2)" in result.stdout
    assert "exit-secret-value" not in result.stdout + result.stderr


def test_key_error_not_from_the_environment_is_not_blamed_on_it(tmp_path):
    result = doctor_on_settings(tmp_path, 'PARTS = {}\nNAME = PARTS["db_name"]\n')
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "KeyError 'db_name' (at doctor_case_settings.py, line 2)" in result.stdout
    assert "environment variable" not in result.stdout


def test_missing_module_advice_mentions_pip(tmp_path):
    result = doctor_on_settings(tmp_path, "import no_such_pkg_for_doctor\n")
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "no module named 'no_such_pkg_for_doctor'" in result.stdout
    assert "pip install" in result.stdout and "PYTHONPATH" in result.stdout


def test_django_setup_failure_is_an_error(tmp_path):
    apps = [*GOOD_SETTINGS["INSTALLED_APPS"], "no_such_app_for_doctor"]  # type: ignore[misc]
    result = doctor_on_settings(tmp_path, settings_source(INSTALLED_APPS=apps))
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert (
        "ERROR: django.setup() failed: ModuleNotFoundError (at apps/config.py, line"
        in result.stdout
    ), result.stdout
    assert "no module named 'no_such_app_for_doctor'" in result.stdout
    assert "importlib" not in result.stdout
    assert "doctor: INVALID CONFIGURATION" in result.stdout


def test_flat_config_file_with_dsn(tmp_path):
    flat = {"spi_type": "spi_static", "client_id": "a", "dsn": "tcps://db:1522/hr"}
    code, text = run("--config", write_json(tmp_path, flat))
    assert code == EXIT_OK, text
    assert "unknown" not in text


def test_config_file_dsn_protocol_unknown_is_a_warning(tmp_path):
    params = {"spi_type": "spi_static", "client_id": "a"}
    config = write_json(tmp_path, {"end_user_sec_params": params, "dsn": "u/pw-9x@hr_alias"})
    code, text = run("--config", config)
    assert code == EXIT_OK, text
    assert "WARNING: cannot tell the protocol of dsn" in text
    assert "pw-9x" not in text and "hr_alias" not in text
    config = write_json(tmp_path, {"end_user_sec_params": params, "dsn": "u/pw-9x@tcp://db/hr"})
    code, text = run("--config", config)
    assert code == EXIT_CONFIG, text
    assert "DPY-2073" in text and "pw-9x" not in text
