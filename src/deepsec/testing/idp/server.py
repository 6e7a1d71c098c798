"""The local identity provider's HTTPS server and request handler.

The handler parses requests, applies injected faults and writes the answers
(whole, dropped, or dripped byte by byte); what to answer is the provider's
business (:class:`Provider`, which :class:`LocalIdP
<deepsec.testing.idp.LocalIdP>` implements).  Every response carries
``Connection: close``, so a stopped provider is really down.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from .base import TokenRequest
from .dev import DEV_TOKEN_PATH
from .faults import Drop, Fault, Faults, apply_fault
from .oci import OCI_SCOPED_TOKEN_PATH


class Provider(Protocol):
    """What the handler asks of the provider behind it."""

    faults: Faults
    _generation: int

    def _record(self, record: TokenRequest) -> None: ...

    def _sleep_unless_reset(self, seconds: float, generation: int) -> bool: ...

    def _dev_token(self, user: str) -> tuple[int, dict[str, Any]]: ...

    def _handle_get(self, path: str, host: str | None = None) -> tuple[int, dict[str, Any]]: ...

    def _handle_post(
        self, path: str, form: Mapping[str, str], authorization: str
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str], Fault | None]: ...

    def _handle_oci_dataplane(
        self, target: str, raw: str, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]: ...


class Server(ThreadingHTTPServer):
    """The provider's HTTPS listener: one thread per connection, TLS in that thread."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], idp: Provider, ctx: ssl.SSLContext) -> None:
        self.idp = idp
        self.ssl_context = ctx
        super().__init__(address, Handler)

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


class Handler(BaseHTTPRequestHandler):
    """One request: route it to the provider, apply a fault, write the answer."""

    protocol_version = "HTTP/1.1"
    server: Server
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
            reply, delivery = apply_fault(fault)
        except Drop:
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
        except Drop:
            self._drop()
            return
        self._send(code, body, headers, delivery)
