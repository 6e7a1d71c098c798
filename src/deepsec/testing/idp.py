"""A local HTTPS identity provider for tests and demos.

:class:`LocalIdP` speaks enough OAuth 2.0 / OpenID Connect for real MSAL and
for the OCI identity-domain token endpoint, over TLS on ``127.0.0.1`` with a
throw-away CA (:class:`~deepsec.testing.tls.TestCA`):

* OpenID discovery at both paths MSAL uses:
  ``/{tenant}/v2.0/.well-known/openid-configuration`` (``authority=``) and
  ``/{tenant}/.well-known/openid-configuration`` (``oidc_authority=``), plus
  a B2C-style authority ``/{tenant}/b2c_local`` that MSAL accepts without
  instance discovery (for clients that cannot pass ``instance_discovery=False``,
  such as python-oracledb's ``azure_tokens`` plugin);
* JWKS at ``/{tenant}/discovery/v2.0/keys``;
* ``POST /{tenant}/oauth2/v2.0/token``: ``client_credentials`` (client secret
  in the form or HTTP Basic) and the on-behalf-of ``jwt-bearer`` grant, which
  verifies the user assertion's signature, issuer and expiry and returns an
  access token for the same user, with ``id_token`` and ``client_info``
  (configurable: :attr:`LocalIdP.obo_account_info`);
* ``POST /oauth2/v1/token``: an OCI IAM identity-domain style endpoint
  (HTTP Basic client auth, ``grant_type=client_credentials``);
* ``POST /v1/actions/generateScopedAccessToken``: the OCI identity data
  plane operation the OCI SDK's ``DataplaneClient`` calls (a request signed
  with an OCI API key; JSON ``scope`` and ``publicKey``; answers
  ``{"token": <JWT>}`` whose ``jwk`` claim is that public key), for
  python-oracledb's ``oci_tokens`` login plugin;
* extra certificate host names (``extra_hostnames``), so clients that only
  talk to the real cloud hosts (``login.microsoftonline.com``,
  ``auth.<region>.oraclecloud.com``) can be routed here through
  :class:`deepsec.testing.cloud.CloudProxy`; discovery requested under such
  a host name points its endpoints at that host name;
* RS256 JWTs with configurable claims and lifetime;
* a thread-safe request log (:meth:`LocalIdP.token_requests`);
* fault injection (:attr:`LocalIdP.faults`), one-shot or persistent, on the
  token endpoints (``target="any"``, ``"azure"`` or ``"oci"``) or on the
  OpenID metadata MSAL reads (``target="metadata"``: discovery and JWKS):

  - ``delay(s)``: sleep, then answer normally;
  - ``status(code, error, retry_after=...)``: an OAuth error answer;
    ``throttle(retry_after, status=503)`` is the same with a ``Retry-After``
    header (``429``/``503``, as Entra ID sends when it sheds load);
  - ``malformed_json()``, ``drop()``, ``down()``;
  - ``drip(per_byte=1.0)``: the whole answer, status line and headers
    included, one byte every ``per_byte`` seconds (``after_headers=True``:
    headers at once, then the body dripped): every single read succeeds, so
    only a deadline on the whole call ends it;
  - ``stall(s)``: status line and headers at once, then nothing for ``s``
    seconds before the body.

  A drip or stall stops when the client goes away or :meth:`LocalIdP.reset`
  / :meth:`LocalIdP.stop` is called.  :attr:`LocalIdP.reply_expires_in`
  replaces the ``expires_in`` of token answers (``NaN``, ``"3600"``...) to
  test lifetime validation while the JWT ``exp`` stays sane.

Every response carries ``Connection: close``, so a stopped provider is really
down.  Run it by hand with ``python -m deepsec.testing.idp --port 8443
--ca-file /tmp/idp-ca.pem``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ._serving import serve_in_background, stop_serving
from .tls import TestCA

__all__ = [
    "JWT_BEARER",
    "OCI_SCOPED_TOKEN_PATH",
    "Fault",
    "FaultKind",
    "Faults",
    "LocalIdP",
    "TokenRequest",
]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Path of the OCI identity data plane's ``GenerateScopedAccessToken`` operation.
OCI_SCOPED_TOKEN_PATH = "/v1/actions/generateScopedAccessToken"
_OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})

FaultKind = Literal["status", "delay", "malformed_json", "drop", "drip", "stall"]
Target = Literal["any", "azure", "oci", "metadata"]
_UNSET: Any = object()


@dataclass
class Fault:
    """One injected fault on the token endpoints.

    Attributes:
        kind: ``"status"`` (answer ``status`` with an OAuth error body),
            ``"delay"`` (sleep ``seconds``, then answer normally),
            ``"malformed_json"`` (200 with ``body`` or a truncated JSON body),
            ``"drop"`` (close the connection without answering), ``"drip"``
            (answer normally, one byte every ``seconds``; with
            ``after_headers`` the headers go at once) or ``"stall"`` (headers
            at once, then ``seconds`` of silence before the body).
        times: how many requests it applies to; ``None`` = persistent.
        target: ``"azure"``, ``"oci"`` or ``"any"`` token endpoint, or
            ``"metadata"`` (OpenID discovery and JWKS, which MSAL reads when
            it builds an application).
    """

    kind: FaultKind
    status: int = 500
    error: str = "server_error"
    description: str = "injected fault"
    seconds: float = 0.0
    retry_after: float | None = None
    times: int | None = 1
    target: Target = "any"
    body: bytes | None = None
    after_headers: bool = False


class Faults:
    """Thread-safe fault queue.  The first matching fault applies to a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Queue ``fault`` (applies after those queued before it are used up)."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def status(
        self,
        status: int,
        error: str | None = None,
        *,
        description: str = "injected fault",
        times: int | None = 1,
        retry_after: float | None = None,
        target: Target = "any",
    ) -> Fault:
        """Answer with HTTP ``status`` and ``{"error": error, ...}``."""
        default = {
            400: "invalid_grant",
            401: "invalid_client",
            429: "too_many_requests",
            503: "temporarily_unavailable",
        }.get(status, "server_error")
        return self.add(
            Fault(
                "status",
                status=status,
                error=error or default,
                description=description,
                times=times,
                retry_after=retry_after,
                target=target,
            )
        )

    def delay(self, seconds: float, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Sleep ``seconds`` before answering."""
        return self.add(Fault("delay", seconds=seconds, times=times, target=target))

    def malformed_json(
        self, *, body: bytes | None = None, times: int | None = 1, target: Target = "any"
    ) -> Fault:
        """Answer 200 with a body that is not valid JSON (``body``, or a truncated object)."""
        return self.add(Fault("malformed_json", times=times, target=target, body=body))

    def throttle(
        self,
        retry_after: float = 60.0,
        *,
        status: int = 503,
        times: int | None = 1,
        target: Target = "any",
    ) -> Fault:
        """Answer ``status`` (503 or 429) with ``Retry-After: retry_after``."""
        return self.status(
            status, description="throttled", times=times, retry_after=retry_after, target=target
        )

    def drip(
        self,
        per_byte: float = 1.0,
        *,
        after_headers: bool = False,
        times: int | None = 1,
        target: Target = "any",
    ) -> Fault:
        """Send the answer one byte every ``per_byte`` seconds (a slow-loris provider)."""
        return self.add(
            Fault("drip", seconds=per_byte, after_headers=after_headers, times=times, target=target)
        )

    def stall(self, seconds: float, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Send the headers, then nothing for ``seconds``, then the body."""
        return self.add(Fault("stall", seconds=seconds, times=times, target=target))

    def drop(self, *, times: int | None = 1, target: Target = "any") -> Fault:
        """Close the connection without sending a response."""
        return self.add(Fault("drop", times=times, target=target))

    def down(self, *, target: Target = "any") -> Fault:
        """Persistently drop every token request (the provider looks down)."""
        return self.drop(times=None, target=target)

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def take(self, target: Literal["azure", "oci", "metadata"]) -> Fault | None:
        """The fault for one request to ``target``, consuming a one-shot use.

        ``"any"`` faults apply to the token endpoints, not to metadata.
        """
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.target != target and not (fault.target == "any" and target != "metadata"):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[i]
                return fault
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)


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


