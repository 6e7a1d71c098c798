"""The local identity provider's Entra ID endpoints.

OpenID discovery and JWKS (what MSAL reads to build an application) and the
v2.0 token endpoint: ``client_credentials`` and the on-behalf-of
``jwt-bearer`` grant, which checks the user assertion like Entra ID does and
answers with ``id_token`` and ``client_info`` so MSAL files the token under
the right account.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import jwt

from .base import JWT_BEARER, TokenRequest
from .keys import SigningKey

_OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})


def _b64url_json(data: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(dict(data)).encode()).decode().rstrip("=")


class EntraEndpoints(SigningKey):
    """Entra ID style metadata and token endpoint (``/{tenant}/...``)."""

    obo_account_info: bool
    extra_hostnames: tuple[str, ...]

    def azure_params(
        self,
        auth_flow: Literal["client_credentials", "on_behalf_of"] = "client_credentials",
        **overrides: Any,
    ) -> dict[str, Any]:
        """``end_user_sec_params`` for ``spi_type='azure_tokens'`` against this provider."""
        params: dict[str, Any] = {
            "spi_type": "azure_tokens",
            "auth_flow": auth_flow,
            "authority": self.authority,
            "client_id": self.client_id,
            "client_credential": self.client_secret,
            "scopes": "api://oracle-db/.default",
            "ca_file": self.ca_file,
            "instance_discovery": False,
            "timeout": 2.0,
        }
        params.update(overrides)
        return params

    def _access_token(self, client_id: str, scope: str, extra: Mapping[str, Any]) -> str:
        now = int(time.time())
        first = scope.split()[0] if scope.split() else client_id
        aud = first.rsplit("/", 1)[0] if "/" in first else first
        body = {
            "iss": self.issuer,
            "aud": aud,
            "sub": client_id,
            "azp": client_id,
            "appid": client_id,
            "tid": self.tenant,
            "iat": now,
            "nbf": now,
            "exp": now + self.expires_in,
            "jti": str(uuid.uuid4()),
            **self.extra_claims,
            **extra,
        }
        return self._issue(body)

    def _openid_config(self, authority: str, jwks_base: str | None = None) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{authority}/oauth2/v2.0/authorize",
            "token_endpoint": f"{authority}/oauth2/v2.0/token",
            "jwks_uri": f"{jwks_base or self.authority}/discovery/v2.0/keys",
            "response_types_supported": ["code"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": ["client_credentials", JWT_BEARER],
        }

    def _public_authority(self, host: str | None) -> str:
        """The authority as the client named it: under an extra host name, or ours."""
        name = (host or "").lower()
        if name.endswith(":443"):
            name = name[:-4]
        if name and name in self.extra_hostnames:
            return f"https://{name}/{self.tenant}"
        return self.authority

    def _handle_get(self, path: str, host: str | None = None) -> tuple[int, dict[str, Any]]:
        self._record(TokenRequest("GET", path, None, None, "other", status=200))
        t = f"/{self.tenant}"
        authority = self._public_authority(host)
        if path in (
            f"{t}/v2.0/.well-known/openid-configuration",
            f"{t}/.well-known/openid-configuration",
        ):
            return 200, self._openid_config(authority, authority)
        if path == f"{t}/b2c_local/v2.0/.well-known/openid-configuration":
            return 200, self._openid_config(f"{authority}/b2c_local", authority)
        if path == f"{t}/discovery/v2.0/keys":
            return 200, self._jwks()
        return 404, {"error": "not_found"}

    def _azure_token(
        self, form: Mapping[str, str], authorization: str
    ) -> tuple[int, dict[str, Any], str | None]:
        cid = self._client_auth(form, authorization)
        if cid is None:
            return (
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                    "correlation_id": str(uuid.uuid4()),
                },
                None,
            )
        grant_type, scope = form.get("grant_type"), form.get("scope", "")
        if grant_type == "client_credentials":
            if not scope:
                return 400, {"error": "invalid_scope", "error_description": "scope missing"}, None
            token = self._access_token(cid, scope, {"roles": ["app.read"]})
            return (
                200,
                {
                    "token_type": "Bearer",
                    "expires_in": self.expires_in,
                    "ext_expires_in": self.expires_in,
                    "access_token": token,
                },
                None,
            )
        if grant_type == JWT_BEARER and form.get("requested_token_use") == "on_behalf_of":
            try:
                user = jwt.decode(
                    form.get("assertion", ""),
                    self._key.public_key(),
                    algorithms=["RS256"],
                    options={"verify_aud": False},
                    issuer=self.issuer,
                )
            except jwt.PyJWTError as exc:
                return (
                    400,
                    {
                        "error": "invalid_grant",
                        "error_description": (
                            f"AADSTS50013: Assertion failed ({type(exc).__name__})"
                        ),
                        "correlation_id": str(uuid.uuid4()),
                    },
                    None,
                )
            scopes = scope.split()
            api_scopes = [s for s in scopes if s not in _OIDC_SCOPES]
            extra = {
                "sub": user["sub"],
                "oid": user.get("oid", user["sub"]),
                "preferred_username": user.get("preferred_username"),
                "upn": user.get("upn"),
                "name": user.get("name"),
                "scp": " ".join(s.rsplit("/", 1)[-1] for s in api_scopes),
                "obo_from": user.get("aud"),
            }
            token = self._access_token(cid, " ".join(api_scopes), extra)
            resp: dict[str, Any] = {
                "token_type": "Bearer",
                "scope": " ".join(api_scopes),
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": token,
            }
            if self.obo_account_info and "openid" in scopes:
                now = int(time.time())
                resp["id_token"] = self.sign(
                    {
                        "iss": self.issuer,
                        "aud": cid,
                        "sub": user["sub"],
                        "oid": extra["oid"],
                        "tid": self.tenant,
                        "iat": now,
                        "exp": now + 3600,
                        "preferred_username": user.get("preferred_username"),
                    }
                )
                resp["client_info"] = _b64url_json({"uid": extra["oid"], "utid": self.tenant})
            if "offline_access" in scopes:
                resp["refresh_token"] = "rt-" + str(uuid.uuid4())
            return 200, resp, str(user["sub"])
        return (
            400,
            {"error": "unsupported_grant_type", "error_description": str(grant_type)[:64]},
            None,
        )
