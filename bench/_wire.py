"""The Oracle wire test server in a process of its own, for realistic benches.

A bench that runs the server in its own process measures the client's cost
(driver, hook, adapter) without the server's threads competing for the same
interpreter.  ``with wire_server() as wire:`` yields the DSN, the user and
password of a working login, and ``wire.ssl_context()`` (a fresh client
context trusting the server's private CA, as python-oracledb mutates it).
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "app_user"
PASSWORD = "app_password"

_SERVER = """
import sys
from deepsec.testing.oracle import OracleTestServer
from deepsec.testing.tls import TestCA
ca = TestCA()
ca.write_ca_pem(sys.argv[1])
server = OracleTestServer(users={USERS}, ca=ca).start()
print(server.dsn, flush=True)
sys.stdin.read()  # until the bench closes our stdin
server.stop()
""".replace("{USERS}", repr({USER: PASSWORD}))


@dataclass(frozen=True)
class WireServer:
    """Where the server listens and how to log in."""

    dsn: str
    ca_file: str
    user: str = USER
    password: str = PASSWORD

    def ssl_context(self) -> ssl.SSLContext:
        """A new client TLS context trusting only the server's CA."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(cafile=self.ca_file)
        return ctx


@contextlib.contextmanager
def wire_server() -> Iterator[WireServer]:
    """Start the wire test server in a subprocess; stop it on exit."""
    with tempfile.TemporaryDirectory(prefix="deepsec-bench-") as tmp:
        ca_file = str(Path(tmp) / "ca.pem")
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, ca_file],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            dsn = proc.stdout.readline().strip()
            if not dsn:
                raise RuntimeError("the wire test server did not start")
            yield WireServer(dsn=dsn, ca_file=ca_file)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
