"""``python -m deepsec.testing.idp``: run a local identity provider until interrupted."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
