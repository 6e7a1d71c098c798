"""A real Redis server on a free loopback port, for tests of the shared token
cache and of Celery (as its broker).

It runs Debian's ``redis-server`` binary (``./run test`` installs it the way it
installs chromium), with no persistence, in a private temporary directory.
:meth:`RedisTestServer.kill` and :meth:`RedisTestServer.start` on the same
port let a test take Redis away in the middle of a run and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["RedisTestServer", "redis_server_binary"]


def redis_server_binary() -> str | None:
    """The path of ``redis-server`` (``$DEEPSEC_REDIS_SERVER`` or ``PATH``), or ``None``."""
    return os.environ.get("DEEPSEC_REDIS_SERVER") or shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisTestServer:
    """One ``redis-server`` process on 127.0.0.1.

    ``url`` is its ``redis://`` URL (database 0); ``url_for(db)`` another
    logical database of the same server.
    """

    def __init__(self, *, port: int | None = None, password: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server); "
                "./run test installs it"
            )
        self.binary = binary
        self.port = port or _free_port()
        self.password = password
        self._dir = tempfile.mkdtemp(prefix="deepsec-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisTestServer(port={self.port}, {state})"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (with the password, if one is set)."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The URL of logical database ``db``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisTestServer:
        """Start the server (again, on the same port) and wait until it answers."""
        if self.running:
            return self
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(  # noqa: S603 - a fixed binary and our own arguments
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self._proc.returncode}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): clients see connections drop."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def flush(self) -> None:
        """Delete every key in every database (between tests)."""
        self.command("FLUSHALL")

    def command(self, *args: str) -> bytes:
        """Send one command in Redis's inline protocol and return the raw reply line(s).

        A dependency-free way for fixtures to talk to the server; tests use
        redis-py.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            parts = []
            if self.password:
                parts.append(f"AUTH {self.password}\r\n")
            parts.append(" ".join(args) + "\r\n")
            sock.sendall("".join(parts).encode())
            time.sleep(0.01)
            return sock.recv(65536)
