"""Route cloud SDKs' HTTPS traffic to a local provider, and nowhere else.

python-oracledb's own cloud-token login plugins (``oracledb.plugins.azure_tokens``
and ``oracledb.plugins.oci_tokens``) talk only to the real cloud hosts:
MSAL fetches ``https://login.microsoftonline.com/<tenant>/v2.0/.well-known/
openid-configuration``; the OCI SDK's ``DataplaneClient`` posts to
``https://auth.<region>.oraclecloud.com/v1/actions/generateScopedAccessToken``.
Neither takes an endpoint or an HTTP client from the plugin.  Both use
``requests`` with ``trust_env``, so they honour ``HTTPS_PROXY``, ``NO_PROXY``
and ``REQUESTS_CA_BUNDLE``.

:class:`CloudProxy` is a tiny HTTP ``CONNECT`` proxy on ``127.0.0.1`` that
tunnels only allow-listed host names (on port 443) to a local address,
typically a :class:`~deepsec.testing.idp.LocalIdP` started with those names in
``extra_hostnames``, and answers ``403`` to everything else, so nothing leaves
the machine.  :func:`cloud_environ` builds the environment that points the
SDKs at it; :func:`routed_to` applies it for the duration of a ``with`` block
(in pytest, prefer ``monkeypatch.setenv`` with :func:`cloud_environ`).

:func:`deepsec.compat.plugin_auth_type` works around a python-oracledb 26.1
defect on Python 3.11 and older (a plain string ``auth_type`` makes the
plugins' hooks raise ``TypeError``).

Example::

    idp = LocalIdP(extra_hostnames=["login.microsoftonline.com"]).start()
    with CloudProxy.for_idp(idp) as proxy, routed_to(proxy, idp.ca_file):
        conn = oracledb.connect(dsn=..., extra_auth_params={
            "auth_type": "AzureServicePrincipal",
            "authority": f"https://login.microsoftonline.com/{idp.tenant}", ...})
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import BaseRequestHandler, ThreadingTCPServer
from typing import TYPE_CHECKING, Any

from ._serving import serve_in_background, stop_serving

if TYPE_CHECKING:
    from .idp import LocalIdP

__all__ = [
    "AZURE_LOGIN_HOST",
    "CLEARED_VARS",
    "CloudProxy",
    "ProxyRequest",
    "cloud_environ",
    "oci_auth_host",
    "routed_to",
]

logger = logging.getLogger(__name__)

#: The Entra ID host MSAL treats as known (no instance discovery).
AZURE_LOGIN_HOST = "login.microsoftonline.com"

#: Environment variables :func:`cloud_environ` sets (both spellings of the
#: proxy variables: lower case wins in ``urllib`` when both are set).
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy")
_NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
_CA_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
#: Variables :func:`routed_to` removes while routed: another proxy, or
#: MSAL's forced region (which breaks local hosts).
CLEARED_VARS = ("ALL_PROXY", "all_proxy", "MSAL_FORCE_REGION")

_MAX_HEADER = 16 * 1024


def oci_auth_host(region: str) -> str:
    """The OCI identity data plane host of ``region`` (``auth.<region>.oraclecloud.com``)."""
    return f"auth.{region}.oraclecloud.com"


@dataclass(frozen=True)
class ProxyRequest:
    """One request the proxy received.

    Attributes:
        method: the HTTP method (``CONNECT`` for tunnels).
        target: the request target (``host:port`` for ``CONNECT``).
        host: the target host name, lower case ("" if unparsable).
        port: the target port (0 if unparsable).
        allowed: whether a tunnel was opened.
        status: the status answered (200 tunnel, 403 refused, 400/502 errors).
    """

    method: str
    target: str
    host: str
    port: int
    allowed: bool
    status: int
    time: float = field(default_factory=time.time)


class _Server(ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, proxy: CloudProxy) -> None:
        self.proxy = proxy
        super().__init__((proxy.listen_host, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client went away mid-tunnel: nothing for a test proxy to report


class _Handler(BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.proxy._serve(self.request)


class CloudProxy:
    """An HTTP ``CONNECT`` proxy that tunnels allow-listed hosts to local addresses.

    Args:
        routes: ``{host name: (address, port)}``; a ``CONNECT host:443`` for a
            listed host name is tunnelled to that address.  Every other request
            (unlisted host, another port, plain HTTP proxying) gets ``403``.
        listen_host: the address to listen on (loopback).
        timeout: idle timeout in seconds of a tunnel.

    Use as a context manager or call :meth:`start` / :meth:`stop`;
    :attr:`url` is the proxy URL for ``HTTPS_PROXY``, :meth:`requests` the log.
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, int]],
        *,
        listen_host: str = "127.0.0.1",
        timeout: float = 10.0,
    ) -> None:
        self.routes: dict[str, tuple[str, int]] = {h.lower(): a for h, a in routes.items()}
        self.listen_host = listen_host
        self.timeout = timeout
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._log: list[ProxyRequest] = []

    @classmethod
    def for_idp(cls, idp: LocalIdP, hosts: Iterable[str] | None = None) -> CloudProxy:
        """A proxy that routes ``hosts`` (default: ``idp.extra_hostnames``) to ``idp``."""
        names = list(hosts) if hosts is not None else list(idp.extra_hostnames)
        return cls({name: (idp.host, idp.port) for name in names})

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> CloudProxy:
        """Start serving on a free port; returns ``self``."""
        if self._server is not None:
            return self
        self._server = _Server(self)
        self.port = int(self._server.server_address[1])
        self._thread = serve_in_background(self._server, "deepsec-cloud-proxy")
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            stop_serving(self._server)
            self._server = None

    def __enter__(self) -> CloudProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the value for ``HTTPS_PROXY``)."""
        return f"http://{self.listen_host}:{self.port}"

    # --- request log ----------------------------------------------------------------

    def requests(self) -> list[ProxyRequest]:
        """Every request received (a copy)."""
        with self._lock:
            return list(self._log)

    def tunnelled_hosts(self) -> list[str]:
        """The host names of every tunnel opened, in order."""
        return [r.host for r in self.requests() if r.allowed]

    def refused(self) -> list[ProxyRequest]:
        """Every request answered without a tunnel."""
        return [r for r in self.requests() if not r.allowed]

    def clear(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._log.clear()

    def _record(self, record: ProxyRequest) -> None:
        with self._lock:
            self._log.append(record)

    # --- serving --------------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.timeout)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
                if len(head) > _MAX_HEADER:
                    self._reply(client, 431, "Request Header Fields Too Large")
                    return
        except OSError:
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        method = parts[0].upper() if parts else ""
        target = parts[1] if len(parts) > 1 else ""
        host, port = _split_target(target) if method == "CONNECT" else ("", 0)
        route = self.routes.get(host) if port == 443 else None
        if route is None:
            self._record(ProxyRequest(method, target, host, port, False, 403))
            logger.info("cloud proxy: refused %s %s", method, target[:200])
            self._reply(client, 403, "Forbidden")
            return
        try:
            upstream = socket.create_connection(route, timeout=self.timeout)
        except OSError:
            self._record(ProxyRequest(method, target, host, port, False, 502))
            self._reply(client, 502, "Bad Gateway")
            return
        self._record(ProxyRequest(method, target, host, port, True, 200))
        with upstream:
            try:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                if rest:
                    upstream.sendall(rest)
                self._pipe(client, upstream)
            except OSError:
                return

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until one side closes or the tunnel idles out."""
        peers = {a: b, b: a}
        while True:
            readable, _, _ = select.select(list(peers), [], [], self.timeout)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)

    @staticmethod
    def _reply(client: socket.socket, status: int, reason: str) -> None:
        body = f"{status} {reason}: the deepsec test proxy only tunnels allow-listed hosts\n"
        raw = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
        )
        with contextlib.suppress(OSError):
            client.sendall(raw.encode("latin-1"))

    def __repr__(self) -> str:
        state = self.url if self._server is not None else "stopped"
        return f"CloudProxy({state}, hosts={sorted(self.routes)})"


