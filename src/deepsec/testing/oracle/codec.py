"""TTC building blocks: protocol constants, ORA errors, length-prefixed values, NUMBER and DATE.

Shared by the request readers and answer builders (:mod:`.messages`), the OSON
decoder, the SQL engine and the connection handler.
"""

from __future__ import annotations

import datetime as _dt
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal

Value = Any  # a Python value of a bind or column: None, int, Decimal, float, str, ...

# ---------------------------------------------------------------------------
# Protocol constants (names follow python-oracledb's constants.pxi)
# ---------------------------------------------------------------------------

_PACKET_CONNECT = 1
_PACKET_ACCEPT = 2
_PACKET_REFUSE = 4
_PACKET_DATA = 6
_PACKET_MARKER = 12
_DATA_FLAGS_EOF = 0x0040

_MSG_PROTOCOL = 1
_MSG_DATA_TYPES = 2
_MSG_FUNCTION = 3
_MSG_ERROR = 4
_MSG_ROW_HEADER = 6
_MSG_ROW_DATA = 7
_MSG_PARAMETER = 8
_MSG_STATUS = 9
_MSG_DESCRIBE_INFO = 16
_MSG_PIGGYBACK = 17

_FUNC_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0x04: "reexecute",
        0x05: "fetch",
        0x09: "logoff",
        0x0E: "commit",
        0x0F: "rollback",
        0x4E: "reexecute_and_fetch",
        0x5E: "execute",
        0x60: "lob_op",
        0x67: "tpc_txn_switch",
        0x68: "tpc_txn_change_state",
        0x69: "close_cursors",
        0x73: "auth_phase_two",
        0x76: "auth_phase_one",
        0x87: "set_end_to_end_attr",
        0x93: "ping",
        0x98: "set_schema",
        0x9A: "set_key_value",
        0xA2: "session_get",
        0xA3: "session_release",
        0xB0: "session_state",
        0xC7: "pipeline_begin",
        0xC8: "pipeline_end",
        0xCD: "end_user_security_context",
    }
)

_FUNC_REEXECUTE = 0x04
_FUNC_FETCH = 0x05
_FUNC_LOGOFF = 0x09
_FUNC_COMMIT = 0x0E
_FUNC_ROLLBACK = 0x0F
_FUNC_REEXECUTE_AND_FETCH = 0x4E
_FUNC_EXECUTE = 0x5E
_FUNC_AUTH_PHASE_TWO = 0x73
_FUNC_AUTH_PHASE_ONE = 0x76
_FUNC_PING = 0x93
_FUNC_SESSION_RELEASE = 0xA3

_PIGGY_CLOSE_CURSORS = 0x69
_PIGGY_END_TO_END = 0x87
_PIGGY_SET_SCHEMA = 0x98
_PIGGY_KEY_VALUE = 0x9A  # application context and HA readiness
_PIGGY_SESSION_STATE = 0xB0
_PIGGY_PIPELINE_BEGIN = 0xC7
_PIGGY_END_USER_CONTEXT = 0xCD

_EXEC_OPTION_PARSE = 0x01
_EXEC_OPTION_DEFINE = 0x10
_EXEC_OPTION_EXECUTE = 0x20
_EXEC_OPTION_FETCH = 0x40
_EXEC_OPTION_DESCRIBE = 0x20000

_ORA_VARCHAR = 1
_ORA_NUMBER = 2
_ORA_BINARY_INTEGER = 3
_ORA_LONG = 8
_ORA_DATE = 12
_ORA_RAW = 23
_ORA_LONG_RAW = 24
_ORA_CHAR = 96
_ORA_BINARY_FLOAT = 100
_ORA_BINARY_DOUBLE = 101
_ORA_CURSOR = 102
_ORA_TIMESTAMP = 180
_ORA_TIMESTAMP_TZ = 181
_ORA_TIMESTAMP_LTZ = 231
_ORA_BOOLEAN = 252
_BIND_ARRAY = 0x40
_CS_FORM_NCHAR = 2
_CHARSET_AL32UTF8 = 873
_CHARSET_AL16UTF16 = 2000

