"""The listener and the public :class:`OracleTestServer` API (tables, records); the CLI."""

from __future__ import annotations

import argparse
import logging
import selectors
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType, TracebackType

from deepsec.testing.tls import TestCA

from .codec import (
    _FUNC_NAMES,
    ORA_DATABASE_ACCESS_TOKEN_INVALID,
    ORA_END_USER_TOKEN_INVALID,
    Column,
    OracleError,
    Value,
)
from .connection import _Answer, _ConnState, _Handler
from .messages import _Request
from .policy import RowPolicy
from .records import ConnectionRecord, RoundTrip, WireContext, statement_has_tag
from .sql import _SqlEngine, _Table, _type_of, _unquote_ident

logger = logging.getLogger("deepsec.testing.oracle")

#: Users accepted for password login when none are given (names are
#: case-insensitive, passwords case-sensitive).
DEFAULT_USERS: Mapping[str, str] = MappingProxyType({"APP_USER": "app_password", "SCOTT": "tiger"})

#: ``validator(kind, token) -> bool``; ``kind`` is ``"access_token"`` (login),
#: ``"end_user_token"`` or ``"database_access_token"`` (end-user context).
TokenValidator = Callable[[str, str], bool]

# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


def _normalize_columns(
    columns: Sequence[str | tuple[str, str] | Column], rows: Sequence[Sequence[Value]]
) -> tuple[Column, ...]:
    out: list[Column] = []
    for i, spec in enumerate(columns):
        if isinstance(spec, Column):
            out.append(Column(spec.name.upper(), spec.type))
            continue
        if isinstance(spec, tuple):
            name, type_name = spec
            kind = type_name.lower()
            if kind in ("number", "int", "integer", "float"):
                out.append(Column(name.upper(), "number"))
            elif kind in ("varchar", "varchar2", "str", "string", "text"):
                out.append(Column(name.upper(), "varchar"))
            else:
                raise ValueError(f"unsupported column type {type_name!r}: use number or varchar")
            continue
        values = [row[i] for row in rows if i < len(row) and row[i] is not None]
        numeric = bool(values) and all(_type_of(v) == "number" for v in values)
        out.append(Column(spec.upper(), "number" if numeric else "varchar"))
    return tuple(out)


