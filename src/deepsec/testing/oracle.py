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
statement (``... /* req-17 */``) and find it again.

Every round trip is recorded (:class:`RoundTrip`) with the end-user context
that travelled with it (:class:`WireContext`), so tests can prove under which
identity a statement ran and that attaching a context costs no extra round
trip.  Token values are never logged.

Run ``python -m deepsec.testing.oracle --port 1522 --ca-dir DIR`` to serve
from the command line; it prints the DSN and the CA file path.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import re
import secrets
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType, TracebackType
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from deepsec.testing.tls import TestCA

__all__ = [
    "DEFAULT_USERS",
    "Column",
    "ConnectionRecord",
    "OracleTestServer",
    "RoundTrip",
    "TokenValidator",
    "WireContext",
    "decode_jwt_claims",
    "decode_oracle_number",
    "decode_oson",
    "encode_oracle_number",
    "main",
]

logger = logging.getLogger("deepsec.testing.oracle")

#: Users accepted for password login when none are given (names are
#: case-insensitive, passwords case-sensitive).
DEFAULT_USERS: Mapping[str, str] = MappingProxyType({"APP_USER": "app_password", "SCOTT": "tiger"})

#: ``validator(kind, token) -> bool``; ``kind`` is ``"access_token"`` (login),
#: ``"end_user_token"`` or ``"database_access_token"`` (end-user context).
TokenValidator = Callable[[str, str], bool]

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


# ---------------------------------------------------------------------------
# OSON (Oracle binary JSON) decoder, enough for what python-oracledb emits
# ---------------------------------------------------------------------------

_OSON_FLAG_REL_OFFSET = 0x01
_OSON_FLAG_NUM_FNAMES_UINT32 = 0x08
_OSON_FLAG_IS_SCALAR = 0x10
_OSON_FLAG_NUM_FNAMES_UINT16 = 0x0400
_OSON_FLAG_FNAMES_SEG_UINT32 = 0x0800
_OSON_FLAG_TREE_SEG_UINT32 = 0x1000
_OSON_FLAG_SEC_FNAMES_SEG_UINT16 = 0x0100


