"""``python -m deepsec.demo`` (what ``./run demo`` runs): see :mod:`deepsec.demo.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
