"""The local identity provider's signing key: RS256 JWTs, the JWKS, user tokens.

One RSA key per provider signs every token it issues (:meth:`SigningKey.sign`);
its public half is published as the JWKS MSAL and resource servers verify
with.  Issued tokens are remembered so tests can check that none leaks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .base import IdPBase


class SigningKey(IdPBase):
    """Token signing, verification and the end-user tokens a test starts from."""

    kid: str
    _key: rsa.RSAPrivateKey

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` as an RS256 JWT with this provider's key."""
        return jwt.encode(dict(claims), self._key, algorithm="RS256", headers={"kid": self.kid})

    def decode(self, token: str, *, verify_exp: bool = True) -> dict[str, Any]:
        """Verify a token this provider issued and return its claims."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key.public_key(),
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": verify_exp},
        )
        return claims

    def issue_user_token(
        self,
        username: str = "alice",
        *,
        oid: str | None = None,
        audience: str = "api://middle-tier",
        expires_in: float = 3600,
        **claims: Any,
    ) -> str:
        """An end user's access token (the OBO ``assertion`` / the identity).

        Claims: ``iss``, ``aud``, ``sub``, ``oid``, ``tid``, ``iat``, ``nbf``,
        ``exp``, ``preferred_username`` (``username@example.test``), ``upn``,
        ``name`` and ``jti``; ``claims`` override or add to them.
        """
        now = int(time.time())
        oid = oid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant}/{username}"))
        body = {
            "iss": self.issuer,
            "aud": audience,
            "sub": oid,
            "oid": oid,
            "tid": self.tenant,
            "iat": now,
            "nbf": now,
            "exp": int(now + expires_in),
            "preferred_username": f"{username}@example.test",
            "upn": f"{username}@example.test",
            "name": username,
            "jti": str(uuid.uuid4()),
            **claims,
        }
        return self._issue(body)

    def _issue(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` and remember the token, so a leak check can look for it."""
        token = self.sign(claims)
        with self._lock:
            self._issued.append(token)
        return token

    def issued_tokens(self) -> list[str]:
        """Every token issued since the last :meth:`reset
        <deepsec.testing.idp.LocalIdP.reset>` (for leak checks)."""
        with self._lock:
            return list(self._issued)

    def _jwks(self) -> dict[str, Any]:
        pub = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        pub.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [pub]}