class _OsonDecoder:
    """Port of python-oracledb's ``OsonDecoder`` (impl/base/oson.pyx)."""

    def __init__(self, data: bytes) -> None:
        self.r = _Reader(data)
        self.field_names: list[str] = []
        self.field_id_length = 1
        self.relative = False
        self.tree_pos = 0

    def _u16(self) -> int:
        return int.from_bytes(self.r.raw(2), "big")

    def _u32(self) -> int:
        return int.from_bytes(self.r.raw(4), "big")

    def decode(self) -> Value:
        r = self.r
        if r.raw(3) != b"\xffJZ":
            raise ValueError("not an OSON document")
        version = r.u8()
        if version not in (1, 3):
            raise ValueError(f"unsupported OSON version {version}")
        flags = self._u16()
        self.relative = bool(flags & _OSON_FLAG_REL_OFFSET)
        if flags & _OSON_FLAG_IS_SCALAR:
            r.raw(4 if flags & _OSON_FLAG_TREE_SEG_UINT32 else 2)
            return self._node()
        if flags & _OSON_FLAG_NUM_FNAMES_UINT32:
            num_short, self.field_id_length = self._u32(), 4
        elif flags & _OSON_FLAG_NUM_FNAMES_UINT16:
            num_short, self.field_id_length = self._u16(), 2
        else:
            num_short, self.field_id_length = r.u8(), 1
        if flags & _OSON_FLAG_FNAMES_SEG_UINT32:
            short_offsets_size, short_seg_size = 4, self._u32()
        else:
            short_offsets_size, short_seg_size = 2, self._u16()
        num_long = long_seg_size = 0
        long_offsets_size = 4
        if version == 3:
            secondary = self._u16()
            long_offsets_size = 2 if secondary & _OSON_FLAG_SEC_FNAMES_SEG_UINT16 else 4
            num_long = self._u32()
            long_seg_size = self._u32()
        if flags & _OSON_FLAG_TREE_SEG_UINT32:
            self._u32()
        else:
            self._u16()
        self._u16()  # number of tiny nodes
        if num_short:
            self.field_names += self._names(num_short, short_offsets_size, short_seg_size, 1)
        if num_long:
            self.field_names += self._names(num_long, long_offsets_size, long_seg_size, 2)
        self.tree_pos = r.pos
        return self._node()

    def _names(self, count: int, offsets_size: int, seg_size: int, hash_size: int) -> list[str]:
        r = self.r
        r.raw(count * hash_size)  # hash ids
        offsets = [int.from_bytes(r.raw(offsets_size), "big") for _ in range(count)]
        segment = r.raw(seg_size)
        names = []
        for off in offsets:
            if hash_size == 1:
                size = segment[off]
                names.append(segment[off + 1 : off + 1 + size].decode())
            else:
                size = int.from_bytes(segment[off : off + 2], "big")
                names.append(segment[off + 2 : off + 2 + size].decode())
        return names

    def _offset(self, node_type: int) -> int:
        return self._u32() if node_type & 0x20 else self._u16()

    def _num_children(self, node_type: int) -> tuple[int, bool]:
        bits = node_type & 0x18
        if bits == 0:
            return self.r.u8(), False
        if bits == 0x08:
            return self._u16(), False
        if bits == 0x10:
            return self._u32(), False
        return 0, True

    def _container(self, node_type: int) -> Value:
        r = self.r
        is_object = (node_type & 0x40) == 0
        container_offset = r.pos - self.tree_pos - 1
        num, shared = self._num_children(node_type)
        if shared:
            offset = self._offset(node_type)
            offsets_pos = r.pos
            r.pos = self.tree_pos + offset
            num, _ = self._num_children(r.u8())
            ids_pos = r.pos
        elif is_object:
            ids_pos = r.pos
            offsets_pos = r.pos + self.field_id_length * num
        else:
            ids_pos = 0
            offsets_pos = r.pos
        obj: dict[str, Value] = {}
        arr: list[Value] = []
        for _ in range(num):
            name = ""
            if is_object:
                r.pos = ids_pos
                field_id = int.from_bytes(r.raw(self.field_id_length), "big")
                name = self.field_names[field_id - 1]
                ids_pos = r.pos
            r.pos = offsets_pos
            offset = self._offset(node_type)
            if self.relative:
                offset += container_offset
            offsets_pos = r.pos
            r.pos = self.tree_pos + offset
            value = self._node()
            if is_object:
                obj[name] = value
            else:
                arr.append(value)
        return obj if is_object else arr

    def _node(self) -> Value:
        r = self.r
        node_type = r.u8()
        if node_type & 0x80:
            return self._container(node_type)
        if node_type == 0x30:
            return None
        if node_type == 0x31:
            return True
        if node_type == 0x32:
            return False
        if node_type in (0x3C, 0x7D):  # date, timestamp7
            return _decode_date(r.raw(7))
        if node_type == 0x39:
            return _decode_date(r.raw(11))
        if node_type == 0x7C:
            return _decode_date(r.raw(13))
        if node_type == 0x7F:
            return _decode_binary_float(r.raw(4))
        if node_type == 0x36:
            return _decode_binary_double(r.raw(8))
        if node_type == 0x3E:  # interval day to second
            raw = r.raw(11)
            days = int.from_bytes(raw[0:4], "big") - 0x80000000
            secs = (raw[4] - 60) * 3600 + (raw[5] - 60) * 60 + (raw[6] - 60)
            nanos = int.from_bytes(raw[7:11], "big") - 0x80000000
            return _dt.timedelta(days=days, seconds=secs, microseconds=nanos // 1000)
        if node_type == 0x33:
            return r.raw(r.u8()).decode()
        if node_type == 0x37:
            return r.raw(self._u16()).decode()
        if node_type == 0x38:
            return r.raw(self._u32()).decode()
        if node_type == 0x34:
            return decode_oracle_number(r.raw(r.u8()))
        if node_type == 0x7E:  # JSON id
            return r.raw(r.u8())
        if node_type == 0x3A:
            return r.raw(self._u16())
        if node_type == 0x3B:
            return r.raw(self._u32())
        if node_type & 0xF0 in (0x20, 0x60):
            return decode_oracle_number(r.raw((node_type & 0x0F) + 1))
        if node_type & 0xF0 in (0x40, 0x50):
            return decode_oracle_number(r.raw(node_type & 0x0F))
        if node_type & 0xE0 == 0:
            return r.raw(node_type).decode() if node_type else ""
        raise ValueError(f"unsupported OSON node type 0x{node_type:02x}")


def decode_oson(data: bytes) -> Value:
    """Decode an OSON document (as produced by python-oracledb's encoder).

    Objects become ``dict``, arrays ``list``, numbers ``int`` (integral) or
    ``Decimal``, strings ``str``; dates, timestamps, binary floats, raw bytes
    and day-to-second intervals are decoded too.  Vectors are not supported.

    Raises:
        ValueError: the data is not an OSON document this decoder understands.
    """
    try:
        return _OsonDecoder(bytes(data)).decode()
    except (_ProtocolError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed OSON document: {exc}") from exc


# ---------------------------------------------------------------------------
# Recorded objects
# ---------------------------------------------------------------------------


def decode_jwt_claims(token: str | None) -> dict[str, Value]:
    """The claims of a JWT's payload, decoded **without** any verification.

    Returns an empty dict for ``None`` or anything that is not a JWT with a
    JSON object payload.
    """
    if not token or token.count(".") < 2:
        return {}
    payload = token.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _identity_from_claims(claims: Mapping[str, Value]) -> str | None:
    for key in ("preferred_username", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class WireContext:
    """The end-user security context that travelled with one round trip.

    Decoded from the ``ORCL_XS_AUTHZ_CONTEXT`` OSON document of the 0xcd
    piggyback.  Token values are kept (tests may compare them) but left out of
    ``repr``.

    Attributes:
        end_user_token: the end user's token (``end_user_token``), if any.
        end_user_name: the local end-user name (``end_user_name``), if any.
        end_user_contextid: the key of a local end-user identity.
        database_access_token: the application's database access token.
        data_roles: the ``data_roles`` list (``None`` when absent).
        attributes: ``attributes`` as a read-only ``{name: values}`` mapping.
        version: the document's ``ver``.
        document: the whole decoded document (read-only).
    """

    end_user_token: str | None = field(default=None, repr=False)
    end_user_name: str | None = None
    end_user_contextid: str | None = None
    database_access_token: str | None = field(default=None, repr=False)
    data_roles: tuple[str, ...] | None = None
    attributes: Mapping[str, Value] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    version: str | None = None
    document: Mapping[str, Value] = field(
        default_factory=lambda: MappingProxyType({}), hash=False, repr=False, compare=False
    )

    @classmethod
    def from_document(cls, doc: Mapping[str, Value]) -> WireContext:
        """Build a context from the decoded OSON document."""

        def text(key: str) -> str | None:
            value = doc.get(key)
            return value if isinstance(value, str) else None

        roles = doc.get("data_roles")
        attrs: dict[str, Value] = {}
        raw_attrs = doc.get("attributes")
        if isinstance(raw_attrs, list):
            for item in raw_attrs:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    attrs[item["name"]] = item.get("values")
        return cls(
            end_user_token=text("end_user_token"),
            end_user_name=text("end_user_name"),
            end_user_contextid=text("end_user_contextid"),
            database_access_token=text("database_access_token"),
            data_roles=tuple(str(r) for r in roles) if isinstance(roles, list) else None,
            attributes=MappingProxyType(attrs),
            version=text("ver"),
            document=MappingProxyType(dict(doc)),
        )

    @property
    def end_user_claims(self) -> dict[str, Value]:
        """Unverified claims of :attr:`end_user_token` (``{}`` if none)."""
        return decode_jwt_claims(self.end_user_token)

    @property
    def database_access_claims(self) -> dict[str, Value]:
        """Unverified claims of :attr:`database_access_token` (``{}`` if none)."""
        return decode_jwt_claims(self.database_access_token)

    @property
    def username(self) -> str | None:
        """The end user's name as ``xs_sys_context('xs$session','username')`` answers it.

        The end-user token's ``preferred_username`` claim, else its ``sub``;
        else :attr:`end_user_name`; else (on-behalf-of style context with only
        a database access token) that token's ``preferred_username``/``sub``.
        """
        if self.end_user_token is not None:
            return _identity_from_claims(self.end_user_claims)
        if self.end_user_name is not None:
            return self.end_user_name
        if self.database_access_token is not None:
            return _identity_from_claims(self.database_access_claims)
        return None

    @property
    def kind(self) -> Literal["token", "local", "database_access_token", "empty"]:
        """Which identity form the context carries."""
        if self.end_user_token is not None:
            return "token"
        if self.end_user_name is not None:
            return "local"
        if self.database_access_token is not None:
            return "database_access_token"
        return "empty"


@dataclass(frozen=True)
class RoundTrip:
    """One client request and the server's answer.

    Attributes:
        index: global position in the server's record (monotonic, never reused).
        conn_id: the connection (equals the driver's ``connection.session_id``).
        seq: 1-based position among this connection's recorded round trips.
        function: function name (``"execute"``, ``"reexecute_and_fetch"``,
            ``"fetch"``, ``"ping"``, ``"commit"``, ``"auth_phase_two"``, ...).
        function_code: the TTC function code.
        sql: full SQL text (comments kept) for execute/re-execute/fetch.
        binds: bind values of the first (usually only) execution, in wire order.
        bind_rows: bind values of every execution (``executemany``).
        context: the end-user context that came with this round trip, or None.
        piggybacks: TTC codes of every piggyback that preceded the function.
        cursor_id: the server cursor the round trip used (0 if none).
        error: the ORA error number answered (None on success; ORA-01403 that
            ends a fetch is not counted as an error).
        rows: number of rows returned by this round trip.
    """

    index: int
    conn_id: int
    seq: int
    function: str
    function_code: int
    sql: str | None
    binds: tuple[Value, ...]
    bind_rows: tuple[tuple[Value, ...], ...]
    context: WireContext | None
    piggybacks: tuple[int, ...]
    cursor_id: int
    error: int | None
    rows: int

    @property
    def is_statement(self) -> bool:
        """True for round trips that execute SQL (execute and re-executes)."""
        return self.function_code in (_FUNC_EXECUTE, _FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH)


@dataclass(frozen=True)
class ConnectionRecord:
    """A snapshot of one client connection.

    Attributes:
        conn_id: server-side id (also the session id reported to the driver).
        peer: client address.
        user: the login (schema) user, upper case; None before login.
        method: ``"password"`` or ``"token"``; None before login.
        access_token: the token of a token login (left out of ``repr``).
        logged_in: whether authentication succeeded.
        closed: whether the connection has ended.
        pop_header: for a proof-of-possession token login (``access_token``
            given as ``(token, private_key)``, as OCI database tokens are),
            the signed ``AUTH_HEADER`` text (``date``, ``(request-target)``,
            ``host`` lines); None otherwise.
        pop_signature: the base64 RSA-SHA256 signature of :attr:`pop_header`
            the driver made with the private key (``AUTH_SIGNATURE``).
    """

    conn_id: int
    peer: tuple[str, int]
    user: str | None
    method: Literal["password", "token"] | None
    access_token: str | None = field(repr=False)
    logged_in: bool
    closed: bool
    pop_header: str | None = None
    pop_signature: str | None = field(default=None, repr=False)

    @property
    def access_token_claims(self) -> dict[str, Value]:
        """Unverified claims of the login access token."""
        return decode_jwt_claims(self.access_token)

    def verify_proof_of_possession(self, public_key: str | bytes) -> bool:
        """Whether :attr:`pop_signature` is a valid signature of :attr:`pop_header`.

        Args:
            public_key: the PEM public key the token is bound to (for an OCI
                database token, the one sent to ``generateScopedAccessToken``).
        """
        if self.pop_header is None or self.pop_signature is None:
            return False
        pem = public_key.encode() if isinstance(public_key, str) else public_key
        try:
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(
                base64.b64decode(self.pop_signature),
                self.pop_header.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True


# ---------------------------------------------------------------------------
# Tables, result sets and the tiny SQL engine
# ---------------------------------------------------------------------------

ColumnType = Literal["number", "varchar"]


@dataclass(frozen=True)
class Column:
    """A result column: its (upper case) name and type (NUMBER or VARCHAR2)."""

    name: str
    type: ColumnType = "varchar"


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Value, ...], ...]


@dataclass
class _Result:
    """What one statement produced."""

    columns: tuple[Column, ...] | None = None  # None: not a query
    rows: list[tuple[Value, ...]] = field(default_factory=list)
    rowcount: int = 0


@dataclass
class _Session:
    """The per-connection state the SQL engine may read."""

    schema_user: str
    context: WireContext | None


_NUMBER_LITERAL_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_DDL_WORDS = frozenset(
    {
        "alter", "analyze", "associate", "audit", "comment", "commit", "create",
        "disassociate", "drop", "flashback", "grant", "lock", "noaudit", "purge",
        "rename", "revoke", "rollback", "savepoint", "set", "truncate",
    }
)  # fmt: skip
_PLSQL_WORDS = frozenset({"begin", "declare", "call"})
_CONTEXT_CALL_RE = re.compile(r"(xs_sys_context|sys_context)\('([^']*)','([^']*)'(?:,\d+)?\)")


def strip_sql_comments(sql: str) -> str:
    """``sql`` without ``/* */`` and ``--`` comments (string literals are respected)."""
    out: list[str] = []
    pos = 0
    for match in re.finditer(r"'(?:[^']|'')*'|/\*.*?\*/|--[^\n]*", sql, re.S):
        out.append(sql[pos : match.start()])
        token = match.group(0)
        out.append(token if token.startswith("'") else " ")
        pos = match.end()
    out.append(sql[pos:])
    return "".join(out)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        elif not quote and depth == 0 and ch == sep:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _find_keyword(text: str, keyword: str) -> int:
    """Index of ``keyword`` (a whole word) at parenthesis depth 0 outside quotes, or -1."""
    depth, quote = 0, False
    lower = text.lower()
    n = len(keyword)
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif (
            depth == 0
            and lower.startswith(keyword, i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_$#"))
            and (i + n == len(text) or not (text[i + n].isalnum() or text[i + n] in "_$#"))
        ):
            return i
    return -1


def _placeholders(sql_no_comments: str) -> list[str]:
    """Bind placeholder names in order of occurrence (outside string literals)."""
    names = []
    for match in re.finditer(r"'(?:[^']|'')*'|:(\"[^\"]+\"|\w+)", sql_no_comments):
        if match.group(1):
            names.append(match.group(1).strip('"').upper())
    return names


def _literal(text: str) -> tuple[bool, Value]:
    text = text.strip()
    if _NUMBER_LITERAL_RE.match(text):
        num = Decimal(text)
        integral = "e" not in text.lower() and "." not in text
        return True, int(num) if integral else num
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        return True, text[1:-1].replace("''", "'") or None
    if text.lower() == "null":
        return True, None
    return False, None


def _unquote_ident(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text.upper()


def _type_of(value: Value) -> ColumnType:
    numeric = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)
    return "number" if numeric else "varchar"


class _SqlEngine:
    """Answers the few statement shapes the project's tests and demos need."""

    def __init__(self, tables: Mapping[str, _Table]) -> None:
        self.tables = tables

    def run(self, sql: str, binds: Sequence[Value], session: _Session) -> _Result:
        text = strip_sql_comments(sql).strip().rstrip(";").strip()
        names = _placeholders(text)
        if len(binds) < len(names):
            raise OracleError(1008)
        bind_map: dict[str, Value] = {}
        for name, value in zip(names, binds[: len(names)], strict=True):
            bind_map.setdefault(name, value)
        first = text.split(None, 1)[0].lower() if text else ""
        first = first.lstrip("(")
        if first in ("select", "with"):
            return self._select(text, bind_map, session)
        if first == "insert":
            return _Result(rowcount=1)
        if first in ("update", "delete", "merge"):
            return _Result(rowcount=0)
        if first in _DDL_WORDS or first in _PLSQL_WORDS:
            return _Result()
        raise OracleError(900)

    # -- select ----------------------------------------------------------------

    def _select(self, text: str, binds: Mapping[str, Value], session: _Session) -> _Result:
        if text.lower().startswith("with"):
            raise OracleError(942)
        body = text[len("select") :].strip()
        from_at = _find_keyword(body, "from")
        if from_at < 0:
            raise OracleError(923)
        select_list = body[:from_at].strip()
        rest = body[from_at + 4 :].strip()
        end = len(rest)
        for kw in ("where", "order", "group", "fetch", "offset", "for"):
            at = _find_keyword(rest, kw)
            if 0 <= at < end:
                end = at
        source = rest[:end].strip()
        tail = rest[end:].strip()
        source_name = source.split()[0] if source.split() else ""
        table_name = _unquote_ident(source_name.split(".")[-1]) if source_name else ""
        if table_name == "DUAL":
            result = self._select_dual(select_list, binds, session)
            if not self._dual_where_matches(tail, binds):
                result.rows = []
            return result
        table = self.tables.get(table_name)
        if table is None:
            raise OracleError(942)
        return self._select_table(table, select_list, tail, binds)

    def _expr_value(
        self, expr: str, binds: Mapping[str, Value], session: _Session
    ) -> tuple[bool, Value]:
        ok, value = _literal(expr)
        if ok:
            return True, value
        compact = re.sub(r"\s+", "", expr).lower()
        if compact.startswith(":"):
            name = compact[1:].strip('"').upper()
            return (name in binds), binds.get(name)
        if compact == "user":
            return True, session.schema_user
        call = _CONTEXT_CALL_RE.fullmatch(compact)
        if call:
            func, namespace, attribute = call.groups()
            ctx = session.context
            if func == "xs_sys_context" and namespace == "xs$session":
                if attribute in ("username", "session_xs_user", "current_xs_user"):
                    return True, ctx.username if ctx is not None else None
                return True, None
            if func == "sys_context" and namespace == "userenv":
                if attribute in ("current_user", "session_user"):
                    return True, "XS$NULL" if ctx is not None else session.schema_user
                if attribute == "current_schema":
                    return True, session.schema_user
                return True, None
            return True, None
        return False, None

    @staticmethod
    def _split_alias(item: str) -> tuple[str, str | None]:
        match = re.match(r"^(.*?)(?:\s+as)?\s+(\"[^\"]+\"|[A-Za-z_][\w$#]*)$", item, re.S | re.I)
        if match and match.group(1).strip() and not match.group(1).strip().endswith(("(", ",")):
            expr = match.group(1).strip()
            if expr.count("(") == expr.count(")") and expr.count("'") % 2 == 0:
                return expr, _unquote_ident(match.group(2))
        return item.strip(), None

    def _select_dual(
        self, select_list: str, binds: Mapping[str, Value], session: _Session
    ) -> _Result:
        columns: list[Column] = []
        row: list[Value] = []
        for item in _split_top_level(select_list):
            expr, alias = self._split_alias(item)
            ok, value = self._expr_value(expr, binds, session)
            if not ok:
                ok, value = self._expr_value(item, binds, session)
                alias = None
                expr = item
            if not ok:
                raise OracleError(904, f'"{expr.upper()}": invalid identifier')
            name = alias or re.sub(r"\s+", "", expr).upper()
            col_type = _type_of(value)
            if re.fullmatch(r"[+-]?[\d.]+(?:[eE][+-]?\d+)?", expr.strip()):
                col_type = "number"
            columns.append(Column(name, col_type))
            row.append(value)
        return _Result(columns=tuple(columns), rows=[tuple(row)])

    def _dual_where_matches(self, tail: str, binds: Mapping[str, Value]) -> bool:
        """Evaluate ``where dummy = ...`` on DUAL; other conditions are treated as true."""
        where_at = _find_keyword(tail, "where")
        if where_at < 0:
            return True
        cond = tail[where_at + 5 :]
        for kw in ("order", "group", "fetch", "offset", "for"):
            at = _find_keyword(cond, kw)
            if at >= 0:
                cond = cond[:at]
        dual = _Table("DUAL", (Column("DUMMY"),), (("X",),))
        try:
            return bool(self._filter(dual, {"DUMMY": 0}, list(dual.rows), cond.strip(), binds))
        except OracleError:
            return True

    def _select_table(
        self, table: _Table, select_list: str, tail: str, binds: Mapping[str, Value]
    ) -> _Result:
        index = {c.name: i for i, c in enumerate(table.columns)}
        rows = list(table.rows)
        where_at = _find_keyword(tail, "where")
        if where_at >= 0:
            cond = tail[where_at + 5 :]
            for kw in ("order", "group", "fetch", "offset", "for"):
                at = _find_keyword(cond, kw)
                if at >= 0:
                    cond = cond[:at]
            rows = self._filter(table, index, rows, cond.strip(), binds)
        items = _split_top_level(select_list)
        count_expr, alias = self._split_alias(items[0]) if len(items) == 1 else ("", None)
        if re.fullmatch(r"count\(\s*\*\s*\)", count_expr, re.I):
            return _Result(columns=(Column(alias or "COUNT(*)", "number"),), rows=[(len(rows),)])
        picks: list[int] = []
        columns: list[Column] = []
        for item in items:
            if item == "*" or item.endswith(".*"):
                picks.extend(range(len(table.columns)))
                columns.extend(table.columns)
                continue
            expr, alias = self._split_alias(item)
            name = _unquote_ident(expr.split(".")[-1])
            if name not in index:
                raise OracleError(904, f'"{expr.upper()}": invalid identifier')
            picks.append(index[name])
            columns.append(Column(alias or name, table.columns[index[name]].type))
        return _Result(columns=tuple(columns), rows=[tuple(r[i] for i in picks) for r in rows])

    def _filter(
        self,
        table: _Table,
        index: Mapping[str, int],
        rows: list[tuple[Value, ...]],
        cond: str,
        binds: Mapping[str, Value],
    ) -> list[tuple[Value, ...]]:
        terms = re.split(r"\s+and\s+", cond, flags=re.I)
        for term in terms:
            match = re.fullmatch(r"\s*([\w$#.\"]+)\s*=\s*(.+?)\s*", term, re.S)
            if not match:
                raise OracleError(900, "only 'column = value [and ...]' conditions are supported")
            name = _unquote_ident(match.group(1).split(".")[-1])
            if name not in index:
                raise OracleError(904, f'"{match.group(1).upper()}": invalid identifier')
            rhs = match.group(2)
            if rhs.startswith(":"):
                key = rhs[1:].strip('"').upper()
                if key not in binds:
                    raise OracleError(1008)
                wanted = binds[key]
            else:
                ok, wanted = _literal(rhs)
                if not ok:
                    raise OracleError(904, f'"{rhs.upper()}": invalid identifier')
            pos = index[name]
            rows = [r for r in rows if _values_equal(r[pos], wanted)]
        return rows


def _values_equal(left: Value, right: Value) -> bool:
    if left is None or right is None:
        return False
    numeric = (int, float, Decimal)
    if isinstance(left, numeric) or isinstance(right, numeric):
        try:
            return Decimal(str(left)) == Decimal(str(right))
        except ArithmeticError:
            return False
    return str(left) == str(right)


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
# O5LOGON (12c verifier), server side
# ---------------------------------------------------------------------------


def _aes_cbc(key: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(bytes(16)))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def _pbkdf2(key: bytes, salt: bytes, length: int, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA512(), salt=salt, length=length, iterations=iterations)
    return kdf.derive(key)


class _O5Logon:
    """Server half of O5LOGON with the 12c (PBKDF2-SHA512) verifier."""

    VGEN_COUNT = 4096
    SDER_COUNT = 3

    def __init__(self, password: str | None) -> None:
        # unknown users get a random verifier, so they fail only in phase two
        self.password = password
        secret = (password if password is not None else secrets.token_hex(16)).encode()
        self.salt = secrets.token_bytes(16)
        self.csk_salt = secrets.token_bytes(16)
        self.server_part = secrets.token_bytes(32)
        speedy = _pbkdf2(secret, self.salt + b"AUTH_PBKDF2_SPEEDY_KEY", 64, self.VGEN_COUNT)
        self.pw_hash = hashlib.sha512(speedy + self.salt).digest()[:32]
        self.combo_key = b""

    def phase_one(self) -> bytes:
        sesskey = _aes_cbc(self.pw_hash, self.server_part, True).hex().upper()
        return (
            _params(
                [
                    ("AUTH_SESSKEY", sesskey, 0),
                    ("AUTH_VFR_DATA", self.salt.hex().upper(), 0x4815),
                    ("AUTH_PBKDF2_CSK_SALT", self.csk_salt.hex().upper(), 0),
                    ("AUTH_PBKDF2_VGEN_COUNT", str(self.VGEN_COUNT), 0),
                    ("AUTH_PBKDF2_SDER_COUNT", str(self.SDER_COUNT), 0),
                ]
            )
            + _STATUS_OK
        )

    def check(self, pairs: Mapping[str, str]) -> bool:
        """Verify phase two's AUTH_SESSKEY/AUTH_PASSWORD; sets :attr:`combo_key`."""
        try:
            client_part = _aes_cbc(self.pw_hash, bytes.fromhex(pairs["AUTH_SESSKEY"])[:32], False)
            self.combo_key = _pbkdf2(
                (client_part[:32] + self.server_part).hex().upper().encode(),
                self.csk_salt,
                32,
                self.SDER_COUNT,
            )
            plain = _aes_cbc(self.combo_key, bytes.fromhex(pairs["AUTH_PASSWORD"]), False)
        except (KeyError, ValueError):
            return False
        pad = plain[-1] if plain else 0
        if not 0 < pad <= 16:
            return False
        candidate = plain[16:-pad]
        return self.password is not None and secrets.compare_digest(
            candidate, self.password.encode()
        )

    def server_response(self) -> str:
        block = secrets.token_bytes(16) + b"SERVER_TO_CLIENT"
        padded = block + bytes([16]) * 16
        return _aes_cbc(self.combo_key, padded, True).hex().upper()


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


# ---------------------------------------------------------------------------
# Per-connection state and handler
# ---------------------------------------------------------------------------


@dataclass
class _Cursor:
    cursor_id: int
    sql: str
    is_query: bool
    is_plsql: bool
    bind_metas: list[_BindMeta] = field(default_factory=list)
    columns: tuple[Column, ...] = ()
    pending: list[tuple[Value, ...]] = field(default_factory=list)
    fetched: int = 0


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


def _sql_kind(sql: str) -> tuple[bool, bool]:
    """(is_query, is_plsql) of a statement, the way the driver classifies it."""
    text = strip_sql_comments(sql).strip().lstrip("(").lower()
    first = text.split(None, 1)[0] if text else ""
    return first in ("select", "with"), first in _PLSQL_WORDS


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

    # -- parsing -------------------------------------------------------------------

    def _parse(self, payload: bytes) -> _Request:
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
                self._parse_auth(r, req)
            elif req.function == _FUNC_EXECUTE:
                self._parse_execute(r, req)
            elif req.function in (_FUNC_REEXECUTE, _FUNC_REEXECUTE_AND_FETCH):
                self._parse_reexecute(r, req)
            elif req.function == _FUNC_FETCH:
                req.cursor_id = r.ub()
                req.num_iters = r.ub()
        except _Underflow:
            raise
        except (_ProtocolError, ValueError, IndexError, UnicodeDecodeError) as exc:
            req.parse_error = str(exc)
        return req

    @staticmethod
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

    def _read_rows(self, r: _Reader, req: _Request, expected: int, is_plsql: bool) -> None:
        metas = req.bind_metas or []
        for _ in range(expected):
            if r.remaining() == 0 and not self.last_packet_full:
                break
            if r.peek() != _MSG_ROW_DATA:
                break
            r.u8()
            req.bind_rows.append(_read_bind_row(r, metas, is_plsql))

    def _parse_execute(self, r: _Reader, req: _Request) -> None:
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
                cursor = self.cursors.get(req.cursor_id)
                sql = cursor.sql if cursor else ""
            is_query, is_plsql = _sql_kind(sql)
            expected = 1 if is_query else max(al8i4[1], 1)
            self._read_rows(r, req, expected, is_plsql)

    def _parse_reexecute(self, r: _Reader, req: _Request) -> None:
        req.cursor_id = r.ub()
        req.num_iters = r.ub()
        req.options = r.ub()
        r.ub()  # options 2
        cursor = self.cursors.get(req.cursor_id)
        if cursor is not None and cursor.bind_metas:
            req.bind_metas = cursor.bind_metas
            expected = 1 if req.function == _FUNC_REEXECUTE_AND_FETCH else max(req.num_iters, 1)
            self._read_rows(r, req, expected, cursor.is_plsql)

    # -- dispatch ------------------------------------------------------------------

    def _handle(self, payload: bytes) -> None:
        data = payload
        while True:
            try:
                req = self._parse(data)
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

    Attributes:
        token_validator: ``None`` (accept every token) or
            ``callable(kind, token) -> bool`` with ``kind`` one of
            ``"access_token"`` (login; rejection answers ORA-01017),
            ``"end_user_token"`` (rejection answers ORA-52601 on the round trip
            that carries it) or ``"database_access_token"`` (ORA-52602).  An
            exception raised by the validator counts as a rejection.  May be
            changed while the server runs.

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
    ) -> None:
        self._users = {k.upper(): v for k, v in (users or DEFAULT_USERS).items()}
        self.host = host
        self._requested_port = port
        self._owns_ca = ca is None
        self.ca = ca if ca is not None else TestCA()
        self.service_name = service_name
        self.token_user = token_user
        self.token_validator = token_validator
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
            return _SqlEngine(dict(self._tables))

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
        """Clear records, drop the token validator and every canned table."""
        with self._lock:
            self.clear_records()
            self.token_validator = None
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


if __name__ == "__main__":
    raise SystemExit(main())
