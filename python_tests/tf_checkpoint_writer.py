"""A minimal TensorFlow checkpoint writer (single shard, one uncompressed data block), for the
tests: it makes checkpoints of known content, including the awkward ones (strings, odd dtypes, a
data file laid out in another order, damaged bytes) that ``astromer_fast.weights.tf_checkpoint``
must read or refuse. The package only reads checkpoints, so the writer lives here."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from astromer_fast.weights.tf_checkpoint import (_MASK_DELTA, _U32, TABLE_MAGIC, _data_name,
                                                 crc32c, mask_crc, masked_crc32c)

_NUMPY_TO_TF = {
    np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("uint8"): 4,
    np.dtype("int16"): 5, np.dtype("int8"): 6, np.dtype("complex64"): 8, np.dtype("int64"): 9,
    np.dtype("bool"): 10, np.dtype("uint16"): 17, np.dtype("complex128"): 18,
    np.dtype("float16"): 19, np.dtype("uint32"): 22, np.dtype("uint64"): 23,
}


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def _put_varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _proto_field(field: int, wire: int, value) -> bytes:
    tag = _put_varint(field << 3 | wire)
    if wire == 0:
        return tag + _put_varint(value)
    if wire == 2:
        return tag + _put_varint(len(value)) + value
    if wire == 5:
        return tag + struct.pack("<I", value)
    raise AssertionError(wire)


def _build_block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        if i % restart_interval == 0:
            shared = 0
            restarts.append(len(out))
        else:
            shared = 0
            limit = min(len(prev), len(key))
            while shared < limit and prev[shared] == key[shared]:
                shared += 1
        out += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        out += key[shared:] + value
        prev = key
    if not restarts:
        restarts = [0]
    out += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _with_trailer(block: bytes) -> bytes:
    body = block + b"\x00"
    return body + struct.pack("<I", mask_crc(crc32c(body)))


def _string_tensor_bytes(arr: np.ndarray) -> tuple[bytes, int]:
    items = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
    lengths = [len(x) for x in items]
    head = b"".join(_put_varint(n) for n in lengths)
    crc = crc32c(struct.pack(f"<{len(lengths)}I", *lengths))
    length_crc = struct.pack("<I", mask_crc(crc))
    crc = crc32c(length_crc, crc)
    payload = b"".join(items)
    crc = crc32c(payload, crc)
    return head + length_crc + payload, mask_crc(crc)


def _short_successor(key: bytes) -> bytes:
    """The shortest key >= every key starting with ``key``'s first non-0xff byte (what LevelDB
    writers store as the index separator after the last data block)."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def write_checkpoint(prefix, tensors: dict, order=None) -> None:
    """Write ``prefix.index`` and ``prefix.data-00000-of-00001`` (a single-shard TF2 bundle) holding
    ``tensors`` ({name: array}; numpy numeric dtypes, or object/str/bytes arrays for DT_STRING).

    ``order``: the names in the order their bytes are laid out in the data file (default: sorted
    by name; TensorFlow uses its object-graph order). The index itself is always sorted by name."""
    prefix = Path(os.fspath(prefix))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, key=lambda n: n.encode("utf-8"))
    if order is not None:
        order = list(order)
        if sorted(order) != sorted(names):
            raise ValueError("order must list every tensor name exactly once")
        names = order
    if any(not n for n in names):
        raise ValueError("tensor names must be non-empty (the empty key is the bundle header)")
    data = bytearray()
    entries: list[tuple[bytes, bytes]] = []
    for name in names:
        arr = np.asarray(tensors[name])
        if arr.dtype.kind in "OSU":
            tf_dtype = 7
            raw, crc = _string_tensor_bytes(arr)
        else:
            if arr.dtype.newbyteorder("=") not in _NUMPY_TO_TF and arr.dtype not in _NUMPY_TO_TF:
                raise ValueError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
            le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            tf_dtype = _NUMPY_TO_TF[np.dtype(le.dtype.name)]
            raw = np.ascontiguousarray(le).tobytes()
            crc = masked_crc32c(raw)
        shape = b"".join(_proto_field(2, 2, _proto_field(1, 0, d)) for d in arr.shape)
        entry = _proto_field(1, 0, tf_dtype) + _proto_field(2, 2, shape)
        if data:
            entry += _proto_field(4, 0, len(data))
        entry += _proto_field(5, 0, len(raw)) + _proto_field(6, 5, crc)
        entries.append((name.encode("utf-8"), entry))
        data += raw
    entries.sort()
    version = _proto_field(1, 0, 1)
    header = _proto_field(1, 0, 1) + _proto_field(3, 2, version)
    entries.insert(0, (b"", header))

    out = bytearray()
    data_block = _build_block(entries)
    data_handle = _put_varint(0) + _put_varint(len(data_block))
    out += _with_trailer(data_block)
    meta_off, meta_block = len(out), _build_block([])
    out += _with_trailer(meta_block)
    index_off = len(out)
    index_block = _build_block([(_short_successor(entries[-1][0]), data_handle)])
    out += _with_trailer(index_block)
    footer = (_put_varint(meta_off) + _put_varint(len(meta_block))
              + _put_varint(index_off) + _put_varint(len(index_block)))
    footer = footer.ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)
    out += footer
    Path(str(prefix) + ".index").write_bytes(bytes(out))
    Path(_data_name(str(prefix), 0, 1)).write_bytes(bytes(data))
