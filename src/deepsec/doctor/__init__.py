"""``python -m deepsec doctor``: system checks, parameters and a token, without a database.

Give it a Django settings module (``--settings mysite.settings``) or a JSON
file (``--config file.json`` holding ``end_user_sec_params``,
``extra_auth_params``, or the parameters themselves, and optionally ``dsn``,
checked with the TCPS rule of :mod:`deepsec.dsn`, and ``DEEPSEC``).

With ``--settings`` it first runs deepsec's Django system checks on the
module (``INSTALLED_APPS``, ``MIDDLEWARE`` order, ``DEEPSEC``, each
database's ENGINE, TCPS connect string and ``end_user_sec_params``: see
:mod:`deepsec.django.checks`), every problem listed with what to change; a
module that fails to import is reported with its cause (the missing
environment variable or module), never the exception's message.  Then, for each configuration it:

1. validates ``end_user_sec_params`` (every problem listed);
2. acquires the database-access token from the identity provider, exactly as
   a connection would (``--identity`` supplies the end user: a token, or JSON
   ``["name", null]``; required for ``on_behalf_of``);
3. decodes the token's claims (without verifying them, and without ever
   printing the token) and builds the end-user security context offline;
4. reports what each connection would carry: spi_type, auth_flow, identity
   kind, the user name claim, data roles, attributes and the token's expiry.

No database is contacted.

Exit codes: ``0`` all good; ``1`` invalid configuration (a failing system
check, invalid parameters or identity); ``2`` token acquisition failed;
``3`` usage error (bad arguments, unreadable file, settings module that
cannot be imported).

The package: :mod:`~deepsec.doctor.loading` reads the ``--config`` file,
:mod:`~deepsec.doctor.settings` is the Django part (settings import, system
checks), :mod:`~deepsec.doctor.report` checks each configuration, and
:mod:`~deepsec.doctor.cli` is the command line.

Tokens, client secrets, database passwords and keys are never printed:
values are described by kind, and any error text is scrubbed of the secrets
the command knows.
"""

from __future__ import annotations

from .cli import build_parser, main
from .loading import load_targets
from .report import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_TOKEN,
    EXIT_USAGE,
    Target,
    UsageError,
    decode_claims,
)

__all__ = [
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_TOKEN",
    "EXIT_USAGE",
    "Target",
    "UsageError",
    "build_parser",
    "decode_claims",
    "load_targets",
    "main",
]