def _split_target(target: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) of a CONNECT target; ``("", 0)`` if invalid."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return "", 0
    return host.strip("[]").lower(), int(port)


def cloud_environ(proxy: CloudProxy, ca_file: str) -> dict[str, str]:
    """Environment variables that send HTTPS through ``proxy`` and trust ``ca_file``.

    ``HTTPS_PROXY`` (both spellings) is the proxy, ``NO_PROXY`` keeps
    loopback direct, ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` are the test
    CA.  The variables in ``CLEARED_VARS`` (``ALL_PROXY``,
    ``MSAL_FORCE_REGION``) must be removed as well: :func:`routed_to` does.
    """
    env = dict.fromkeys(_PROXY_VARS, proxy.url)
    env.update(dict.fromkeys(_NO_PROXY_VARS, "127.0.0.1,localhost"))
    env.update(dict.fromkeys(_CA_VARS, ca_file))
    return env


@contextlib.contextmanager
def routed_to(proxy: CloudProxy, ca_file: str) -> Iterator[dict[str, str]]:
    """Apply :func:`cloud_environ` to ``os.environ`` for a ``with`` block.

    The previous values are restored afterwards (also on error).  The
    environment is process-wide: do not run other HTTPS clients concurrently.
    """
    env = cloud_environ(proxy, ca_file)
    names = [*env, *CLEARED_VARS]
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in CLEARED_VARS:
            os.environ.pop(name, None)
        os.environ.update(env)
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
