"""Example apps served over HTTP on ``127.0.0.1``, in daemon threads.

:func:`serve_asgi` (uvicorn) and :func:`serve_wsgi` (waitress) serve any app;
:func:`serve_app` imports and serves one of the repository's
``example_projects`` by name.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def example_projects_dir() -> Path | None:
    """The repository's ``example_projects`` folder, when running from a checkout."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "example_projects"
        if candidate.is_dir():
            return candidate
    return None


class ServedApp:
    """An app served over HTTP on 127.0.0.1 (:func:`serve_asgi`, :func:`serve_wsgi`)."""

    def __init__(self, name: str, port: int, stop: Any, thread: threading.Thread) -> None:
        self.name = name
        self.port = port
        self._stop = stop
        self._thread = thread

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the server and wait for its thread."""
        self._stop()
        self._thread.join(10)


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the example app did not start listening on port {port}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_or_free(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1, else a free port (0: a free port)."""
    import socket

    if port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                print(f"  (port {port} is in use; using a free port instead)")
            else:
                return port
    return _free_port()


def _import_example(module: str) -> Any:
    import importlib

    folder = example_projects_dir()
    if folder is None:
        raise SystemExit(
            "example_projects/ not found: run the demo from a checkout of the repository"
        )
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(module)


def serve_asgi(app: Any, port: int = 0, label: str = "ASGI app") -> ServedApp:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (lifespan on)."""
    import uvicorn

    port = port or _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True

    _wait_listening(port)
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return ServedApp(label, port, stop, thread)


def serve_wsgi(app: Any, port: int = 0, label: str = "WSGI app") -> ServedApp:
    """Serve a WSGI app with waitress on 127.0.0.1 in a daemon thread."""
    from waitress.server import create_server  # type: ignore[import-untyped]

    port = port or _free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=8)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    _wait_listening(port)
    return ServedApp(label, port, server.close, thread)


def serve_app(app_name: str, port: int = 0) -> ServedApp:
    """Serve the ``fastapi``, ``flask`` or ``django`` example on 127.0.0.1 (HR_* must be set)."""
    port = _port_or_free(port)
    if app_name == "fastapi":
        app = _import_example("fastapi_hr").create_app()
        return serve_asgi(app, port, "fastapi_hr (FastAPI, uvicorn)")
    if app_name == "flask":
        app = _import_example("flask_hr").create_app()
        return serve_wsgi(app, port, "flask_hr (Flask, waitress)")
    if app_name == "django":
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_hr.settings")
        _import_example("django_hr")
        from django.core.wsgi import get_wsgi_application

        return serve_wsgi(get_wsgi_application(), port, "django_hr (Django, waitress)")
    raise ValueError(f"unknown app {app_name!r}: fastapi, flask or django")
