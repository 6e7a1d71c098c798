"""The local identity provider's shared state: addresses, clients and request log.

:class:`IdPBase` declares the attributes every endpoint module reads (the
tenant, the registered clients, the issued tokens, the lock) and holds what
they share: the URLs the provider answers on, client authentication and the
thread-safe request log (:class:`TokenRequest`).  :class:`LocalIdP
<deepsec.testing.idp.LocalIdP>` sets the attributes in its constructor.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..tls import TestCA

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Sentinel: :attr:`LocalIdP.reply_expires_in` is not set.
UNSET: Any = object()


@dataclass(frozen=True)
class TokenRequest:
    """One request the provider received (no secrets are recorded).

    ``subject`` is the ``sub`` of a valid OBO assertion, ``status`` the HTTP
    status answered (``0`` for a dropped connection).  For the OCI data plane
    (``endpoint == "oci_dataplane"``) ``client_id`` is the API key id
    (``tenancy/user/fingerprint``) and ``subject`` the user OCID.
    """

    method: str
    path: str
    grant_type: str | None
    client_id: str | None
    endpoint: Literal["azure", "oci", "oci_dataplane", "other"]
    subject: str | None = None
    status: int = 0
    time: float = field(default_factory=time.time)


def basic_user(authorization: str) -> str | None:
    """The user (client id) of an HTTP Basic ``Authorization`` header."""
    if authorization[:6].lower() != "basic ":
        return None
    try:
        return base64.b64decode(authorization[6:], validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None


class IdPBase:
    """What every part of :class:`LocalIdP <deepsec.testing.idp.LocalIdP>` shares.

    The attributes are declared here and set by ``LocalIdP.__init__``.
    """

    tenant: str
    clients: dict[str, str]
    expires_in: int
    extra_claims: dict[str, Any]
    host: str
    port: int
    ca: TestCA
    _log: list[TokenRequest]
    _issued: list[str]
    _lock: threading.Lock

    # --- addresses ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT``."""
        return f"https://{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        """The Entra-style authority for MSAL (``https://127.0.0.1:PORT/TENANT``)."""
        return f"{self.base_url}/{self.tenant}"

    @property
    def b2c_authority(self) -> str:
        """An authority MSAL accepts without instance discovery (B2C-style path)."""
        return f"{self.authority}/b2c_local"

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token issued."""
        return f"{self.authority}/v2.0"

    @property
    def token_url(self) -> str:
        """The Entra-style token endpoint."""
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def oci_token_url(self) -> str:
        """The OCI identity-domain style token endpoint (``authority`` for ``oci_tokens``)."""
        return f"{self.base_url}/oauth2/v1/token"

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate (PEM) clients must trust."""
        return str(self.ca.ca_pem_path)

    @property
    def client_id(self) -> str:
        """The first registered client id."""
        return next(iter(self.clients))

    @property
    def client_secret(self) -> str:
        """The first registered client's secret."""
        return self.clients[self.client_id]

    # --- request log ------------------------------------------------------------------

    def requests(self) -> list[TokenRequest]:
        """Every request received since the last :meth:`reset
        <deepsec.testing.idp.LocalIdP.reset>` (a copy)."""
        with self._lock:
            return list(self._log)

    def token_requests(
        self,
        grant_type: str | None = None,
        *,
        endpoint: Literal["azure", "oci"] | None = None,
    ) -> int:
        """How many token requests arrived, optionally of one grant type / endpoint.

        ``grant_type`` may be ``"client_credentials"``, ``"on_behalf_of"``
        (alias of the jwt-bearer grant) or a full grant type URN.
        """
        if grant_type == "on_behalf_of":
            grant_type = JWT_BEARER
        with self._lock:
            return sum(
                1
                for r in self._log
                if r.method == "POST"
                and r.endpoint != "other"
                and (grant_type is None or r.grant_type == grant_type)
                and (endpoint is None or r.endpoint == endpoint)
            )

    def _record(self, record: TokenRequest) -> None:
        with self._lock:
            self._log.append(record)

    def _client_auth(self, form: Mapping[str, str], authorization: str) -> str | None:
        cid, secret = form.get("client_id"), form.get("client_secret")
        if authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            cid, _, secret = decoded.partition(":")
        if cid is None or cid not in self.clients or self.clients[cid] != secret:
            return None
        return cid
