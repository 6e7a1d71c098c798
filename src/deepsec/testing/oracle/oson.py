"""OSON (Oracle binary JSON) decoder: enough for the end-user context python-oracledb sends."""

from __future__ import annotations

import datetime as _dt

from .codec import (
    Value,
    _decode_binary_double,
    _decode_binary_float,
    _decode_date,
    _ProtocolError,
    _Reader,
    decode_oracle_number,
)

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