#: TTC field version announced to the client (19.1 ext 1: no ub8 token in
#: function headers, no 20c error fields, no 23ai column metadata).
_TTC_FIELD_VERSION = 13
_SDU = 8192
_TNS_VERSION = 318
_MAX_STRING_SIZE = 4000  # runtime caps do not announce 32k strings

ORA_NO_DATA_FOUND = 1403
ORA_INVALID_LOGON = 1017
ORA_END_USER_TOKEN_INVALID = 52601
ORA_DATABASE_ACCESS_TOKEN_INVALID = 52602

_MESSAGES: Mapping[int, str] = MappingProxyType(
    {
        900: "invalid SQL statement",
        904: "invalid identifier",
        923: "FROM keyword not found where expected",
        942: "table or view does not exist",
        1001: "invalid cursor",
        1008: "not all variables bound",
        1017: "invalid credential or not authorized; logon denied",
        1403: "no data found",
        3115: "unsupported network datatype or representation",
        28113: "policy predicate has error",
        52601: "end user security context: the end user token is invalid or expired",
        52602: "end user security context: the database access token is invalid or expired",
    }
)


def _ora_message(code: int, detail: str | None = None) -> str:
    text = f"ORA-{code:05d}: {_MESSAGES.get(code, 'error')}"
    if detail:
        text += f"\n{detail}"
    return text


class OracleError(Exception):
    """An ORA error the server answers instead of a result."""

    def __init__(self, code: int, detail: str | None = None) -> None:
        super().__init__(_ora_message(code, detail))
        self.code = code
        self.message = _ora_message(code, detail)


class _ProtocolError(Exception):
    """The client sent something this server cannot parse; the connection is dropped."""


class _Underflow(_ProtocolError):
    """The message continues in the next packet."""


# ---------------------------------------------------------------------------
# Low level encoding (TTC "universal" integers, length-prefixed bytes)
# ---------------------------------------------------------------------------


def _ub(value: int) -> bytes:
    """Encode an unsigned integer in TTC universal format."""
    if value == 0:
        return b"\x00"
    size = (value.bit_length() + 7) // 8
    size = 1 if size == 1 else 2 if size == 2 else 4 if size <= 4 else 8
    return bytes([size]) + value.to_bytes(size, "big")


def _blen(data: bytes | None) -> bytes:
    """Bytes preceded by their length (chunked when longer than 252 bytes)."""
    if not data:
        return b"\x00"
    if len(data) <= 252:
        return bytes([len(data)]) + data
    out = [b"\xfe"]
    for i in range(0, len(data), 32767):
        chunk = data[i : i + 32767]
        out.append(_ub(len(chunk)) + chunk)
    out.append(b"\x00")
    return b"".join(out)


def _two(data: bytes | str | None) -> bytes:
    """A ub4 length followed by length-prefixed bytes (``write_bytes_with_two_lengths``)."""
    if data is None:
        return b"\x00"
    raw = data.encode() if isinstance(data, str) else data
    if not raw:
        return b"\x00"
    return _ub(len(raw)) + _blen(raw)


