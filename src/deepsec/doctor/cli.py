"""The ``doctor`` command line: arguments, then each configuration's report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .loading import load_targets, parse_identity
from .report import EXIT_OK, EXIT_USAGE, Out, UsageError, check_target
from .settings import add_settings_secrets, django_check_lines, import_settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``doctor`` argument parser (argument errors raise :class:`UsageError`)."""
    parser = _Parser(
        prog="python -m deepsec doctor",
        description="Validate end_user_sec_params, acquire a token and show what a "
        "connection would carry. Exit codes: 0 ok, 1 invalid configuration, "
        "2 token acquisition failed, 3 usage error.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--settings", metavar="MODULE", help="Django settings module")
    source.add_argument("--config", metavar="FILE", help="JSON file with end_user_sec_params")
    parser.add_argument("--database", metavar="ALIAS", help="only this DATABASES alias")
    parser.add_argument(
        "--identity",
        metavar="TOKEN_OR_JSON",
        help='end user: an access token, or JSON ["name", null] (use - to read it from stdin)',
    )
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the doctor; returns the exit code."""
    out = Out(stream or sys.stdout)
    parser = build_parser()
    code = EXIT_OK
    try:
        args = parser.parse_args(argv)
        identity_text = args.identity
        if identity_text == "-":
            identity_text = sys.stdin.readline().strip()
        if identity_text:
            out.add_secret(identity_text)
        identity = parse_identity(identity_text)
        if args.settings and not args.config:
            module = import_settings(args.settings)
            add_settings_secrets(module, out)
            code = django_check_lines(module, args.settings, out)
            out()
        targets = load_targets(args.settings, args.config, args.database)
    except UsageError as exc:
        out(f"usage error: {exc}")
        out(
            "usage: python -m deepsec doctor (--settings MODULE | --config FILE) "
            "[--database ALIAS] [--identity TOKEN_OR_JSON]"
        )
        return EXIT_USAGE
    for target in targets:
        code = max(code, check_target(target, identity, out))
        out()
    out(
        "doctor: "
        + {0: "OK", 1: "INVALID CONFIGURATION", 2: "TOKEN ACQUISITION FAILED", 3: "USAGE ERROR"}[
            code
        ]
    )
    return code
