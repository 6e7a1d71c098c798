"""TTC message bodies: answers (describe, rows, errors, negotiation), requests (binds, etc.)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from .codec import (
    _BIND_ARRAY,
    _CHARSET_AL16UTF16,
    _CHARSET_AL32UTF8,
    _CS_FORM_NCHAR,
    _MAX_STRING_SIZE,
    _ORA_BINARY_DOUBLE,
    _ORA_BINARY_FLOAT,
    _ORA_BINARY_INTEGER,
    _ORA_BOOLEAN,
    _ORA_CHAR,
    _ORA_CURSOR,
    _ORA_DATE,
    _ORA_LONG,
    _ORA_NUMBER,
    _ORA_TIMESTAMP,
    _ORA_TIMESTAMP_LTZ,
    _ORA_TIMESTAMP_TZ,
    _ORA_VARCHAR,
    _PIGGY_CLOSE_CURSORS,
    _PIGGY_END_TO_END,
    _PIGGY_END_USER_CONTEXT,
    _PIGGY_KEY_VALUE,
    _PIGGY_PIPELINE_BEGIN,
    _PIGGY_SESSION_STATE,
    _PIGGY_SET_SCHEMA,
    _SDU,
    _TNS_VERSION,
    _TTC_FIELD_VERSION,
    Column,
    ColumnType,
    Value,
    _blen,
    _decode_binary_double,
    _decode_binary_float,
    _decode_date,
    _ProtocolError,
    _Reader,
    _two,
    _ub,
    decode_oracle_number,
    encode_oracle_number,
)

# ---------------------------------------------------------------------------
# Response builders
# ---------------------------------------------------------------------------


def _encode_value(value: Value, col_type: ColumnType) -> bytes:
    if value is None:
        return b"\x00"
    if col_type == "number":
        if not isinstance(value, (int, float, Decimal)):
            value = Decimal(str(value))
        return _blen(encode_oracle_number(value))
    if isinstance(value, bytes):
        return _blen(value)
    if isinstance(value, bool):
        value = "1" if value else "0"
    return _blen(str(value).encode())


def _describe(columns: Sequence[Column]) -> bytes:
    out = [b"\x10", b"\x00", _ub(4000), _ub(len(columns))]
    if columns:
        out.append(b"\x00")
    for pos, col in enumerate(columns, 1):
        if col.type == "number":
            head = bytes([_ORA_NUMBER, 0, 0, 0x81]) + _ub(22)
            charset, csfrm, max_size = 0, 0, 22
        else:
            head = bytes([_ORA_VARCHAR, 0, 0, 0]) + _ub(4000)
            charset, csfrm, max_size = _CHARSET_AL32UTF8, 1, 4000
        out.append(head)
        out.append(_ub(0) + _ub(0) + _ub(0) + _ub(0))  # max elems, cont flags, oid, version
        out.append(_ub(charset) + bytes([csfrm]) + _ub(max_size))
        out.append(_ub(0))  # oaccolid (field version >= 12.2)
        out.append(b"\x01\x00")  # nulls allowed, v7 name length
        out.append(_two(col.name) + _two(None) + _two(None))
        out.append(_ub(pos) + _ub(0))  # position, uds flags
    out.append(b"\x00" * 6)  # current date, dcbflag, dcbmdbz, dcbmnpr, dcbmxpr, dcbqcky
    return b"".join(out)


def _rows(rows: Sequence[tuple[Value, ...]], columns: Sequence[Column]) -> bytes:
    if not rows:
        return b""
    out = [b"\x06\x00" + b"\x00" * 6]  # row header: flags, 5 zero counts, rxhrid
    for row in rows:
        out.append(b"\x07")
        out.extend(_encode_value(v, c.type) for v, c in zip(row, columns, strict=True))
    return b"".join(out)


def _error(code: int = 0, message: str = "", cursor_id: int = 0, rowcount: int = 0) -> bytes:
    """A TTC error/status block (message type 4) for field version < 20.1."""
    out = [b"\x04", _ub(0), _ub(0), _ub(0), _ub(0), _ub(0), _ub(0)]
    out.append(_ub(cursor_id) + _ub(0))  # cursor id, error position
    out.append(b"\x00" * 6)  # sql type, fatal, flags, user cursor options, UPI, flags
    out.append(_ub(0) + _ub(0) + b"\x00" + _ub(0) + _ub(0))  # rowid
    out.append(_ub(0) + b"\x00" + b"\x00" + _ub(0) + _ub(0))  # os error, stmt#, call#, pad, iters
    out.append(_ub(0))  # oerrdd
    out.append(_ub(0) + _ub(0) + _ub(0))  # batch codes, offsets, messages
    out.append(_ub(code) + _ub(rowcount))
    if code:
        out.append(_blen(message.encode()))
    return b"".join(out)


_STATUS_OK = b"\x09\x00\x00"


def _kv(key: str, value: str, flags: int = 0) -> bytes:
    return _two(key) + _two(value) + _ub(flags)


def _params(pairs: Sequence[tuple[str, str, int]]) -> bytes:
    return b"\x08" + _ub(len(pairs)) + b"".join(_kv(k, v, f) for k, v, f in pairs)


def _accept_body() -> bytes:
    body = bytearray(37)
    struct.pack_into(">HH", body, 0, _TNS_VERSION, 0)
    struct.pack_into(">I", body, 24, _SDU)
    struct.pack_into(">I", body, 33, 0)  # flags2: no fast auth, no end of response
    return bytes(body)


def _protocol_reply() -> bytes:
    fdo = bytes(9) + struct.pack(">H", _CHARSET_AL16UTF16)
    compile_caps = bytearray(55)
    compile_caps[0] = 6
    compile_caps[7] = _TTC_FIELD_VERSION
    compile_caps[45] = 0x02  # TNS_CCAP_END_USER_SEC_CTX_PIGGYBACK
    runtime_caps = bytearray(11)
    runtime_caps[0] = 2
    return (
        b"\x01\x06\x00"
        + b"deepsec Oracle test server\x00"
        + struct.pack("<H", _CHARSET_AL32UTF8)
        + b"\x01"
        + struct.pack("<H", 0)
        + struct.pack(">H", len(fdo))
        + fdo
        + _blen(bytes(compile_caps))
        + _blen(bytes(runtime_caps))
    )


def _version_number(major: int, minor: int, update: int, release: int, patch: int) -> int:
    return (major << 24) | (minor << 16) | (update << 12) | (release << 4) | patch


# ---------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _BindMeta:
    ora_type: int
    flags: int
    buffer_size: int
    csfrm: int

    @property
    def is_array(self) -> bool:
        return bool(self.flags & _BIND_ARRAY)


def _read_bind_meta(r: _Reader) -> _BindMeta:
    ora_type = r.u8()
    flags = r.u8()
    r.u8()  # precision
    r.u8()  # scale
    buffer_size = r.ub()
    r.ub()  # max number of array elements
    r.ub()  # cont flags
    if r.ub():  # object type: OID with two lengths, then a ub4 version
        r.blen()
        r.ub()
    else:
        r.ub()  # version
    r.ub()  # charset id
    csfrm = r.u8()
    r.ub()  # max chars / LOB prefetch length
    r.ub()  # oaccolid (field version >= 12.2)
    return _BindMeta(ora_type, flags, buffer_size, csfrm)


def _read_scalar(r: _Reader, meta: _BindMeta) -> Value:
    kind = meta.ora_type
    if kind == _ORA_BOOLEAN and r.peek() == 0xFD:
        r.raw(2)
        return None
    if kind == _ORA_CURSOR:
        r.ub()
        r.ub()
        return None
    data = r.blen()
    if data is None:
        return None
    if kind in (_ORA_VARCHAR, _ORA_CHAR, _ORA_LONG):
        return data.decode("utf-16-be" if meta.csfrm == _CS_FORM_NCHAR else "utf-8", "replace")
    if kind in (_ORA_NUMBER, _ORA_BINARY_INTEGER):
        return decode_oracle_number(data)
    if kind == _ORA_BINARY_DOUBLE:
        return _decode_binary_double(data)
    if kind == _ORA_BINARY_FLOAT:
        return _decode_binary_float(data)
    if kind in (_ORA_DATE, _ORA_TIMESTAMP, _ORA_TIMESTAMP_TZ, _ORA_TIMESTAMP_LTZ):
        return _decode_date(data)
    if kind == _ORA_BOOLEAN:
        return bool(data[-1])
    return bytes(data)  # RAW and anything else: the raw bytes


def _read_bind_row(r: _Reader, metas: Sequence[_BindMeta], is_plsql: bool) -> tuple[Value, ...]:
    values: list[Value] = [None] * len(metas)

    def read(i: int) -> None:
        meta = metas[i]
        if meta.is_array:
            values[i] = [_read_scalar(r, meta) for _ in range(r.ub())]
        else:
            values[i] = _read_scalar(r, meta)

    longs = [
        i
        for i, m in enumerate(metas)
        if not is_plsql and not m.is_array and m.buffer_size > _MAX_STRING_SIZE
    ]
    for i in range(len(metas)):
        if i not in longs:
            read(i)
    for i in longs:
        read(i)
    return tuple(values)


@dataclass
class _Piggybacks:
    codes: list[int] = field(default_factory=list)
    context_oson: bytes | None = None
    closed_cursors: list[int] = field(default_factory=list)
    schema: str | None = None
    end_to_end: dict[str, str | None] = field(default_factory=dict)


_END_TO_END_FIELDS = ("client_identifier", "module", "action", "client_info", "dbop")


def _read_piggyback(r: _Reader, out: _Piggybacks) -> None:
    code = r.u8()
    r.u8()  # sequence number
    out.codes.append(code)
    if code == _PIGGY_END_USER_CONTEXT:
        r.ub()  # flags (attach)
        r.u8()  # pointer
        for _ in range(r.ub()):
            r.ub()  # flags
            key = r.two()
            r.two()  # text value
            value = r.two()
            if key == b"ORCL_XS_AUTHZ_CONTEXT":
                out.context_oson = value or b""
    elif code == _PIGGY_CLOSE_CURSORS:
        r.u8()  # pointer
        out.closed_cursors.extend(r.ub() for _ in range(r.ub()))
    elif code == _PIGGY_SET_SCHEMA:
        r.u8()
        schema = r.two()
        out.schema = schema.decode() if schema else None
    elif code == _PIGGY_END_TO_END:
        r.u8()  # cidnam
        r.u8()  # cidser
        r.ub()  # flags
        header: dict[str, tuple[int, int]] = {}
        for name in ("client_identifier", "module", "action"):
            header[name] = (r.u8(), r.ub())
        r.u8()  # cideci
        r.ub()
        r.u8()  # cidcct
        r.ub()  # cidecs
        header["client_info"] = (r.u8(), r.ub())
        for _ in range(2):  # cidkstk, cidktgt
            r.u8()
            r.ub()
        header["dbop"] = (r.u8(), r.ub())
        for name in _END_TO_END_FIELDS:
            pointer, length = header[name]
            if pointer:
                raw = r.blen() if length else None
                out.end_to_end[name] = raw.decode() if raw else None
    elif code == _PIGGY_KEY_VALUE:
        r.u8()  # pointer (namespace)
        r.ub()  # namespace length
        r.u8()  # pointer (pairs)
        count = r.ub()
        r.ub()  # flags
        r.u8()
        r.blen()  # namespace
        for _ in range(count):
            r.two()
            r.two()
            r.ub()
    elif code == _PIGGY_SESSION_STATE:
        r.ub()
    elif code == _PIGGY_PIPELINE_BEGIN:
        r.ub()
        r.u8()
        r.u8()
    else:
        raise _ProtocolError(f"unsupported piggyback 0x{code:02x}")


@dataclass
class _Request:
    function: int
    piggy: _Piggybacks
    auth_user: str | None = None
    auth_pairs: dict[str, str] = field(default_factory=dict)
    options: int = 0
    cursor_id: int = 0
    num_iters: int = 0
    sql: str | None = None
    bind_metas: list[_BindMeta] | None = None
    bind_rows: list[tuple[Value, ...]] = field(default_factory=list)
    parse_error: str | None = None
