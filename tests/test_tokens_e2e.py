"""Token sources end to end: local IdP -> driver hook -> thin driver -> Oracle wire server.

Real MSAL / requests over HTTPS to :class:`~deepsec.testing.idp.LocalIdP`,
the real thin driver over TCPS to the wire test server, which records the
end-user security context of every round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

import oracledb
import pytest

import deepsec
from concurrency_support import run_threads
from deepsec.testing.idp import LocalIdP

USERNAME_SQL = "select xs_sys_context('xs$session','username') from dual"


@pytest.fixture(autouse=True)
def _hook_installed() -> None:
    deepsec.install()


def connect(server: Any, end_user_sec_params: dict[str, Any]) -> oracledb.Connection:
    return oracledb.connect(
        user=server.user,
        password=server.password,
        dsn=server.dsn,
        ssl_context=server.client_ssl_context(),
        extra_auth_params={"end_user_sec_params": end_user_sec_params},
    )


def whoami(conn: oracledb.Connection) -> str | None:
    with conn.cursor() as cur:
        cur.execute(USERNAME_SQL)
        row = cur.fetchone()
    return None if row is None else row[0]


def last_context(server: Any, conn: oracledb.Connection) -> Any:
    trips = [t for t in server.round_trips(conn.session_id) if t.sql == USERNAME_SQL]
    return trips[-1].context


def whoami_once(server: Any, params: dict[str, Any], token: str) -> tuple[str | None, Any]:
    """On a new connection, as ``token``'s end user: who the database says, and what it got."""
    conn = connect(server, params)
    try:
        with deepsec.end_user(token):
            return whoami(conn), last_context(server, conn)
    finally:
        conn.close()


def test_on_behalf_of_token_reaches_the_database(idp: LocalIdP, oracle: Any) -> None:
    alice = idp.issue_user_token("alice")
    bob = idp.issue_user_token("bob")
    conn = connect(oracle, idp.azure_params("on_behalf_of"))
    try:
        with deepsec.end_user(alice):
            assert whoami(conn) == "alice@example.test"
            seen = last_context(oracle, conn)
        with deepsec.end_user(bob):
            assert whoami(conn) == "bob@example.test"
        with deepsec.end_user(alice):
            assert whoami(conn) == "alice@example.test"
    finally:
        conn.close()
    # the database received the OBO token the IdP issued for alice, and (the
    # server reports 23.26.4) only that token, as python-oracledb's plugin does
    assert conn.version.startswith("23.26.4")
    assert seen.kind == "database_access_token" and seen.end_user_token is None
    assert seen.database_access_token in idp.issued_tokens()
    claims = idp.decode(seen.database_access_token)
    assert claims["preferred_username"] == "alice@example.test"
    assert claims["azp"] == idp.client_id
    assert idp.token_requests("on_behalf_of") == 2  # one per user, not per statement


def test_client_credentials_token_and_user_identity_reach_the_database(
    idp: LocalIdP, oracle: Any
) -> None:
    carol = idp.issue_user_token("carol")
    db_user, seen = whoami_once(oracle, idp.azure_params(), carol)
    assert db_user == "carol@example.test"
    assert seen is not None, [t.function for t in oracle.round_trips()]
    assert seen.end_user_token == carol
    assert idp.decode(seen.database_access_token)["sub"] == idp.client_id
    log = [(r.grant_type, r.status, r.client_id, r.time) for r in idp.requests()]
    assert idp.token_requests("client_credentials") == 1, log


def test_oci_token_reaches_the_database(idp: LocalIdP, oracle: Any) -> None:
    dave = idp.issue_user_token("dave")
    db_user, seen = whoami_once(oracle, idp.oci_params(), dave)
    assert db_user == "dave@example.test"
    assert idp.decode(seen.database_access_token)["client_id"] == idp.client_id
    assert idp.token_requests(endpoint="oci") == 1


def test_many_threads_one_connection_each_one_obo_request_per_user(
    idp: LocalIdP, oracle: Any
) -> None:
    # A generous timeout: the 15 threads' TLS handshakes (client, database and
    # provider sides, all in this process) and MSAL's start-up share 2 cores
    # with whatever else runs; a fetch past the default 2 s failed the test.
    # What it proves (one request per user, each thread its own user) needs no deadline.
    params = idp.azure_params("on_behalf_of", timeout=30.0)
    users = {f"u{i}": idp.issue_user_token(f"u{i}") for i in range(5)}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            conn = connect(oracle, params)
            try:
                for _ in range(3):
                    with deepsec.end_user(users[name]):
                        assert whoami(conn) == f"{name}@example.test"
            finally:
                conn.close()
        except BaseException as exc:
            errors.append(exc)

    run_threads(worker, each=[n for n in users for _ in range(3)])
    assert not errors
    assert idp.token_requests("on_behalf_of") == len(users)


def test_async_connection_on_behalf_of(idp: LocalIdP, oracle: Any) -> None:
    erin = idp.issue_user_token("erin")

    async def main() -> str | None:
        conn = await oracledb.connect_async(
            user=oracle.user,
            password=oracle.password,
            dsn=oracle.dsn,
            ssl_context=oracle.client_ssl_context(),
            extra_auth_params={"end_user_sec_params": idp.azure_params("on_behalf_of")},
        )
        try:
            async with deepsec.end_user(erin):
                with conn.cursor() as cur:
                    await cur.execute(USERNAME_SQL)
                    row = await cur.fetchone()
                    return None if row is None else str(row[0])
        finally:
            await conn.close()

    assert asyncio.run(main()) == "erin@example.test"
    assert idp.token_requests("on_behalf_of") == 1
