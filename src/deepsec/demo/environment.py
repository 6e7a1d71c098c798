"""The servers an example app needs: the local identity provider and the wire server.

:class:`DemoEnvironment` starts them on one throw-away test CA and gives the
``HR_*`` variables the example apps read; the example projects' tests reuse it.
"""

from __future__ import annotations

import os
import secrets

from .hr import DEMO_DATA_ROLES, EMPLOYEE_COLUMNS, EMPLOYEES, hr_row_policy


class DemoEnvironment:
    """The local identity provider (with its dev sign-in endpoint) and the wire server.

    Use as a context manager.  :meth:`environ` gives the ``HR_*`` variables
    the example apps read; :meth:`apply_environ` sets them in ``os.environ``.
    The client secret and database password are random per run and never
    printed.
    """

    def __init__(self, *, app_name: str = "hr-app") -> None:
        from ..testing.idp import LocalIdP
        from ..testing.oracle import OracleTestServer
        from ..testing.tls import TestCA

        self.ca = TestCA()
        self.client_id = app_name
        self._client_secret = secrets.token_urlsafe(24)
        self.db_user = "hr_app"
        self._db_password = secrets.token_urlsafe(16)
        self.idp = LocalIdP(
            tenant="hr-tenant", clients={self.client_id: self._client_secret}, ca=self.ca
        )
        self.oracle = OracleTestServer(
            users={self.db_user: self._db_password}, ca=self.ca, row_policy=hr_row_policy
        )

    def start(self) -> DemoEnvironment:
        """Start every server and create the canned HR table."""
        self.idp.start()
        self.oracle.start()
        self.seed()
        return self

    def seed(self) -> None:
        """(Re)create the canned ``employees`` table and its row policy on the wire server."""
        self.oracle.add_table("employees", EMPLOYEE_COLUMNS, EMPLOYEES)
        self.oracle.row_policy = hr_row_policy

    def stop(self) -> None:
        """Stop every server and remove the CA directory."""
        self.oracle.stop()
        self.idp.stop()
        self.ca.close()

    def __enter__(self) -> DemoEnvironment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def environ(self) -> dict[str, str]:
        """The ``HR_*`` variables that point an example app at these servers."""
        assert self.idp.running, "start() first"
        return {
            "HR_DB_DSN": self.oracle.dsn,
            "HR_DB_USER": self.db_user,
            "HR_DB_PASSWORD": self._db_password,
            "HR_DB_CA_FILE": str(self.ca.ca_pem_path),
            "HR_IDP_AUTHORITY": self.idp.authority,
            "HR_IDP_CA_FILE": str(self.ca.ca_pem_path),
            "HR_CLIENT_ID": self.client_id,
            "HR_CLIENT_SECRET": self._client_secret,
            "HR_DB_SCOPES": "api://oracle-db/.default",
            "HR_DATA_ROLES": ",".join(DEMO_DATA_ROLES),
            "HR_DEV_SIGNIN_URL": self.idp.dev_signin_url,
        }

    def apply_environ(self) -> None:
        """Set :meth:`environ` in ``os.environ``."""
        os.environ.update(self.environ())

    def user_token(self, user: str) -> str:
        """An end-user token for ``user`` (what the dev sign-in endpoint returns)."""
        return self.idp.issue_user_token(user)

    @staticmethod
    def expected_db_user(user: str) -> str:
        """What ``xs_sys_context('xs$session','username')`` answers for ``user``."""
        return f"{user}@example.test"
