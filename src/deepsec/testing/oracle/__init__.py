"""An Oracle Net (TNS/TTC) test server that python-oracledb's thin driver talks to.

No Oracle AI Database 26ai runs on a developer machine, so the project's
end-to-end tests connect the *real* python-oracledb thin driver (26.1) over
TCPS to this small server.  It speaks just enough of the protocol:

* TLS with a generated test CA (:class:`deepsec.testing.tls.TestCA`), TNS
  CONNECT/ACCEPT (version 318, no fast auth, no end-of-response marker),
  protocol and data-type negotiation.  The compile capabilities announce the
  end-user security context piggyback (byte 45, bit 0x02).
* Password login (O5LOGON, 12c verifier, PBKDF2-SHA512) and token login
  (``access_token``; the token is recorded, and so are the proof-of-possession
  header and signature the driver sends for an ``(token, private_key)`` login:
  :meth:`ConnectionRecord.verify_proof_of_possession`).  A bad password
  answers ORA-01017.
* Execute (0x5e), re-execute (0x04), re-execute and fetch (0x4e) and fetch
  (0x05) with per-connection cursors, so the driver's statement cache works;
  binds are parsed from their metadata; rows (NUMBER and VARCHAR2) span as
  many fetch round trips as the client's array size requires.
* Ping, commit, rollback, logoff.
* Piggybacks (TTC message 17) are parsed by structure: the end-user security
  context (0xcd, with an OSON document decoded by :func:`decode_oson`), close
  cursors (0x69), end-to-end attributes, current schema, session state,
  application context / HA readiness and pipeline begin.

What the SQL "engine" answers (see :class:`OracleTestServer` for details):
``select <expr>[, ...] from dual`` where an expression is a number or string
literal, a bind, ``user``, ``null``, ``sys_context('userenv', ...)`` or
``xs_sys_context('xs$session', ...)`` (``where dummy = ...`` is evaluated,
other conditions on DUAL are treated as true); ``select ... from <canned table>``
(see :meth:`OracleTestServer.add_table`); DDL, DML, ``alter session`` and
PL/SQL blocks succeed without doing anything; any other query fails with a
clear ORA error (ORA-00942 / ORA-00904 / ORA-00900).  Comments anywhere in a
statement are ignored but kept in the recorded SQL text, so tests can tag a
statement (``/* req-17 */ select ...``) and find it again wherever the tag sits
(:meth:`OracleTestServer.find_tagged`).  An optional row policy
(:attr:`OracleTestServer.row_policy`) filters canned tables per end user: an
emulation for tests and demos, not Oracle's policy language.

Every round trip is recorded (:class:`RoundTrip`) with the end-user context
that travelled with it (:class:`WireContext`), so tests can prove under which
identity a statement ran and that attaching a context costs no extra round
trip.  Token values are never logged.

Run ``python -m deepsec.testing.oracle --port 1522 --ca-dir DIR`` to serve
from the command line; it prints the DSN and the CA file path.

The package has one module per job; this module re-exports the public names,
so ``from deepsec.testing.oracle import OracleTestServer`` is the import to use:

* :mod:`.codec`: TTC constants, ORA errors, length-prefixed values, NUMBER/DATE;
* :mod:`.oson`: the OSON decoder for the end-user context document;
* :mod:`.messages`: TTC answer builders and request readers (binds, piggybacks);
* :mod:`.logon`: O5LOGON (password login), server side;
* :mod:`.sql`: the tiny SQL engine (DUAL expressions, canned tables);
* :mod:`.policy`: :data:`RowPolicy`, the emulated per-end-user row filter;
* :mod:`.records`: :class:`WireContext`, :class:`RoundTrip`, :class:`ConnectionRecord`;
* :mod:`.connection`: one client connection's conversation (a thread each);
* :mod:`.server`: :class:`OracleTestServer` (listener, tables, records) and the CLI.
"""

from __future__ import annotations

from .codec import (
    ORA_DATABASE_ACCESS_TOKEN_INVALID,
    ORA_END_USER_TOKEN_INVALID,
    ORA_INVALID_LOGON,
    ORA_NO_DATA_FOUND,
    Column,
    ColumnType,
    OracleError,
    Value,
    decode_oracle_number,
    encode_oracle_number,
)
from .oson import decode_oson
from .policy import Row, RowPolicy
from .records import (
    ConnectionRecord,
    RoundTrip,
    WireContext,
    decode_jwt_claims,
    statement_has_tag,
)
from .server import DEFAULT_USERS, OracleTestServer, TokenValidator, main
from .sql import strip_sql_comments

__all__ = [
    "DEFAULT_USERS",
    "ORA_DATABASE_ACCESS_TOKEN_INVALID",
    "ORA_END_USER_TOKEN_INVALID",
    "ORA_INVALID_LOGON",
    "ORA_NO_DATA_FOUND",
    "Column",
    "ColumnType",
    "ConnectionRecord",
    "OracleError",
    "OracleTestServer",
    "RoundTrip",
    "Row",
    "RowPolicy",
    "TokenValidator",
    "Value",
    "WireContext",
    "decode_jwt_claims",
    "decode_oracle_number",
    "decode_oson",
    "encode_oracle_number",
    "main",
    "statement_has_tag",
    "strip_sql_comments",
]
