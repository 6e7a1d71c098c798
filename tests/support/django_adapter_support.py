"""Support code for the Django adapter tests (importable from test modules)."""

from __future__ import annotations

import errno
import threading
from typing import Any


class WsgiServer:
    """A real WSGI server (waitress, threads) on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, threads: int = 8) -> None:
        from waitress.server import create_server

        self._server = create_server(
            app, host="127.0.0.1", port=0, threads=threads, clear_untrusted_proxy_headers=True
        )
        self.port: int = self._server.effective_port  # type: ignore[union-attr]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="waitress", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        except OSError as exc:
            # close() from another thread races the loop's select() on the
            # closed socket (EBADF; Pylons/waitress#468, as in adapter_support):
            # that is the server stopping, not a failure.
            if not (self._closing.is_set() and exc.errno == errno.EBADF):
                raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WsgiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.close()
        self._thread.join(5)
