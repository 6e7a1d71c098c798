"""The local identity provider itself: :class:`LocalIdP`.

It composes the Entra ID and OCI endpoints, the signing key and the dev
sign-in (one module each) with a lifecycle (start, stop, reset) and the
routing of token requests through the injected faults.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import rsa

from .._serving import serve_in_background, stop_serving
from ..tls import TestCA
from .base import UNSET, TokenRequest, basic_user
from .dev import DevSignIn
from .entra import EntraEndpoints
from .faults import Fault, Faults, apply_fault
from .oci import OciEndpoints
from .server import Server


class LocalIdP(EntraEndpoints, OciEndpoints, DevSignIn):
    """A local HTTPS identity provider (Entra ID style and OCI IAM style).

    Args:
        tenant: the tenant path segment of the Entra-style authority.
        clients: ``{client_id: secret}`` accepted by both token endpoints.
        expires_in: lifetime in seconds of the access tokens it issues
            (mutable: :attr:`expires_in`; :meth:`reset` restores it).
        host: address to listen on.
        ca: the test CA to use; a private one is created when ``None``.
        obo_account_info: whether OBO replies carry ``id_token`` and
            ``client_info`` (a reply without them makes MSAL store the user's
            token with no account: the cross-user hazard).
        extra_hostnames: host names added to the TLS certificate (beside
            ``127.0.0.1`` and ``localhost``), e.g. ``login.microsoftonline.com``
            for clients routed here by :class:`deepsec.testing.cloud.CloudProxy`.

    Attributes:
        oci_api_keys: ``{key_id: public key PEM}`` of OCI API keys
            (``key_id`` = ``tenancy/user/fingerprint``).  Empty (the default):
            the data plane accepts any signed request without checking the
            signature; otherwise the request's key must be listed and its
            HTTP signature must verify (401 ``NotAuthenticated`` if not).

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        tenant: str = "test-tenant",
        clients: Mapping[str, str] | None = None,
        expires_in: int = 3600,
        host: str = "127.0.0.1",
        ca: TestCA | None = None,
        obo_account_info: bool = True,
        extra_hostnames: Sequence[str] = (),
    ) -> None:
        self.tenant = tenant
        self.clients: dict[str, str] = dict(clients or {"test-client": "test-secret"})
        self._default_expires_in = expires_in
        self.expires_in = expires_in
        self._default_obo_account_info = obo_account_info
        self.obo_account_info = obo_account_info
        #: Claims merged into every access token issued.
        self.extra_claims: dict[str, Any] = {}
        #: When set, the ``expires_in`` of every token answer (any JSON value:
        #: ``float("nan")``, ``"3600"``, ``-1``...); the JWT ``exp`` still
        #: follows :attr:`expires_in`.  :meth:`reset` unsets it.
        self.reply_expires_in: Any = UNSET
        self._generation = 0
        self._stopping = threading.Event()
        self.host = host
        self.extra_hostnames: tuple[str, ...] = tuple(h.lower() for h in extra_hostnames)
        self.oci_api_keys: dict[str, str] = {}
        self._owns_ca = ca is None
        self.ca = ca or TestCA()
        self.faults = Faults()
        self.kid = "deepsec-local-1"
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._log: list[TokenRequest] = []
        self._issued: list[str] = []
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------

    def start(self, port: int = 0) -> LocalIdP:
        """Start serving on ``port`` (``0``: any free port); returns ``self``."""
        if self._server is not None:
            return self
        cert = self.ca.issue_server_cert(
            "127.0.0.1", "localhost", *self.extra_hostnames, name="idp"
        )
        self._stopping.clear()
        self._server = Server((self.host, port), self, cert.server_ssl_context())
        self.port = int(self._server.server_address[1])
        self._thread = serve_in_background(self._server, "deepsec-local-idp")
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); the CA directory is removed if it is ours."""
        if self._server is not None:
            self._stopping.set()  # ends drips and stalls
            stop_serving(self._server)
            self._server = None
        if self._owns_ca:
            self.ca.close()

    @property
    def running(self) -> bool:
        """Whether the provider is serving."""
        return self._server is not None

    def __enter__(self) -> LocalIdP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Clear the request log, faults and issued tokens; restore defaults."""
        self.faults.clear()
        with self._lock:
            self._log.clear()
            self._issued.clear()
            self._generation += 1  # ends drips and stalls in progress
        self.reply_expires_in = UNSET
        self.expires_in = self._default_expires_in
        self.obo_account_info = self._default_obo_account_info
        self.extra_claims = {}

    def _sleep_unless_reset(self, seconds: float, generation: int) -> bool:
        """Sleep ``seconds``; False (early) if the provider was reset or stopped meanwhile."""
        end = time.monotonic() + seconds
        while True:
            if self._generation != generation or self._stopping.is_set():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._stopping.wait(min(left, 0.05))

    def _handle_post(
        self, path: str, form: Mapping[str, str], authorization: str
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str], Fault | None]:
        endpoint: Literal["azure", "oci", "other"]
        if path == "/oauth2/v1/token":
            endpoint = "oci"
        elif path in (
            f"/{self.tenant}/oauth2/v2.0/token",
            f"/{self.tenant}/b2c_local/oauth2/v2.0/token",
        ):
            endpoint = "azure"
        else:
            endpoint = "other"
        grant_type = form.get("grant_type")
        client_id = form.get("client_id") or basic_user(authorization)
        subject: str | None = None
        headers: dict[str, str] = {}
        status = 0
        try:
            if endpoint == "other":
                status, body = 404, {"error": "not_found"}
                return status, body, headers, None
            reply, delivery = apply_fault(self.faults.take(endpoint))
            if reply is not None:
                status = reply[0]
                return (*reply, None)
            if endpoint == "oci":
                status, body = self._oci_token(form, authorization)
            else:
                status, body, subject = self._azure_token(form, authorization)
            if status == 200 and self.reply_expires_in is not UNSET:
                body["expires_in"] = self.reply_expires_in
            return status, body, headers, delivery
        finally:
            self._record(
                TokenRequest("POST", path, grant_type, client_id, endpoint, subject, status)
            )

    def __repr__(self) -> str:
        state = f"{self.base_url}" if self.running else "stopped"
        return f"LocalIdP({state}, tenant={self.tenant!r})"
