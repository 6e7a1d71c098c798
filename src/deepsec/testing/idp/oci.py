"""The local identity provider's OCI IAM endpoints.

The identity-domain token endpoint (``/oauth2/v1/token``, HTTP Basic client
credentials) and the identity data plane's ``GenerateScopedAccessToken``,
which python-oracledb's ``oci_tokens`` plugin calls through the OCI SDK with
an API-key-signed request and which binds the token to the caller's public
key (the ``jwk`` claim).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .base import TokenRequest
from .keys import SigningKey

#: Path of the OCI identity data plane's ``GenerateScopedAccessToken`` operation.
OCI_SCOPED_TOKEN_PATH = "/v1/actions/generateScopedAccessToken"
_SIG_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _oci_error(code: str, message: str) -> dict[str, Any]:
    """An OCI-style error body."""
    return {"code": code, "message": message}


class OciEndpoints(SigningKey):
    """OCI IAM style token endpoint and identity data plane."""

    oci_api_keys: dict[str, str]

    def oci_params(self, **overrides: Any) -> dict[str, Any]:
        """``end_user_sec_params`` for ``spi_type='oci_tokens'`` against this provider."""
        params: dict[str, Any] = {
            "spi_type": "oci_tokens",
            "auth_flow": "client_credentials",
            "authority": self.oci_token_url,
            "client_id": self.client_id,
            "client_credential": self.client_secret,
            "scopes": "urn:oracle:db::id::*",
            "ca_file": self.ca_file,
            "timeout": 2.0,
            "max_retries": 2,
        }
        params.update(overrides)
        return params

    def _oci_token(self, form: Mapping[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        if authorization[:6].lower() != "basic ":
            return 401, {"error": "invalid_client", "error_description": "Basic auth required"}
        cid = self._client_auth({}, authorization)
        if cid is None:
            return 401, {
                "error": "invalid_client",
                "error_description": "Client authentication failed.",
            }
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        scope = form.get("scope", "")
        now = int(time.time())
        body = {
            "iss": "https://identity.oraclecloud.com/",
            "sub": cid,
            "client_id": cid,
            "scope": scope,
            "aud": scope.split("::")[0] if scope else cid,
            "iat": now,
            "exp": now + self.expires_in,
            "jti": str(uuid.uuid4()),
            **self.extra_claims,
        }
        token = self._issue(body)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}

    def _handle_oci_dataplane(
        self, target: str, raw: str, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """``POST /v1/actions/generateScopedAccessToken`` (OCI identity data plane)."""
        key_id: str | None = None
        subject: str | None = None
        status = 0
        try:
            authorization = headers.get("authorization", "")
            sig = dict(_SIG_PARAM.findall(authorization))
            key_id = sig.get("keyId")
            if not authorization.startswith("Signature ") or not key_id:
                status = 401
                return status, _oci_error(
                    "NotAuthenticated", "The required authentication information was not provided."
                )
            if self.oci_api_keys and not self._oci_signature_ok(target, headers, sig):
                status = 401
                return status, _oci_error("NotAuthenticated", "The request signature is invalid.")
            try:
                details = json.loads(raw)
                scope, public_key = str(details["scope"]), str(details["publicKey"])
                key = serialization.load_pem_public_key(public_key.encode())
                if not isinstance(key, rsa.RSAPublicKey):
                    raise TypeError("publicKey must be an RSA key")
                jwk_ = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
            except (ValueError, KeyError, TypeError):
                status = 400
                return status, _oci_error("InvalidParameter", "scope and publicKey are required.")
            tenancy, _, rest = key_id.partition("/")
            subject = rest.partition("/")[0] or tenancy
            now = int(time.time())
            claims = {
                "iss": "authService.oracle.com",
                "sub": subject,
                "tenant": tenancy,
                "scope": scope,
                "aud": scope,
                "jwk": jwk_,
                "iat": now,
                "nbf": now,
                "exp": now + self.expires_in,
                "jti": str(uuid.uuid4()),
                **self.extra_claims,
            }
            token = self._issue(claims)
            status = 200
            return status, {"token": token}
        finally:
            self._record(
                TokenRequest(
                    "POST", OCI_SCOPED_TOKEN_PATH, None, key_id, "oci_dataplane", subject, status
                )
            )

    def _oci_signature_ok(
        self, target: str, headers: Mapping[str, str], sig: Mapping[str, str]
    ) -> bool:
        """Verify an OCI API-key HTTP signature (draft-cavage, rsa-sha256)."""
        pem = self.oci_api_keys.get(sig.get("keyId", ""))
        if pem is None or sig.get("algorithm", "rsa-sha256") != "rsa-sha256":
            return False
        lines = []
        for name in sig.get("headers", "date").split():
            if name == "(request-target)":
                lines.append(f"(request-target): post {target}")
            elif name in headers:
                lines.append(f"{name}: {headers[name]}")
            else:
                return False
        try:
            key = serialization.load_pem_public_key(pem.encode())
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(
                base64.b64decode(sig.get("signature", "")),
                "\n".join(lines).encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True
