"""A non-TCPS address with ``end_user_sec_params`` is a ConfigError at connect.

The driver only sets an end-user security context over TCPS (DPY-2073), and
only at the first statement with an end user: over plain TCP an app would
connect, serve anonymous statements and fail there (a 500).  The params hook
refuses it up front, for connect and pool creation, sync and async, before
any network traffic.
"""

from __future__ import annotations

import asyncio
import socket

import oracledb
import pytest

import deepsec
from deepsec import ConfigError

SECRET = "s3cr3t-client-credential-value"
PARAMS = {
    "end_user_sec_params": {
        "spi_type": "spi_static",
        "client_id": "hr-app",
        "client_secret": SECRET,
    }
}


@pytest.fixture
def listener():
    """A plain TCP socket that counts connection attempts (it never answers)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def attempts(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def tcp_dsn(sock: socket.socket) -> str:
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}/FREEPDB1"


def descriptor(sock: socket.socket, second: str = "TCPS") -> str:
    port = sock.getsockname()[1]
    return (
        "(DESCRIPTION=(ADDRESS_LIST="
        f"(ADDRESS=(PROTOCOL={second})(HOST=127.0.0.1)(PORT={port}))"
        f"(ADDRESS=(PROTOCOL=TCP)(HOST=127.0.0.1)(PORT={port})))"
        "(CONNECT_DATA=(SERVICE_NAME=FREEPDB1)))"
    )


def check_refusal(exc: BaseException, dsn: str) -> None:
    cause = exc.__cause__
    assert isinstance(cause, ConfigError), repr(exc)
    text = str(exc)
    assert "TCPS" in text and "tcps://" in text and "ssl_context" in text
    assert "'tcp'" in text
    assert SECRET not in text and dsn not in text and "127.0.0.1" not in text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp://", "descriptor", "host:port/service"])
def test_connect_refuses_a_plain_tcp_address(listener, kind):
    dsn = {
        "tcp://": tcp_dsn(listener),
        "descriptor": descriptor(listener),
        "host:port/service": f"127.0.0.1:{listener.getsockname()[1]}/FREEPDB1",
    }[kind]
    with pytest.raises(oracledb.ProgrammingError, match="DPY-2061") as info:
        oracledb.connect(user="app_user", password="pw", dsn=dsn, extra_auth_params=PARAMS)
    check_refusal(info.value, dsn)
    assert attempts(listener) == 0  # refused before any network traffic


@pytest.mark.timeout(30)
def test_create_pool_refuses_a_plain_tcp_address(listener):
    dsn = tcp_dsn(listener)
    with pytest.raises(oracledb.ProgrammingError) as info:
        oracledb.create_pool(
            user="app_user", password="pw", dsn=dsn, extra_auth_params=PARAMS, min=1, max=2
        )
    check_refusal(info.value, dsn)
    assert attempts(listener) == 0


@pytest.mark.timeout(30)
def test_async_connect_and_pool_refuse_a_plain_tcp_address(listener):
    dsn = descriptor(listener)

    async def main() -> list[BaseException]:
        errors: list[BaseException] = []
        try:
            await oracledb.connect_async(
                user="app_user", password="pw", dsn=dsn, extra_auth_params=PARAMS
            )
        except oracledb.ProgrammingError as exc:
            errors.append(exc)
        try:
            oracledb.create_pool_async(
                user="app_user", password="pw", dsn=dsn, extra_auth_params=PARAMS, min=1, max=2
            )
        except oracledb.ProgrammingError as exc:
            errors.append(exc)
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 2
    for exc in errors:
        check_refusal(exc, dsn)
    assert attempts(listener) == 0


@pytest.mark.timeout(30)
def test_tcps_still_connects_and_plain_tcp_without_end_user_params_is_untouched(oracle, listener):
    conn = oracledb.connect(**oracle.connect_kwargs(), extra_auth_params=PARAMS)
    with conn, deepsec.end_user(("ann", None)), conn.cursor() as cur:
        cur.execute("select 1 from dual")
    # Without end_user_sec_params deepsec has no opinion: the driver goes ahead
    # and reaches the network (here: a closed port, so it is refused there).
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(oracledb.Error, match="DPY-6005") as info:
        oracledb.connect(user="app_user", password="pw", dsn=f"tcp://127.0.0.1:{port}/FREEPDB1")
    assert not isinstance(info.value.__cause__, ConfigError)