class OracleTestServer:
    """An Oracle Net test server over TCPS for python-oracledb's thin driver.

    Args:
        users: ``{user: password}`` accepted for password login (user names
            are case-insensitive); :data:`DEFAULT_USERS` when None.
        host: interface to listen on (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`port` after start).
        ca: the test CA issuing the server certificate; a private one (in a
            temporary directory, removed on :meth:`stop`) when None.
        service_name: service name used in :attr:`dsn` (any name is accepted).
        token_user: schema user reported for token (``access_token``) logins.
        token_validator: see :attr:`token_validator`.
        row_policy: see :attr:`row_policy`.

    Attributes:
        token_validator: ``None`` (accept every token) or
            ``callable(kind, token) -> bool`` with ``kind`` one of
            ``"access_token"`` (login; rejection answers ORA-01017),
            ``"end_user_token"`` (rejection answers ORA-52601 on the round trip
            that carries it) or ``"database_access_token"`` (ORA-52602).  An
            exception raised by the validator counts as a rejection.  May be
            changed while the server runs.
        row_policy: ``None`` (every caller sees every row of a canned table)
            or ``policy(context, row) -> bool``, asked for each row of the
            :meth:`add_table` tables with the end-user context of the round
            trip (:class:`WireContext`, ``None`` when none came with it) and a
            :class:`~deepsec.testing.oracle.policy.Row`.  An **emulation**
            for tests and demos of a database that filters rows by end user,
            not Oracle's policy language; a policy that raises answers
            ORA-28113.  May be changed while the server runs.

    Example::

        with OracleTestServer() as server:
            conn = oracledb.connect(user="app_user", password="app_password",
                                    dsn=server.dsn, ssl_context=server.client_ssl_context())
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: TestCA | None = None,
        *,
        service_name: str = "FREEPDB1",
        token_user: str = "APP_USER",  # noqa: S107 - a user name, not a password
        token_validator: TokenValidator | None = None,
        row_policy: RowPolicy | None = None,
    ) -> None:
        self._users = {k.upper(): v for k, v in (users or DEFAULT_USERS).items()}
        self.host = host
        self._requested_port = port
        self._owns_ca = ca is None
        self.ca = ca if ca is not None else TestCA()
        self.service_name = service_name
        self.token_user = token_user
        self.token_validator = token_validator
        self.row_policy = row_policy
        identities = (host, "localhost") if host != "localhost" else ("localhost", "127.0.0.1")
        self._cert = self.ca.issue_server_cert(*identities, name=f"oracle-{host.replace(':', '_')}")
        self._server_ssl_context = self._cert.server_ssl_context()
        self._lock = threading.RLock()
        self._tables: dict[str, _Table] = {}
        self._round_trips: list[RoundTrip] = []
        self._index = 0
        self._conn_states: dict[int, _ConnState] = {}
        self._handlers: dict[int, tuple[_Handler, threading.Thread]] = {}
        self._next_conn_id = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> OracleTestServer:
        """Bind, listen and start accepting connections; returns ``self``."""
        if self._listener is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"oracle-test-server:{self.port}", daemon=True
        )
        self._accept_thread.start()
        logger.info("Oracle test server listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            handlers = list(self._handlers.values())
        for handler, _ in handlers:
            handler.abort()
        for _, thread in handlers:
            thread.join(timeout)
        if self._owns_ca:
            self.ca.close()
        logger.info("Oracle test server on port %d stopped", self.port)

    def __enter__(self) -> OracleTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._listener is not None and not self._stopping.is_set()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not selector.select(timeout=0.1):
                    continue
                try:
                    raw, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                raw.setblocking(True)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._spawn(raw, (str(peer[0]), int(peer[1])))

    def _spawn(self, raw: socket.socket, peer: tuple[str, int]) -> None:
        with self._lock:
            self._next_conn_id += 1
            state = _ConnState(conn_id=self._next_conn_id, peer=peer)
            self._conn_states[state.conn_id] = state
            handler = _Handler(self, raw, state)
            thread = threading.Thread(
                target=handler.run, name=f"oracle-test-conn-{state.conn_id}", daemon=True
            )
            self._handlers[state.conn_id] = (handler, thread)
        thread.start()

    def _connection_ended(self, handler: _Handler) -> None:
        with self._lock:
            handler.state.closed = True
            self._handlers.pop(handler.state.conn_id, None)

    # -- configuration -------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """Easy Connect string, e.g. ``tcps://127.0.0.1:PORT/FREEPDB1``.

        Use it with ``ssl_context=server.client_ssl_context()``; the server
        certificate's CN is the host, so the driver's DN match passes without
        ``ssl_server_dn_match=False``.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcps://{host}:{self.port}/{self.service_name}"

    @property
    def ca_pem_path(self) -> str:
        """Path of the CA certificate (PEM) clients must trust."""
        return str(self.ca.ca_pem_path)

    def client_ssl_context(self) -> ssl.SSLContext:
        """A new client SSL context trusting the server's CA (one per connect/pool)."""
        return self.ca.client_ssl_context()

    @property
    def users(self) -> Mapping[str, str]:
        """Password users (upper-case names)."""
        with self._lock:
            return MappingProxyType(dict(self._users))

    def add_user(self, user: str, password: str) -> None:
        """Accept ``user``/``password`` for password login."""
        with self._lock:
            self._users[user.upper()] = password

    def _password_for(self, user: str) -> str | None:
        with self._lock:
            return self._users.get(user.upper())

    def add_table(
        self,
        name: str,
        columns: Sequence[str | tuple[str, str] | Column],
        rows: Sequence[Sequence[Value]] = (),
    ) -> None:
        """Serve a canned table to ``select ... from <name>``.

        Args:
            name: table name (case-insensitive; a schema prefix in queries is ignored).
            columns: names, ``(name, "number" | "varchar")`` pairs or
                :class:`Column` objects; a bare name is NUMBER when every
                non-null value in that column is a number, else VARCHAR2.
            rows: the rows, each a sequence with one value per column.

        Supported queries: ``select *``, ``select col[, col ...]`` (with
        aliases), ``select count(*)``, optionally ``where col = :bind`` or
        ``where col = <literal>`` joined with ``and``; ``order by`` is ignored.
        With a :attr:`row_policy`, each query sees only the rows it allows.
        """
        cols = _normalize_columns(columns, rows)
        fixed_rows = []
        for row in rows:
            if len(row) != len(cols):
                raise ValueError(f"row {row!r} has {len(row)} values for {len(cols)} columns")
            fixed_rows.append(tuple(row))
        table = _Table(_unquote_ident(name), cols, tuple(fixed_rows))
        with self._lock:
            self._tables[table.name] = table

    def remove_table(self, name: str) -> None:
        """Stop serving a canned table (no error if absent)."""
        with self._lock:
            self._tables.pop(_unquote_ident(name), None)

    def _engine(self) -> _SqlEngine:
        with self._lock:
            return _SqlEngine(dict(self._tables), self.row_policy)

    def _token_ok(self, kind: str, token: str) -> bool:
        validator = self.token_validator
        if validator is None:
            return True
        try:
            return bool(validator(kind, token))
        except Exception:
            logger.warning("token validator raised for a %s; treating it as invalid", kind)
            return False

    def _validate_context(self, context: WireContext) -> OracleError | None:
        if context.end_user_token is not None and not self._token_ok(
            "end_user_token", context.end_user_token
        ):
            return OracleError(ORA_END_USER_TOKEN_INVALID)
        if context.database_access_token is not None and not self._token_ok(
            "database_access_token", context.database_access_token
        ):
            return OracleError(ORA_DATABASE_ACCESS_TOKEN_INVALID)
        return None

    # -- recording -----------------------------------------------------------------

    def _record(
        self, state: _ConnState, req: _Request, context: WireContext | None, answer: _Answer
    ) -> None:
        cursor = answer.cursor
        sql = req.sql if req.sql is not None else (cursor.sql if cursor is not None else None)
        rows = tuple(req.bind_rows)
        with self._lock:
            self._index += 1
            state.seq += 1
            trip = RoundTrip(
                index=self._index,
                conn_id=state.conn_id,
                seq=state.seq,
                function=_FUNC_NAMES.get(req.function, f"0x{req.function:02x}"),
                function_code=req.function,
                sql=sql,
                binds=rows[0] if rows else (),
                bind_rows=rows,
                context=context,
                piggybacks=tuple(req.piggy.codes),
                cursor_id=cursor.cursor_id if cursor is not None else 0,
                error=answer.error,
                rows=answer.rows,
            )
            self._round_trips.append(trip)

    def mark(self) -> int:
        """The index of the latest recorded round trip (use with ``since=``)."""
        with self._lock:
            return self._index

    def round_trips(
        self, conn_id: int | None = None, *, since: int | None = None
    ) -> list[RoundTrip]:
        """Recorded round trips, oldest first.

        Args:
            conn_id: only this connection's (``connection.session_id``).
            since: only those recorded after :meth:`mark` returned this value.
        """
        with self._lock:
            trips = list(self._round_trips)
        return [
            t
            for t in trips
            if (conn_id is None or t.conn_id == conn_id) and (since is None or t.index > since)
        ]

    def statements(
        self, conn_id: int | None = None, *, since: int | None = None
    ) -> list[RoundTrip]:
        """Recorded executions (execute, re-execute, re-execute and fetch) only."""
        return [t for t in self.round_trips(conn_id, since=since) if t.is_statement]

    def find_statements(self, text: str, *, since: int | None = None) -> list[RoundTrip]:
        """Executions whose SQL contains ``text`` (e.g. a ``/* req-17 */`` tag)."""
        return [t for t in self.statements(since=since) if t.sql is not None and text in t.sql]

    def find_tagged(self, tag: str, *, since: int | None = None) -> list[RoundTrip]:
        """Executions whose SQL carries ``tag`` in a comment, wherever it sits.

        ``/* t1 */ select ...``, ``select ... /* t1 */ from dual``, ``-- t1``;
        unlike :meth:`find_statements`, also a trailing ``/* t1 */`` that
        Django's Oracle backend cut to ``/* t1 *`` (see
        :func:`~deepsec.testing.oracle.records.statement_has_tag`).
        """
        return [t for t in self.statements(since=since) if statement_has_tag(t.sql, tag)]

    def connections(self) -> list[ConnectionRecord]:
        """Snapshots of every connection seen since the last :meth:`clear_records`."""
        with self._lock:
            return [s.snapshot() for s in self._conn_states.values()]

    def connection(self, conn_id: int) -> ConnectionRecord:
        """The snapshot of one connection (KeyError if unknown)."""
        with self._lock:
            return self._conn_states[conn_id].snapshot()

    @property
    def active_connections(self) -> int:
        """Number of connections currently being served."""
        with self._lock:
            return len(self._handlers)

    def clear_records(self) -> None:
        """Forget recorded round trips and closed connections (open ones stay listed)."""
        with self._lock:
            self._round_trips.clear()
            for conn_id in [c for c, s in self._conn_states.items() if s.closed]:
                del self._conn_states[conn_id]

    def reset(self) -> None:
        """Clear records, drop the token validator, the row policy and every canned table."""
        with self._lock:
            self.clear_records()
            self.token_validator = None
            self.row_policy = None
            self._tables.clear()

    def iter_contexts(self, conn_id: int | None = None) -> Iterator[WireContext | None]:
        """The context of every recorded round trip (None where none was sent)."""
        for trip in self.round_trips(conn_id):
            yield trip.context


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepsec.testing.oracle``: serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m deepsec.testing.oracle", description="Oracle wire test server (TCPS)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ca-dir", default=None, help="directory for the CA and server cert")
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="password user (repeatable; default app_user:app_password and scott:tiger)",
    )
    parser.add_argument("--service-name", default="FREEPDB1")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    users = None
    if args.user:
        users = {}
        for item in args.user:
            name, sep, password = item.partition(":")
            if not sep:
                parser.error(f"--user needs USER:PASSWORD, got {item!r}")
            users[name] = password
    ca = TestCA(args.ca_dir) if args.ca_dir else None
    server = OracleTestServer(
        users=users, host=args.host, port=args.port, ca=ca, service_name=args.service_name
    )
    server.start()
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sys.stdout.write(f"DSN={server.dsn}\nCA={server.ca_pem_path}\n")
    sys.stdout.flush()
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
