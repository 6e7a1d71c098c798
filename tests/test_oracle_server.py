"""The Oracle wire test server, driven by python-oracledb's real thin driver over TCPS."""

from __future__ import annotations

import oracledb
import pytest

from deepsec.testing.oracle import OracleTestServer


def connect(server: OracleTestServer, **kwargs: object) -> oracledb.Connection:
    params: dict[str, object] = {
        "user": "app_user",
        "password": "app_password",
        "dsn": server.dsn,
        "ssl_context": server.client_ssl_context(),
    }
    params.update(kwargs)
    return oracledb.connect(**params)


@pytest.mark.timeout(30)
def test_password_login_and_select_one(oracle: OracleTestServer) -> None:
    with connect(oracle) as conn, conn.cursor() as cur:
        cur.execute("select 1 from dual")
        assert cur.fetchall() == [(1,)]
        record = oracle.connection(conn.session_id)
        assert record.user == "APP_USER"
        assert record.method == "password"
        assert record.logged_in
