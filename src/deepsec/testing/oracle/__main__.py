"""``python -m deepsec.testing.oracle``: serve until interrupted (see :func:`.server.main`)."""

from __future__ import annotations

from .server import main

if __name__ == "__main__":
    raise SystemExit(main())