class _Reader:
    """Sequential reader over one TTC message; raises :class:`_Underflow` at the end."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise _Underflow("end of message")
        return self.data[self.pos]

    def u8(self) -> int:
        value = self.peek()
        self.pos += 1
        return value

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Underflow("end of message")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def ub(self) -> int:
        """A universal integer (ub2/ub4/ub8; a set sign bit is returned negated)."""
        first = self.u8()
        size = first & 0x7F
        if size > 8:
            raise _ProtocolError(f"bad integer length {size}")
        value = int.from_bytes(self.raw(size), "big") if size else 0
        return -value if first & 0x80 else value

    def blen(self) -> bytes | None:
        """Length-prefixed bytes; ``None`` for the null indicators 0 and 255."""
        n = self.u8()
        if n in (0, 0xFF):
            return None
        if n == 0xFE:
            chunks: list[bytes] = []
            while True:
                size = self.ub()
                if size <= 0:
                    return b"".join(chunks)
                chunks.append(self.raw(size))
        return self.raw(n)

    def two(self) -> bytes | None:
        """A ub4 length then length-prefixed bytes (``write_bytes_with_two_lengths``)."""
        return self.blen() if self.ub() else None


# ---------------------------------------------------------------------------
# Oracle NUMBER, dates, binary floats
# ---------------------------------------------------------------------------


def encode_oracle_number(value: int | float | Decimal) -> bytes:
    """Encode a Python number in Oracle NUMBER format (at most 40 digits)."""
    if isinstance(value, bool):
        value = int(value)
    dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not dec.is_finite():
        raise ValueError("NUMBER cannot hold NaN or infinity")
    if dec.is_zero():
        return b"\x80"
    sign, digit_tuple, exponent = dec.normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(str(d) for d in digit_tuple)
    point = len(digits) + exponent
    if point % 2:
        digits = "0" + digits
        point += 1
    if len(digits) % 2:
        digits += "0"
    pairs = [int(digits[i : i + 2]) for i in range(0, len(digits), 2)][:20]
    while pairs and pairs[-1] == 0:
        pairs.pop()
    exp_byte = 0xC0 + point // 2
    if not 0 < exp_byte < 0x100:
        raise ValueError("number out of range for Oracle NUMBER")
    if not sign:
        return bytes([exp_byte, *(p + 1 for p in pairs)])
    tail = [102] if len(pairs) < 20 else []
    return bytes([(~exp_byte) & 0xFF, *(101 - p for p in pairs), *tail])


def decode_oracle_number(data: bytes) -> int | Decimal:
    """Decode Oracle NUMBER bytes: an ``int`` when integral, else a ``Decimal``."""
    if not data:
        raise ValueError("empty NUMBER")
    first = data[0]
    positive = bool(first & 0x80)
    if len(data) == 1:
        return 0 if positive else Decimal("-1e126")
    if positive:
        exp100 = first - 0xC0
        pairs = [b - 1 for b in data[1:]]
    else:
        exp100 = ((~first) & 0xFF) - 0xC0
        mantissa = data[1:-1] if data[-1] == 102 else data[1:]
        pairs = [101 - b for b in mantissa]
    magnitude = Decimal(int("".join(f"{p:02d}" for p in pairs))).scaleb(2 * (exp100 - len(pairs)))
    result = magnitude if positive else -magnitude
    if result == result.to_integral_value():
        return int(result)
    return result.normalize()


def _decode_binary_double(data: bytes) -> float:
    raw = bytearray(data)
    if raw[0] & 0x80:
        raw[0] &= 0x7F
    else:
        raw = bytearray((~b) & 0xFF for b in raw)
    return float(struct.unpack(">d", bytes(raw))[0])


def _decode_binary_float(data: bytes) -> float:
    raw = bytearray(data)
    if raw[0] & 0x80:
        raw[0] &= 0x7F
    else:
        raw = bytearray((~b) & 0xFF for b in raw)
    return float(struct.unpack(">f", bytes(raw))[0])


def _decode_date(data: bytes) -> _dt.datetime:
    year = (data[0] - 100) * 100 + data[1] - 100
    micro = 0
    if len(data) >= 11:
        micro = int.from_bytes(data[7:11], "big") // 1000
    return _dt.datetime(year, data[2], data[3], data[4] - 1, data[5] - 1, data[6] - 1, micro)


ColumnType = Literal["number", "varchar"]


@dataclass(frozen=True)
class Column:
    """A result column: its (upper case) name and type (NUMBER or VARCHAR2)."""

    name: str
    type: ColumnType = "varchar"
