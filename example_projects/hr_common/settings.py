"""Configuration from the environment, as a real deployment would do it.

Every value comes from an ``HR_*`` variable, so the demo and the tests point
the app at their local servers and production points it at the real ones.
The client secret and the database password are never logged or shown.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _need(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if not value:
        raise RuntimeError(f"environment variable {name} is not set (see the README)")
    return value


@dataclass(frozen=True)
class HRSettings:
    """Where the database and the identity provider are, and who the app is."""

    db_dsn: str
    db_user: str
    db_password: str = field(repr=False)
    db_ca_file: str | None
    idp_authority: str
    idp_ca_file: str | None
    client_id: str
    client_secret: str = field(repr=False)
    db_scopes: str = "api://oracle-db/.default"
    data_roles: tuple[str, ...] = ()
    dev_signin_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HRSettings:
        """Read the ``HR_*`` variables of ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        roles = env.get("HR_DATA_ROLES", "")
        return cls(
            db_dsn=_need(env, "HR_DB_DSN"),
            db_user=_need(env, "HR_DB_USER"),
            db_password=_need(env, "HR_DB_PASSWORD"),
            db_ca_file=env.get("HR_DB_CA_FILE") or None,
            idp_authority=_need(env, "HR_IDP_AUTHORITY"),
            idp_ca_file=env.get("HR_IDP_CA_FILE") or None,
            client_id=_need(env, "HR_CLIENT_ID"),
            client_secret=_need(env, "HR_CLIENT_SECRET"),
            db_scopes=env.get("HR_DB_SCOPES", "api://oracle-db/.default"),
            data_roles=tuple(r.strip() for r in roles.split(",") if r.strip()),
            dev_signin_url=env.get("HR_DEV_SIGNIN_URL") or None,
        )

    def end_user_sec_params(self) -> dict[str, Any]:
        """deepsec's ``end_user_sec_params``: MSAL client credentials at the IdP."""
        params: dict[str, Any] = {
            "spi_type": "azure_tokens",
            "auth_flow": "client_credentials",
            "authority": self.idp_authority,
            "client_id": self.client_id,
            "client_credential": self.client_secret,
            "scopes": self.db_scopes,
        }
        if self.idp_ca_file:
            # A private CA and a non-Microsoft authority: the local IdP.
            params["ca_file"] = self.idp_ca_file
            params["instance_discovery"] = False
        if self.data_roles:
            params["data_roles"] = list(self.data_roles)
        return params

    def db_ssl_context(self) -> ssl.SSLContext:
        """TLS trust for the database's TCPS listener."""
        return ssl.create_default_context(cafile=self.db_ca_file)

    def pool_params(self) -> dict[str, Any]:
        """``oracledb.create_pool(_async)`` keywords: the app's login over TCPS,
        with deepsec's ``end_user_sec_params`` -- all a pool needs to run every
        statement as the current end user."""
        return {
            "user": self.db_user,
            "password": self.db_password,
            "dsn": self.db_dsn,
            "ssl_context": self.db_ssl_context(),
            "extra_auth_params": {"end_user_sec_params": self.end_user_sec_params()},
        }
