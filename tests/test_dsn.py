"""deepsec.dsn: the one TCPS rule, for parsed ConnectParams (the hook) and connect strings."""

from __future__ import annotations

import oracledb
import pytest

from deepsec.dsn import dsn_tcps_problem, params_tcps_problem, require_tcps
from deepsec.errors import ConfigError

MIXED = (
    "(DESCRIPTION=(ADDRESS=(PROTOCOL=TCP)(HOST=db)(PORT=1521))"
    "(ADDRESS=(PROTOCOL=TCPS)(HOST=db)(PORT=1522))(CONNECT_DATA=(SERVICE_NAME=hr)))"
)


def parsed(dsn: str, **keywords: object) -> oracledb.ConnectParams:
    params = oracledb.ConnectParams(**keywords)  # type: ignore[arg-type]
    params.parse_connect_string(dsn)
    return params


@pytest.mark.parametrize("dsn", ["tcp://db:1521/hr", "db:1521/hr", MIXED])
def test_require_tcps_refuses_a_plain_address(dsn: str) -> None:
    with pytest.raises(ConfigError) as raised:
        require_tcps(parsed(dsn))
    text = str(raised.value)
    assert "uses 'tcp', not TCPS" in text and "DPY-2073" in text
    assert "db:1521" not in text and "DESCRIPTION" not in text


@pytest.mark.parametrize(
    ("dsn", "keywords"),
    [
        ("tcps://db:1522/hr", {}),
        ("db:1522/hr", {"protocol": "tcps"}),
        ("db:1521/hr", {"use_eztls": True}),
    ],
)
def test_require_tcps_accepts_tls(dsn: str, keywords: dict[str, object]) -> None:
    require_tcps(parsed(dsn, **keywords))
    assert params_tcps_problem(parsed(dsn, **keywords)) is None


def test_connect_string_and_params_give_the_same_message() -> None:
    found = dsn_tcps_problem("app/pw-1@tcp://db:1521/hr")
    assert found is not None and found.certain
    assert found.message == params_tcps_problem(parsed("tcp://db:1521/hr"))
    assert "pw-1" not in found.message