def _b64url_json(data: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(dict(data)).encode()).decode().rstrip("=")


def _basic_user(authorization: str) -> str | None:
    """The user (client id) of an HTTP Basic ``Authorization`` header."""
    if authorization[:6].lower() != "basic ":
        return None
    try:
        return base64.b64decode(authorization[6:], validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None


_SIG_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _oci_error(code: str, message: str) -> dict[str, Any]:
    """An OCI-style error body."""
    return {"code": code, "message": message}


#: The development-only sign-in shortcut (see :attr:`LocalIdP.dev_signin_url`).
DEV_TOKEN_PATH = "/dev/token"
_DEV_USER = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class _Drop(Exception):
    """Internal: close the connection without a response."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], idp: LocalIdP, ctx: ssl.SSLContext) -> None:
        self.idp = idp
        self.ssl_context = ctx
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake in the per-connection thread, not in the accept loop.
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client went away, TLS errors... nothing for a test server to report


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's, untyped there

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(
        self,
        code: int,
        body: Mapping[str, Any] | bytes,
        headers: Mapping[str, str],
        delivery: Fault | None = None,
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(dict(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.close_connection = True
        if delivery is None:
            self.end_headers()
            self.wfile.write(raw)
            return
        self._headers_buffer.append(b"\r\n")  # what end_headers() would add and flush
        head = b"".join(self._headers_buffer)
        self._headers_buffer = []
        idp = self.server.idp
        generation = idp._generation
        try:
            if delivery.kind == "stall":
                self.wfile.write(head)
                if idp._sleep_unless_reset(delivery.seconds, generation):
                    self.wfile.write(raw)
                return
            data = head + raw
            if delivery.after_headers:
                self.wfile.write(head)
                data = raw
            for i in range(len(data)):
                self.wfile.write(data[i : i + 1])
                if not idp._sleep_unless_reset(delivery.seconds, generation):
                    return
        except OSError:
            return  # the client gave up: the point of the fault

    def do_GET(self) -> None:
        url = urlparse(self.path)
        idp = self.server.idp
        if url.path == DEV_TOKEN_PATH:
            code, body = idp._dev_token(parse_qs(url.query).get("user", [""])[0])
            self._send(code, body, {})
            return
        fault = idp.faults.take("metadata")
        try:
            reply, delivery = idp._apply_fault(fault)
        except _Drop:
            self._drop()
            return
        if reply is not None:
            idp._record(TokenRequest("GET", url.path, None, None, "other", status=reply[0]))
            self._send(reply[0], reply[1], reply[2])
            return
        code, body = idp._handle_get(url.path, self.headers.get("Host"))
        self._send(code, body, {}, delivery)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if urlparse(self.path).path == OCI_SCOPED_TOKEN_PATH:
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, answer = self.server.idp._handle_oci_dataplane(self.path, raw, headers)
            self._send(code, answer, {"opc-request-id": str(uuid.uuid4())})
            return
        form = {k: v[0] for k, v in parse_qs(raw).items()}
        try:
            code, body, headers, delivery = self.server.idp._handle_post(
                urlparse(self.path).path, form, self.headers.get("Authorization", "")
            )
        except _Drop:
            self._drop()
            return
        self._send(code, body, headers, delivery)


class LocalIdP:
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
        self.reply_expires_in: Any = _UNSET
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
        self._server: _Server | None = None
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
        self._server = _Server((self.host, port), self, cert.server_ssl_context())
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
        self.reply_expires_in = _UNSET
        self.expires_in = self._default_expires_in
        self.obo_account_info = self._default_obo_account_info
        self.extra_claims = {}

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

    # --- end_user_sec_params helpers ---------------------------------------------------

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

    # --- tokens -------------------------------------------------------------------------

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
        token = self.sign(body)
        with self._lock:
            self._issued.append(token)
        return token

    def issued_tokens(self) -> list[str]:
        """Every token issued since the last :meth:`reset` (for leak checks)."""
        with self._lock:
            return list(self._issued)

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
        token = self.sign(body)
        with self._lock:
            self._issued.append(token)
        return token

    # --- request log ------------------------------------------------------------------

    def requests(self) -> list[TokenRequest]:
        """Every request received since the last :meth:`reset` (a copy)."""
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

    # --- routing ------------------------------------------------------------------------

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

    def _jwks(self) -> dict[str, Any]:
        pub = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        pub.update(kid=self.kid, use="sig", alg="RS256")
        return {"keys": [pub]}

    def _public_authority(self, host: str | None) -> str:
        """The authority as the client named it: under an extra host name, or ours."""
        name = (host or "").lower()
        if name.endswith(":443"):
            name = name[:-4]
        if name and name in self.extra_hostnames:
            return f"https://{name}/{self.tenant}"
        return self.authority

    @property
    def dev_signin_url(self) -> str:
        """DEVELOPMENT ONLY: ``GET`` it with ``?user=NAME`` for that user's token.

        Stands in for the provider's interactive login in the demo and the
        example apps' "sign in as alice" pages: the token is what
        :meth:`issue_user_token` returns, signed by this provider.
        """
        return f"{self.base_url}{DEV_TOKEN_PATH}"

    def _dev_token(self, user: str) -> tuple[int, dict[str, Any]]:
        self._record(TokenRequest("GET", DEV_TOKEN_PATH, None, None, "other", status=200))
        if not _DEV_USER.fullmatch(user):
            return 400, {"error": "invalid_request", "error_description": "bad user name"}
        token = self.issue_user_token(user)
        return 200, {"access_token": token, "token_type": "Bearer", "user": user}

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

    def _apply_fault(
        self, fault: Fault | None
    ) -> tuple[tuple[int, dict[str, Any] | bytes, dict[str, str]] | None, Fault | None]:
        """What ``fault`` does to a request: a reply instead of the normal one, or a delivery.

        Raises :class:`_Drop` for a dropped connection; sleeps for a delay.
        """
        if fault is None:
            return None, None
        if fault.kind == "drop":
            raise _Drop
        if fault.kind == "malformed_json":
            return (200, fault.body or b'{"token_type": "Bearer", "access_token": ', {}), None
        if fault.kind == "status":
            headers: dict[str, str] = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            body = {
                "error": fault.error,
                "error_description": fault.description,
                "correlation_id": str(uuid.uuid4()),
                "trace_id": str(uuid.uuid4()),
            }
            return (fault.status, body, headers), None
        if fault.kind == "delay":
            time.sleep(fault.seconds)
            return None, None
        return None, fault  # drip, stall: the normal answer, delivered slowly

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
        client_id = form.get("client_id") or _basic_user(authorization)
        subject: str | None = None
        headers: dict[str, str] = {}
        status = 0
        try:
            if endpoint == "other":
                status, body = 404, {"error": "not_found"}
                return status, body, headers, None
            reply, delivery = self._apply_fault(self.faults.take(endpoint))
            if reply is not None:
                status = reply[0]
                return (*reply, None)
            if endpoint == "oci":
                status, body = self._oci_token(form, authorization)
            else:
                status, body, subject = self._azure_token(form, authorization)
            if status == 200 and self.reply_expires_in is not _UNSET:
                body["expires_in"] = self.reply_expires_in
            return status, body, headers, delivery
        finally:
            self._record(
                TokenRequest("POST", path, grant_type, client_id, endpoint, subject, status)
            )

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
        token = self.sign(body)
        with self._lock:
            self._issued.append(token)
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
            token = self.sign(claims)
            with self._lock:
                self._issued.append(token)
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

    def __repr__(self) -> str:
        state = f"{self.base_url}" if self.running else "stopped"
        return f"LocalIdP({state}, tenant={self.tenant!r})"


def iter_lines(idp: LocalIdP) -> Iterator[str]:
    """Human-readable settings of a running provider (used by the CLI)."""
    yield f"local IdP listening on {idp.base_url}"
    yield f"  CA file        : {idp.ca_file}"
    yield f"  Entra authority: {idp.authority}"
    yield f"  OCI token URL  : {idp.oci_token_url}"
    yield f"  client id      : {idp.client_id}"
    yield "  end_user_sec_params (azure, on_behalf_of):"
    params = idp.azure_params("on_behalf_of")
    params["client_credential"] = "<secret: see --client-secret>"
    yield "    " + json.dumps(params)


def main(argv: list[str] | None = None) -> int:
    """``python -m deepsec.testing.idp``: run a provider until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ca-file", help="write the CA certificate (PEM) to this path")
    parser.add_argument("--tenant", default="test-tenant")
    parser.add_argument("--client-id", default="test-client")
    parser.add_argument("--client-secret", default="test-secret")
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--user", help="print a user token for this user name and continue")
    args = parser.parse_args(argv)
    idp = LocalIdP(
        tenant=args.tenant,
        clients={args.client_id: args.client_secret},
        expires_in=args.expires_in,
        host=args.host,
    ).start(args.port)
    if args.ca_file:
        idp.ca.write_ca_pem(args.ca_file)
        ca_path = Path(args.ca_file)
    else:
        ca_path = Path(idp.ca_file)
    for line in iter_lines(idp):
        print(line.replace(idp.ca_file, str(ca_path)), flush=True)
    if args.user:
        print(f"  user token for {args.user}: {idp.issue_user_token(args.user)}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        idp.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
