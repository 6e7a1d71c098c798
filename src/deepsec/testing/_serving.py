"""Running the test servers' ``socketserver`` instances in a daemon thread."""

from __future__ import annotations

import socketserver
import threading


def serve_in_background(server: socketserver.BaseServer, name: str) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread named ``name``.

    A short poll interval makes :func:`stop_serving` return promptly.
    """
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
    )
    thread.start()
    return thread


def stop_serving(server: socketserver.BaseServer) -> None:
    """Stop the serve loop and close the listening socket."""
    server.shutdown()
    server.server_close()
