"""``python -m deepsec COMMAND``: ``doctor`` (checks, a token, no database) or ``demo``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m deepsec COMMAND [options]

commands:
  doctor   run deepsec's Django system checks (--settings), validate end_user_sec_params,
           acquire a token and show what a connection carries; no database needed
  demo     run an example app against a local IdP and Oracle wire test server
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a command; exit code 3 for a usage error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 3
    command, rest = args[0], args[1:]
    if command == "doctor":
        from .doctor import main as doctor

        return doctor(rest)
    if command == "demo":
        from .demo import main as demo

        return demo(rest)
    sys.stderr.write(f"unknown command {command!r}\n{USAGE}")
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
