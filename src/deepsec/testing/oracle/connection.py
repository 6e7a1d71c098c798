"""One client connection: reads each TTC request, answers it and records it (a thread each)."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .codec import (
    _DATA_FLAGS_EOF,
    _EXEC_OPTION_DEFINE,
    _EXEC_OPTION_DESCRIBE,
    _EXEC_OPTION_EXECUTE,
    _EXEC_OPTION_FETCH,
    _FUNC_AUTH_PHASE_ONE,
    _FUNC_AUTH_PHASE_TWO,
    _FUNC_COMMIT,
    _FUNC_EXECUTE,
    _FUNC_FETCH,
    _FUNC_LOGOFF,
    _FUNC_PING,
    _FUNC_REEXECUTE,
    _FUNC_REEXECUTE_AND_FETCH,
    _FUNC_ROLLBACK,
    _FUNC_SESSION_RELEASE,
    _MSG_DATA_TYPES,
    _MSG_FUNCTION,
    _MSG_PIGGYBACK,
    _MSG_PROTOCOL,
    _PACKET_ACCEPT,
    _PACKET_CONNECT,
    _PACKET_DATA,
    _PACKET_MARKER,
    _SDU,
    ORA_END_USER_TOKEN_INVALID,
    ORA_INVALID_LOGON,
    ORA_NO_DATA_FOUND,
    OracleError,
    Value,
    _ora_message,
    _ProtocolError,
    _Underflow,
)
from .logon import _O5Logon
from .messages import (
    _STATUS_OK,
    _accept_body,
    _describe,
    _error,
    _params,
    _protocol_reply,
    _Request,
    _rows,
    _version_number,
)
from .oson import decode_oson
from .parsing import _Cursor, _sql_kind, parse_request
from .records import ConnectionRecord, WireContext
from .sql import _Result, _Session

if TYPE_CHECKING:
    from .server import OracleTestServer

logger = logging.getLogger("deepsec.testing.oracle")

# ---------------------------------------------------------------------------
# Per-connection state and handler
# ---------------------------------------------------------------------------


@dataclass
class _ConnState:
    conn_id: int
    peer: tuple[str, int]
    user: str | None = None
    method: Literal["password", "token"] | None = None
    access_token: str | None = None
    logged_in: bool = False
    closed: bool = False
    seq: int = 0
    pop_header: str | None = None
    pop_signature: str | None = None

    def snapshot(self) -> ConnectionRecord:
        return ConnectionRecord(
            conn_id=self.conn_id,
            peer=self.peer,
            user=self.user,
            method=self.method,
            access_token=self.access_token,
            logged_in=self.logged_in,
            closed=self.closed,
            pop_header=self.pop_header,
            pop_signature=self.pop_signature,
        )


class _ConnectionClosed(Exception):
    pass


class _Handler:
    """Serves one client connection (runs in its own thread)."""

    def __init__(self, server: OracleTestServer, raw: socket.socket, state: _ConnState) -> None:
        self.server = server
        self.raw = raw
        self.sock: socket.socket = raw
        self.state = state
        self.full_length = False
        self.last_packet_full = False
        self.cursors: dict[int, _Cursor] = {}
        self.next_cursor = 0
        self.o5: _O5Logon | None = None
        self.schema = ""

    def abort(self) -> None:
        """Shut the socket down from another thread; the handler thread then ends."""
        with contextlib.suppress(OSError):
            # the plain socket method: no TLS close_notify, safe while recv() blocks
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    # -- transport ---------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise _ConnectionClosed
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _read_packet(self) -> tuple[int, bytes]:
        header = self._recv_exact(8)
        if self.full_length:
            length = struct.unpack(">I", header[:4])[0]
        else:
            length = struct.unpack(">H", header[:2])[0]
        if length < 8:
            raise _ProtocolError("bad packet length")
        self.last_packet_full = length >= _SDU
        return header[4], self._recv_exact(length - 8)

    def _read_data(self) -> bytes:
        """The payload of the next DATA packet (markers are skipped)."""
        while True:
            ptype, body = self._read_packet()
            if ptype == _PACKET_DATA:
                flags = struct.unpack(">H", body[:2])[0]
                if flags & _DATA_FLAGS_EOF:
                    raise _ConnectionClosed
                return body[2:]
            if ptype == _PACKET_MARKER:
                continue
            raise _ProtocolError(f"unexpected packet type {ptype}")

    def _send_packet(self, ptype: int, body: bytes) -> None:
        length = 8 + len(body)
        if self.full_length:
            header = struct.pack(">IBBH", length, ptype, 0, 0)
        else:
            header = struct.pack(">HHBBH", length, 0, ptype, 0, 0)
        self.sock.sendall(header + body)

    def _send_data(self, payload: bytes) -> None:
        step = _SDU - 10
        for i in range(0, max(len(payload), 1), step):
            self._send_packet(_PACKET_DATA, b"\x00\x00" + payload[i : i + step])

    # -- main loop -----------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except (_ConnectionClosed, ConnectionError, ssl.SSLError, OSError, ValueError) as exc:
            logger.debug("connection %d ended: %s", self.state.conn_id, type(exc).__name__)
        except _ProtocolError as exc:
            logger.warning("connection %d: protocol error: %s", self.state.conn_id, exc)
        except Exception:
            logger.exception("connection %d: unexpected server error", self.state.conn_id)
        finally:
            self.server._connection_ended(self)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _serve(self) -> None:
        ctx = self.server._server_ssl_context
        self.raw.settimeout(10)
        self.sock = ctx.wrap_socket(self.raw, server_side=True)
        self.sock.settimeout(None)
        ptype, body = self._read_packet()
        if ptype != _PACKET_CONNECT or len(body) < 20:
            raise _ProtocolError("expected a CONNECT packet")
        cdata_len, cdata_offset = struct.unpack(">HH", body[16:20])
        if cdata_len and len(body) + 8 < cdata_offset + cdata_len:
            self._read_packet()  # connect data sent separately in a DATA packet
        self._send_packet(_PACKET_ACCEPT, _accept_body())
        self.full_length = True
        while True:
            payload = self._read_data()
            if not payload:
                continue
            kind = payload[0]
            if kind == _MSG_PROTOCOL:
                self._send_data(_protocol_reply())
            elif kind == _MSG_DATA_TYPES:
                self._send_data(b"\x02\x00\x00")
            elif kind in (_MSG_FUNCTION, _MSG_PIGGYBACK):
                self._handle(payload)
            else:
                raise _ProtocolError(f"unexpected message type {kind}")

    # -- dispatch ------------------------------------------------------------------

    def _handle(self, payload: bytes) -> None:
        data = payload
        while True:
            try:
                req = parse_request(data, self.cursors, self.last_packet_full)
                break
            except _Underflow:
                if len(data) > 64 * 1024 * 1024:
                    raise _ProtocolError("request too large") from None
                data += self._read_data()
        for cursor_id in req.piggy.closed_cursors:
            self.cursors.pop(cursor_id, None)
        if req.piggy.schema:
            self.schema = req.piggy.schema.upper()
        context: WireContext | None = None
        context_error: OracleError | None = None
        if req.piggy.context_oson is not None:
            try:
                doc = decode_oson(req.piggy.context_oson)
                if not isinstance(doc, dict):
                    raise ValueError("context is not a JSON object")
                context = WireContext.from_document(doc)
            except ValueError as exc:
                logger.warning("connection %d: bad end-user context: %s", self.state.conn_id, exc)
                context = WireContext()
                context_error = OracleError(ORA_END_USER_TOKEN_INVALID, "malformed context")
            if context_error is None:
                context_error = self.server._validate_context(context)
        answer = _Answer()
        try:
            if req.parse_error is not None:
                logger.warning(
                    "connection %d: cannot parse function 0x%02x: %s",
                    self.state.conn_id,
                    req.function,
                    req.parse_error,
                )
                raise OracleError(3115)
            if context_error is not None and req.function not in (
                _FUNC_AUTH_PHASE_ONE,
                _FUNC_AUTH_PHASE_TWO,
                _FUNC_LOGOFF,
            ):
                raise context_error
            self._dispatch(req, context, answer)
        except OracleError as exc:
            answer.error = exc.code
            answer.payload = _error(exc.code, exc.message, cursor_id=answer.error_cursor)
        self.server._record(self.state, req, context, answer)
        self._send_data(answer.payload)
        if answer.close:
            raise _ConnectionClosed

    def _dispatch(self, req: _Request, context: WireContext | None, answer: _Answer) -> None:
        func = req.function
        if func == _FUNC_AUTH_PHASE_ONE:
            user = (req.auth_user or "").upper()
            self.state.user = user
            self.o5 = _O5Logon(self.server._password_for(user))
            answer.payload = self.o5.phase_one()
        elif func == _FUNC_AUTH_PHASE_TWO:
            self._auth_phase_two(req, answer)
        elif func == _FUNC_EXECUTE:
            self._execute(req, context, answer)
        elif func in (_FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH):
            self._reexecute(req, context, answer)
        elif func == _FUNC_FETCH:
            self._fetch(req, answer)
        elif func in (_FUNC_PING, _FUNC_COMMIT, _FUNC_ROLLBACK, _FUNC_SESSION_RELEASE):
            answer.payload = _STATUS_OK
        elif func == _FUNC_LOGOFF:
            self.cursors.clear()
            answer.payload = _STATUS_OK
        else:
            raise OracleError(3115, f"function 0x{func:02x} is not supported by the test server")

    def _auth_phase_two(self, req: _Request, answer: _Answer) -> None:
        token = req.auth_pairs.get("AUTH_TOKEN")
        if token is not None:
            self.state.method = "token"
            self.state.access_token = token
            self.state.pop_header = req.auth_pairs.get("AUTH_HEADER")
            self.state.pop_signature = req.auth_pairs.get("AUTH_SIGNATURE")
            self.state.user = self.server.token_user.upper()
            if not self.server._token_ok("access_token", token):
                answer.close = True
                raise OracleError(ORA_INVALID_LOGON)
            extra: list[tuple[str, str, int]] = []
        else:
            self.state.method = "password"
            if req.auth_user:
                self.state.user = req.auth_user.upper()
            if self.o5 is None or not self.o5.check(req.auth_pairs):
                answer.close = True
                raise OracleError(ORA_INVALID_LOGON)
            extra = [("AUTH_SVR_RESPONSE", self.o5.server_response(), 0)]
        self.state.logged_in = True
        self.schema = self.state.user or ""
        pairs = [
            ("AUTH_VERSION_NO", str(_version_number(23, 26, 4, 0, 0)), 0),
            ("AUTH_SESSION_ID", str(self.state.conn_id), 0),
            ("AUTH_SERIAL_NUM", str(1000 + self.state.conn_id % 60000), 0),
            ("AUTH_MAX_OPEN_CURSORS", "300", 0),
            ("AUTH_SC_SERVICE_NAME", self.server.service_name, 0),
            ("AUTH_INSTANCENAME", "deepsec1", 0),
            ("AUTH_SC_DBUNIQUE_NAME", "DEEPSECDB", 0),
            *extra,
        ]
        answer.payload = _params(pairs) + _STATUS_OK
        logger.debug(
            "connection %d: %s login as %s", self.state.conn_id, self.state.method, self.state.user
        )

    def _session(self, context: WireContext | None) -> _Session:
        return _Session(schema_user=self.schema or (self.state.user or ""), context=context)

    def _run(self, cursor: _Cursor, binds: Sequence[Value], context: WireContext | None) -> _Result:
        return self.server._engine().run(cursor.sql, binds, self._session(context))

    def _execute(self, req: _Request, context: WireContext | None, answer: _Answer) -> None:
        cursor: _Cursor | None
        if req.sql is not None:
            cursor = self.cursors.get(req.cursor_id) if req.cursor_id else None
            is_query, is_plsql = _sql_kind(req.sql)
            if cursor is None:
                cursor = _Cursor(0, req.sql, is_query, is_plsql)
            else:
                cursor.sql, cursor.is_query, cursor.is_plsql = req.sql, is_query, is_plsql
        else:
            cursor = self.cursors.get(req.cursor_id)
            if cursor is None:
                raise OracleError(1001)
        answer.cursor = cursor
        if req.bind_metas is not None:
            cursor.bind_metas = req.bind_metas
        rows_in = req.bind_rows or [()]
        if cursor.is_query:
            result = self._run(cursor, rows_in[0], context)
            self._register(cursor)
            answer.error_cursor = cursor.cursor_id
            cursor.columns = result.columns or ()
            out = [_describe(cursor.columns)]
            if req.options & _EXEC_OPTION_EXECUTE:
                cursor.pending = list(result.rows)
                cursor.fetched = 0
                if req.options & _EXEC_OPTION_FETCH:
                    out.append(self._take(cursor, req.num_iters, answer))
                else:
                    out.append(_error(cursor_id=cursor.cursor_id))
            else:
                cursor.pending = []
                out.append(_error(cursor_id=cursor.cursor_id))
            answer.payload = b"".join(out)
        else:
            rowcount = 0
            if req.options & _EXEC_OPTION_EXECUTE or not req.options & (
                _EXEC_OPTION_DESCRIBE | _EXEC_OPTION_DEFINE
            ):
                for row in rows_in:
                    rowcount += self._run(cursor, row, context).rowcount
            self._register(cursor)
            answer.payload = _error(cursor_id=cursor.cursor_id, rowcount=rowcount)

    def _register(self, cursor: _Cursor) -> None:
        if cursor.cursor_id == 0:
            self.next_cursor += 1
            cursor.cursor_id = self.next_cursor
            self.cursors[cursor.cursor_id] = cursor

    def _reexecute(self, req: _Request, context: WireContext | None, answer: _Answer) -> None:
        cursor = self.cursors.get(req.cursor_id)
        if cursor is None:
            raise OracleError(1001)
        answer.cursor = cursor
        answer.error_cursor = cursor.cursor_id
        rows_in = req.bind_rows or [()]
        if cursor.is_query:
            result = self._run(cursor, rows_in[0], context)
            cursor.pending = list(result.rows)
            cursor.fetched = 0
            if req.function == _FUNC_REEXECUTE_AND_FETCH:
                answer.payload = self._take(cursor, req.num_iters, answer)
            else:
                answer.payload = _error(cursor_id=cursor.cursor_id)
        else:
            rowcount = sum(self._run(cursor, row, context).rowcount for row in rows_in)
            answer.payload = _error(cursor_id=cursor.cursor_id, rowcount=rowcount)

    def _fetch(self, req: _Request, answer: _Answer) -> None:
        cursor = self.cursors.get(req.cursor_id)
        if cursor is None:
            raise OracleError(1001)
        answer.cursor = cursor
        answer.error_cursor = cursor.cursor_id
        answer.payload = self._take(cursor, req.num_iters, answer)

    @staticmethod
    def _take(cursor: _Cursor, count: int, answer: _Answer) -> bytes:
        batch = cursor.pending[: max(count, 0)]
        del cursor.pending[: len(batch)]
        cursor.fetched += len(batch)
        answer.rows = len(batch)
        body = _rows(batch, cursor.columns)
        if cursor.pending:
            return body + _error(cursor_id=cursor.cursor_id, rowcount=cursor.fetched)
        message = _ora_message(ORA_NO_DATA_FOUND)
        return body + _error(ORA_NO_DATA_FOUND, message, cursor.cursor_id, cursor.fetched)


@dataclass
class _Answer:
    payload: bytes = _STATUS_OK
    error: int | None = None
    error_cursor: int = 0
    rows: int = 0
    close: bool = False
    cursor: _Cursor | None = None
