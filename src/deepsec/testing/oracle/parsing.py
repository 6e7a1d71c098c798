"""Reading one client request: a TTC function message (and its piggybacks) into a ``_Request``.

What a request means can depend on the connection: an execute's bind rows
are read by the SQL of the cursor it names, and a reexecute by that cursor's
bind metadata, so the parser is given the connection's open cursors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .codec import (
    _FUNC_AUTH_PHASE_ONE,
    _FUNC_AUTH_PHASE_TWO,
    _FUNC_EXECUTE,
    _FUNC_FETCH,
    _FUNC_REEXECUTE,
    _FUNC_REEXECUTE_AND_FETCH,
    _MSG_FUNCTION,
    _MSG_PIGGYBACK,
    _MSG_ROW_DATA,
    Column,
    Value,
    _ProtocolError,
    _Reader,
    _Underflow,
)
from .messages import (
    _BindMeta,
    _Piggybacks,
    _read_bind_meta,
    _read_bind_row,
    _read_piggyback,
    _Request,
)
from .sql import _PLSQL_WORDS, strip_sql_comments


@dataclass
class _Cursor:
    """An open cursor of one connection: its statement, binds and rows still to fetch."""

    cursor_id: int
    sql: str
    is_query: bool
    is_plsql: bool
    bind_metas: list[_BindMeta] = field(default_factory=list)
    columns: tuple[Column, ...] = ()
    pending: list[tuple[Value, ...]] = field(default_factory=list)
    fetched: int = 0


def _sql_kind(sql: str) -> tuple[bool, bool]:
    """(is_query, is_plsql) of a statement, the way the driver classifies it."""
    text = strip_sql_comments(sql).strip().lstrip("(").lower()
    first = text.split(None, 1)[0] if text else ""
    return first in ("select", "with"), first in _PLSQL_WORDS


def parse_request(
    payload: bytes, cursors: Mapping[int, _Cursor], last_packet_full: bool
) -> _Request:
    """The request in ``payload``; a malformed body is kept as ``parse_error``.

    ``last_packet_full``: the payload's last packet filled the SDU, so bind
    rows may continue past its end (a short read then raises ``_Underflow``,
    and the caller reads more).
    """
    r = _Reader(payload)
    piggy = _Piggybacks()
    while r.peek() == _MSG_PIGGYBACK:
        r.u8()
        _read_piggyback(r, piggy)
    if r.u8() != _MSG_FUNCTION:
        raise _ProtocolError("expected a function message after piggybacks")
    req = _Request(function=r.u8(), piggy=piggy)
    r.u8()  # sequence number
    try:
        if req.function in (_FUNC_AUTH_PHASE_ONE, _FUNC_AUTH_PHASE_TWO):
            _parse_auth(r, req)
        elif req.function == _FUNC_EXECUTE:
            _parse_execute(r, req, cursors, last_packet_full)
        elif req.function in (_FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH):
            _parse_reexecute(r, req, cursors, last_packet_full)
        elif req.function == _FUNC_FETCH:
            req.cursor_id = r.ub()
            req.num_iters = r.ub()
    except _Underflow:
        raise
    except (_ProtocolError, ValueError, IndexError, UnicodeDecodeError) as exc:
        req.parse_error = str(exc)
    return req


def _parse_auth(r: _Reader, req: _Request) -> None:
    has_user = r.u8()
    r.ub()  # user length
    r.ub()  # auth mode
    r.u8()
    count = r.ub()
    r.u8()
    r.u8()
    if has_user:
        user = r.blen()
        req.auth_user = user.decode() if user else None
    for _ in range(count):
        key = r.two()
        value = r.two()
        r.ub()  # flags
        req.auth_pairs[(key or b"").decode()] = (value or b"").decode()


def _read_rows(
    r: _Reader, req: _Request, expected: int, is_plsql: bool, last_packet_full: bool
) -> None:
    metas = req.bind_metas or []
    for _ in range(expected):
        if r.remaining() == 0 and not last_packet_full:
            break
        if r.peek() != _MSG_ROW_DATA:
            break
        r.u8()
        req.bind_rows.append(_read_bind_row(r, metas, is_plsql))


def _parse_execute(
    r: _Reader, req: _Request, cursors: Mapping[int, _Cursor], last_packet_full: bool
) -> None:
    req.options = r.ub()
    req.cursor_id = r.ub()
    has_sql = r.u8()
    r.ub()  # sql length
    r.u8()
    r.ub()  # al8i4 length
    r.u8()
    r.u8()
    r.ub()  # prefetch buffer size
    req.num_iters = r.ub()
    r.ub()  # max long size
    r.u8()
    num_params = r.ub()
    for _ in range(5):
        r.u8()
    r.u8()
    num_defines = r.ub()
    r.ub()  # registration id (lsb)
    r.u8()
    r.u8()
    r.u8()
    r.ub()
    r.u8()
    r.ub()
    r.ub()  # registration id (msb)
    r.u8()
    r.ub()
    r.u8()
    r.u8()  # sql signature (field version >= 12.2)
    r.ub()
    r.u8()
    r.ub()
    r.u8()
    r.u8()  # chunk ids (field version >= 12.2 ext 1)
    r.ub()
    if has_sql:
        sql_bytes = r.blen()
        req.sql = sql_bytes.decode("utf-8", "replace") if sql_bytes else ""
    al8i4 = [r.ub() for _ in range(13)]
    if num_defines:
        for _ in range(num_defines):
            _read_bind_meta(r)
        return
    if num_params:
        req.bind_metas = [_read_bind_meta(r) for _ in range(num_params)]
        sql = req.sql
        if sql is None:
            cursor = cursors.get(req.cursor_id)
            sql = cursor.sql if cursor else ""
        is_query, is_plsql = _sql_kind(sql)
        expected = 1 if is_query else max(al8i4[1], 1)
        _read_rows(r, req, expected, is_plsql, last_packet_full)


def _parse_reexecute(
    r: _Reader, req: _Request, cursors: Mapping[int, _Cursor], last_packet_full: bool
) -> None:
    req.cursor_id = r.ub()
    req.num_iters = r.ub()
    req.options = r.ub()
    r.ub()  # options 2
    cursor = cursors.get(req.cursor_id)
    if cursor is not None and cursor.bind_metas:
        req.bind_metas = cursor.bind_metas
        expected = 1 if req.function == _FUNC_REEXECUTE_AND_FETCH else max(req.num_iters, 1)
        _read_rows(r, req, expected, cursor.is_plsql, last_packet_full)
