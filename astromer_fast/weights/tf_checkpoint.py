"""Read (and, for tests, write) TensorFlow 2 object checkpoints with numpy alone.

No TensorFlow, no ``protobuf`` package: the few structures involved are decoded here by hand.

A checkpoint with prefix ``P`` is

* ``P.index``: an SSTable (the LevelDB table format). Layout from the end of the file:
  a 48-byte footer = metaindex block handle + index block handle (each a pair of varints
  ``offset, size``), zero padding up to 40 bytes, then the 8-byte little-endian magic
  ``0xdb4775248b80fb57``. The index block maps a separator key to the handle of each data block.
  Every block is followed by a 5-byte trailer: a compression-type byte (0 = none; snappy and others
  are refused) and the masked crc32c of block + type byte. A block is a run of prefix-compressed
  entries ``varint shared, varint non_shared, varint value_len, key suffix, value``, then a
  little-endian uint32 restart array and its uint32 length.
  Keys are tensor names in sorted order. The empty key holds a ``BundleHeaderProto``
  (1: num_shards, 2: endianness, 3: VersionDef); every other key a ``BundleEntryProto``
  (1: dtype, 2: TensorShapeProto, 3: shard_id, 4: offset, 5: size, 6: crc32c (fixed32, masked),
  7: slices).
* ``P.data-0000k-of-0000n``: the raw tensor bytes, little-endian, row-major, at ``offset`` with
  ``size`` bytes in shard ``k``. The entry's crc32c is the *masked* Castagnoli crc of those bytes
  (``rotr(crc, 15) + 0xa282ead8``). String tensors are stored as varint lengths, a 4-byte masked
  crc of the lengths, then the bytes; their crc covers the lengths as little-endian uint32, that
  4-byte checksum and the bytes (checked on the released Astromer 1 object graph).

Accepted inputs: a released ``.zip`` (read in place, never extracted), a folder holding one
checkpoint, the prefix ``.../weights``, or the ``.index`` file itself (then the index can be read
even when the data file is absent).

Public API::

    read_index(path, checkpoint=None) -> dict[str, TensorInfo]
    read_checkpoint(path, names=None, verify_crc=True, checkpoint=None) -> dict[str, np.ndarray]
    read_config(path, checkpoint=None) -> dict | None          # conf.json beside the weights
    TFCheckpoint(path, checkpoint=None)                         # the same, keeping the source open
    crc32c(data, crc=0), masked_crc32c(data), CheckpointError(ValueError)

``checkpoint`` picks one checkpoint when a zip or a folder holds several (its prefix, e.g.
``"macho/weights"``, or its folder, ``"macho"``); without it such an input is refused with the list.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "TFCheckpoint",
    "Tensors",
    "crc32c",
    "masked_crc32c",
    "read_checkpoint",
    "read_config",
    "read_index",
]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


class CheckpointError(ValueError):
    """A file is not a readable TensorFlow checkpoint, or does not hold what was asked of it."""


# ----------------------------------------------------------------------------------------------
# dtypes (tensorflow/core/framework/types.proto)

# TF enum -> (name, numpy dtype or None for strings, bytes per element)
_TF_DTYPES = {
    1: ("float32", np.dtype("<f4")),
    2: ("float64", np.dtype("<f8")),
    3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")),
    5: ("int16", np.dtype("<i2")),
    6: ("int8", np.dtype("i1")),
    7: ("string", None),
    8: ("complex64", np.dtype("<c8")),
    9: ("int64", np.dtype("<i8")),
    10: ("bool", np.dtype("?")),
    14: ("bfloat16", np.dtype("<u2")),  # raw bits; converted to float32 on read
    17: ("uint16", np.dtype("<u2")),
    18: ("complex128", np.dtype("<c16")),
    19: ("float16", np.dtype("<f2")),
    22: ("uint32", np.dtype("<u4")),
    23: ("uint64", np.dtype("<u8")),
}
@dataclass(frozen=True)
class TensorInfo:
    """One index entry. ``dtype`` is a numpy-style name ("float32", "string", "bfloat16", ...)."""

    name: str
    dtype: str
    shape: tuple
    shard: int
    offset: int
    size: int
    crc32c: int  # as stored: masked
    tf_dtype: int = 1
    sliced: bool = False  # a partitioned variable (not supported for reading)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_numeric(self) -> bool:
        return self.dtype != "string"


# ----------------------------------------------------------------------------------------------
# crc32c (Castagnoli, reflected polynomial 0x82F63B78)

def _make_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_CRC_TABLE = _make_table()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]
_BITS_256x8 = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool)


def _crc_scalar(reg: int, buf) -> int:
    t = _CRC_TABLE_LIST
    for b in bytes(buf):
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _op_tables(cols: np.ndarray) -> list:
    """A GF(2)-linear map on 32-bit registers, given by the images of the 32 unit vectors, as four
    byte-indexed lookup tables (one per register byte)."""
    out = []
    for k in range(4):
        c = cols[8 * k: 8 * k + 8]
        out.append(np.bitwise_xor.reduce(np.where(_BITS_256x8, c[None, :], np.uint32(0)), axis=1)
                   .astype(np.uint32))
    return out


def _op_apply(tables, x: np.ndarray) -> np.ndarray:
    t0, t1, t2, t3 = tables
    return t0[x & 0xFF] ^ t1[(x >> 8) & 0xFF] ^ t2[(x >> 16) & 0xFF] ^ t3[x >> 24]


def _crc_register(reg: int, buf: np.ndarray) -> int:
    """Advance the crc register over ``buf`` (uint8). The update is linear over GF(2), so the
    bytes are split into K equal chunks processed side by side (lane 0 starts from ``reg``, the
    others from 0), and the lanes are folded pairwise with the operator "advance over L zero
    bytes", itself obtained from 32 extra lanes fed zeros and started at the unit vectors."""
    n = buf.size
    if n < 2048:
        return _crc_scalar(reg, buf.tobytes())
    k = 1 << min(14, (n // 16).bit_length() - 1)  # lanes, a power of two
    length = n // k
    body = np.zeros((length, k + 32), dtype=np.uint8)
    body[:, :k] = buf[: k * length].reshape(k, length).T
    regs = np.zeros(k + 32, dtype=np.uint32)
    regs[0] = reg
    regs[k:] = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    table = _CRC_TABLE
    for row in body:
        regs = table[(regs.astype(np.uint8) ^ row)] ^ (regs >> 8)
    lanes, cols = regs[:k], regs[k:]
    while lanes.size > 1:
        tables = _op_tables(cols)
        lanes = _op_apply(tables, lanes[0::2]) ^ lanes[1::2]
        cols = _op_apply(tables, cols)  # advance over twice as many zero bytes
    reg = int(lanes[0])
    rest = buf[k * length:]
    return _crc_register(reg, rest) if rest.size else reg


def _as_u8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def crc32c(data, crc: int = 0) -> int:
    """Castagnoli crc32c of ``data`` (bytes-like or numpy array), extending ``crc`` (like
    ``zlib.crc32``). ``crc32c(b"123456789") == 0xE3069283``."""
    return _crc_register((crc ^ _U32) & _U32, _as_u8(data)) ^ _U32


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def masked_crc32c(data) -> int:
    return mask_crc(crc32c(data))


# ----------------------------------------------------------------------------------------------
# varints and a minimal protobuf wire decoder

def _varint(buf, pos: int, end: int, what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise CheckpointError(f"truncated varint in {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError(f"malformed varint (more than 10 bytes) in {what}")


def _proto_fields(buf: bytes, what: str) -> dict[int, list]:
    """Decode one protobuf message into {field number: [values]}: ints for varint/fixed wire types,
    bytes for length-delimited ones."""
    fields: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end, what)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise CheckpointError(f"malformed protobuf in {what}: field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end, what)
        elif wire == 1:
            if pos + 8 > end:
                raise CheckpointError(f"truncated protobuf in {what}")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end, what)
            if pos + n > end:
                raise CheckpointError(f"truncated protobuf in {what}")
            value = bytes(buf[pos: pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > end:
                raise CheckpointError(f"truncated protobuf in {what}")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise CheckpointError(f"malformed protobuf in {what}: unsupported wire type {wire}")
        fields.setdefault(field, []).append(value)
    return fields


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# ----------------------------------------------------------------------------------------------
# SSTable

def _read_block(data: bytes, offset: int, size: int, src: str, what: str) -> bytes:
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(data) - FOOTER_SIZE or offset < 0:
        raise CheckpointError(f"{src}: truncated index: the {what} block needs bytes "
                              f"{offset}..{end} but the file has {len(data)} bytes")
    block = data[offset: offset + size]
    ctype = data[offset + size]
    if ctype != 0:
        kind = {1: "snappy"}.get(ctype, f"type {ctype}")
        raise CheckpointError(f"{src}: the {what} block is {kind}-compressed; only uncompressed "
                              "checkpoint indexes are supported")
    stored = struct.unpack_from("<I", data, offset + size + 1)[0]
    actual = mask_crc(crc32c(data[offset: offset + size + 1]))
    if stored != actual:
        raise CheckpointError(f"{src}: corrupted index: crc32c mismatch in the {what} block at "
                              f"offset {offset} (stored {stored:#010x}, computed {actual:#010x})")
    return block


def _block_entries(block: bytes, src: str, what: str) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise CheckpointError(f"{src}: malformed {what} block ({len(block)} bytes)")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    if n_restarts == 0 or end < 0:
        raise CheckpointError(f"{src}: malformed {what} block (restart count {n_restarts})")
    where = f"{src} ({what} block)"
    entries, pos, prev = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, end, where)
        non_shared, pos = _varint(block, pos, end, where)
        vlen, pos = _varint(block, pos, end, where)
        if shared > len(prev) or pos + non_shared + vlen > end:
            raise CheckpointError(f"{src}: malformed entry in the {what} block")
        key = prev[:shared] + block[pos: pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos: pos + vlen]))
        pos += vlen
        prev = key
    return entries


def _parse_table(data: bytes, src: str) -> list[tuple[bytes, bytes]]:
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(f"{src}: not a TensorFlow checkpoint index ({len(data)} bytes, "
                              f"shorter than the {FOOTER_SIZE}-byte table footer; empty or "
                              "truncated)")
    footer = data[-FOOTER_SIZE:]
    magic = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)[0]
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{src}: not a TensorFlow checkpoint index (bad table magic "
                              f"{magic:#018x}, expected {TABLE_MAGIC:#018x}; the file is not an "
                              "SSTable or it is truncated)")
    where = f"{src} (footer)"
    pos = 0
    _meta_off, pos = _varint(footer, pos, 40, where)
    _meta_size, pos = _varint(footer, pos, 40, where)
    idx_off, pos = _varint(footer, pos, 40, where)
    idx_size, pos = _varint(footer, pos, 40, where)
    index = _block_entries(_read_block(data, idx_off, idx_size, src, "index"), src, "index")
    entries: list[tuple[bytes, bytes]] = []
    for i, (_sep, handle) in enumerate(index):
        off, p = _varint(handle, 0, len(handle), where)
        size, _ = _varint(handle, p, len(handle), where)
        entries.extend(_block_entries(_read_block(data, off, size, src, f"data #{i}"), src,
                                      f"data #{i}"))
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if not a < b:
            raise CheckpointError(f"{src}: malformed index: keys not in strictly increasing order "
                                  f"({a!r} then {b!r})")
    return entries


def _parse_shape(buf: bytes, what: str) -> tuple:
    f = _proto_fields(buf, what)
    if f.get(3, [0])[-1]:
        raise CheckpointError(f"{what}: shape of unknown rank")
    dims = []
    for dim in f.get(2, []):
        size = _int64(_proto_fields(dim, what).get(1, [0])[-1])
        if size < 0:
            raise CheckpointError(f"{what}: unknown dimension ({size})")
        dims.append(size)
    return tuple(dims)


def _parse_index(data: bytes, src: str) -> tuple[dict, dict[str, TensorInfo]]:
    entries = _parse_table(data, src)
    header = None
    tensors: dict[str, TensorInfo] = {}
    for key, value in entries:
        if key == b"":
            f = _proto_fields(value, f"{src} (bundle header)")
            header = {"num_shards": f.get(1, [1])[-1], "endianness": f.get(2, [0])[-1]}
            version = _proto_fields(f[3][-1], f"{src} (version)") if 3 in f else {}
            header["version"] = {"producer": version.get(1, [0])[-1],
                                 "min_consumer": version.get(2, [0])[-1]}
            continue
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{src}: malformed index: key {key!r} is not UTF-8") from None
        what = f"{src} (entry {name!r})"
        f = _proto_fields(value, what)
        tf_dtype = f.get(1, [0])[-1]
        if tf_dtype not in _TF_DTYPES:
            raise CheckpointError(f"{src}: tensor {name!r} has unsupported dtype enum {tf_dtype}")
        dname, npdt = _TF_DTYPES[tf_dtype]
        shape = _parse_shape(f[2][-1], what) if 2 in f else ()
        info = TensorInfo(name=name, dtype=dname, shape=shape, shard=f.get(3, [0])[-1],
                          offset=_int64(f.get(4, [0])[-1]), size=_int64(f.get(5, [0])[-1]),
                          crc32c=f.get(6, [0])[-1], tf_dtype=tf_dtype, sliced=7 in f)
        if info.offset < 0 or info.size < 0:
            raise CheckpointError(f"{src}: tensor {name!r} has a negative offset or size")
        if npdt is not None and not info.sliced and info.size != info.numel * npdt.itemsize:
            raise CheckpointError(f"{src}: tensor {name!r}: index says {info.size} bytes, but "
                                  f"{dname}{list(shape)} needs {info.numel * npdt.itemsize}")
        tensors[name] = info
    if header is None:
        raise CheckpointError(f"{src}: not a TensorFlow checkpoint index (an SSTable without the "
                              "bundle header entry)")
    if header["endianness"] not in (0, 1):
        raise CheckpointError(f"{src}: unknown endianness {header['endianness']}")
    if header["num_shards"] < 1:
        raise CheckpointError(f"{src}: bundle header has num_shards={header['num_shards']}")
    for info in tensors.values():
        if info.shard >= header["num_shards"]:
            raise CheckpointError(f"{src}: tensor {info.name!r} is in shard {info.shard} but the "
                                  f"bundle has {header['num_shards']} shards")
    return header, tensors


# ----------------------------------------------------------------------------------------------
# sources: a zip member set, or files on disk

def _data_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class _DirSource:
    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.index_path = Path(str(prefix) + ".index")
        self.label = str(self.index_path)

    def index_bytes(self) -> bytes:
        return self.index_path.read_bytes()

    def data_label(self, shard: int, n: int) -> str:
        return _data_name(str(self.prefix), shard, n)

    def data_size(self, shard: int, n: int) -> int | None:
        p = Path(self.data_label(shard, n))
        return p.stat().st_size if p.is_file() else None

    def open_data(self, shard: int, n: int):
        return open(self.data_label(shard, n), "rb")

    def config_bytes(self) -> bytes | None:
        p = self.prefix.parent / "conf.json"
        return p.read_bytes() if p.is_file() else None

    def close(self):
        pass


class _ZipSource:
    def __init__(self, zpath: Path, zf: zipfile.ZipFile, prefix: str):
        self.zpath, self.zf, self.prefix = zpath, zf, prefix
        self.label = f"{zpath}!{prefix}.index"
        self.names = set(zf.namelist())

    def index_bytes(self) -> bytes:
        return self.zf.read(self.prefix + ".index")

    def data_label(self, shard: int, n: int) -> str:
        return f"{self.zpath}!{_data_name(self.prefix, shard, n)}"

    def data_size(self, shard: int, n: int) -> int | None:
        name = _data_name(self.prefix, shard, n)
        return self.zf.getinfo(name).file_size if name in self.names else None

    def open_data(self, shard: int, n: int):
        return self.zf.open(_data_name(self.prefix, shard, n))

    def config_bytes(self) -> bytes | None:
        parent = str(PurePosixPath(self.prefix).parent)
        name = "conf.json" if parent in ("", ".") else f"{parent}/conf.json"
        return self.zf.read(name) if name in self.names else None

    def close(self):
        self.zf.close()


def _choose(prefixes: list[str], checkpoint: str | None, where: str) -> str:
    if checkpoint is not None:
        want = checkpoint[:-6] if checkpoint.endswith(".index") else checkpoint
        want = want.strip("/")
        hits = [p for p in prefixes if p == want or str(PurePosixPath(p).parent) == want]
        if len(hits) == 1:
            return hits[0]
        raise CheckpointError(f"{where}: checkpoint {checkpoint!r} "
                              f"{'is ambiguous' if hits else 'not found'}; it holds "
                              f"{', '.join(sorted(prefixes)) or 'none'}")
    if len(prefixes) == 1:
        return prefixes[0]
    raise CheckpointError(f"{where}: holds {len(prefixes)} checkpoints "
                          f"({', '.join(sorted(prefixes))}); choose one with checkpoint=...")


def _open_source(path, checkpoint: str | None = None):
    path = Path(os.fspath(path))
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.index") if p.is_file())
        rel = [p.relative_to(path).as_posix()[:-6] for p in found]
        if not rel:
            raise CheckpointError(f"{path}: not a checkpoint folder (no *.index file in it)")
        return _DirSource(path / _choose(rel, checkpoint, str(path)))
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: unreadable zip ({e})") from None
        prefixes = [n[:-6] for n in zf.namelist() if n.endswith(".index") and not n.endswith("/")]
        if not prefixes:
            zf.close()
            raise CheckpointError(f"{path}: not a checkpoint: the zip holds no weights.index "
                                  f"(no *.index member among its {len(zf.namelist())} entries)")
        try:
            prefix = _choose(prefixes, checkpoint, str(path))
        except CheckpointError:
            zf.close()
            raise
        return _ZipSource(path, zf, prefix)
    if path.suffix == ".zip" and path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint: not a valid zip file")
    if path.suffix == ".index" and path.is_file():
        return _DirSource(path.with_suffix(""))
    if Path(str(path) + ".index").is_file():
        return _DirSource(path)
    if path.is_file():
        # Some other file: accept it as an index if it parses as one, else _parse_index says why.
        src = _DirSource(path)
        src.index_path = path
        src.label = str(path)
        return src
    raise CheckpointError(f"{path}: no such checkpoint (neither a file, a folder, a zip, nor a "
                          f"prefix with {path.name}.index beside it)")


# ----------------------------------------------------------------------------------------------
# reading

def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class TFCheckpoint:
    """An open checkpoint: ``.index`` (dict of TensorInfo), ``.header``, ``.read(names)``,
    ``.config()``. Use as a context manager or call ``close()`` (zips stay open until then)."""

    def __init__(self, path, checkpoint: str | None = None):
        self.path = path
        self._src = _open_source(path, checkpoint)
        self.label = self._src.label
        try:
            data = self._src.index_bytes()
        except OSError as e:
            self.close()
            raise CheckpointError(f"{self.label}: unreadable ({e})") from None
        try:
            self.header, self.index = _parse_index(data, self.label)
        except CheckpointError:
            self.close()
            raise

    def close(self):
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def config(self) -> dict | None:
        raw = self._src.config_bytes()
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.label}: conf.json beside it is not valid JSON "
                                  f"({e})") from None

    def read(self, names=None, verify_crc: bool = True) -> dict[str, np.ndarray]:
        if names is None:
            wanted = [i for i in self.index.values() if i.is_numeric]
        else:
            names = [names] if isinstance(names, str) else list(names)
            missing = [n for n in names if n not in self.index]
            if missing:
                raise CheckpointError(f"{self.label}: no tensor named "
                                      f"{', '.join(map(repr, missing))} in the checkpoint "
                                      f"({len(self.index)} tensors)")
            wanted = [self.index[n] for n in names]
        n_shards = self.header["num_shards"]
        big = self.header["endianness"] == 1
        out: dict[str, np.ndarray] = {}
        by_shard: dict[int, list[TensorInfo]] = {}
        for info in wanted:
            if info.sliced:
                raise CheckpointError(f"{self.label}: tensor {info.name!r} is a partitioned "
                                      "(sliced) variable, which is not supported")
            by_shard.setdefault(info.shard, []).append(info)
        for shard, infos in sorted(by_shard.items()):
            dlabel = self._src.data_label(shard, n_shards)
            dsize = self._src.data_size(shard, n_shards)
            if dsize is None:
                raise CheckpointError(f"{dlabel}: data file missing; tensor {infos[0].name!r} "
                                      "(and the index) point into it")
            for info in infos:
                if info.offset + info.size > dsize:
                    raise CheckpointError(
                        f"{dlabel}: truncated data file: tensor {info.name!r} needs bytes "
                        f"{info.offset}..{info.offset + info.size} but data file has {dsize} bytes")
            with self._src.open_data(shard, n_shards) as f:
                for info in sorted(infos, key=lambda i: i.offset):
                    raw = np.empty(info.size, dtype=np.uint8)
                    f.seek(info.offset)
                    got = 0
                    view = memoryview(raw)
                    while got < info.size:
                        k = f.readinto(view[got:])
                        if not k:
                            raise CheckpointError(
                                f"{dlabel}: truncated data file: tensor {info.name!r} needs bytes "
                                f"{info.offset}..{info.offset + info.size}, read ended at "
                                f"{info.offset + got}")
                        got += k
                    out[info.name] = self._decode(info, raw, verify_crc, dlabel, big)
        return {i.name: out[i.name] for i in wanted}

    def _decode(self, info: TensorInfo, raw: np.ndarray, verify_crc: bool, dlabel: str,
                big: bool) -> np.ndarray:
        if info.dtype == "string":
            return self._decode_strings(info, raw, verify_crc, dlabel)
        if verify_crc:
            actual = masked_crc32c(raw)
            if actual != info.crc32c:
                raise CheckpointError(f"{dlabel}: crc32c mismatch for tensor {info.name!r} (bytes "
                                      f"{info.offset}..{info.offset + info.size}: stored "
                                      f"{info.crc32c:#010x}, computed {actual:#010x}); the data "
                                      "file is corrupted")
        npdt = _TF_DTYPES[info.tf_dtype][1]
        if big:
            npdt = npdt.newbyteorder(">")
        arr = raw.view(npdt)
        if big:
            arr = arr.astype(npdt.newbyteorder("<"))
        if info.dtype == "bfloat16":
            arr = _bf16_to_f32(arr)
        return arr.reshape(info.shape)

    def _decode_strings(self, info, raw: np.ndarray, verify_crc: bool, dlabel: str) -> np.ndarray:
        buf = raw.tobytes()
        what = f"{dlabel} (tensor {info.name!r})"
        pos, lengths = 0, []
        for _ in range(info.numel):
            n, pos = _varint(buf, pos, len(buf), what)
            lengths.append(n)
        if pos + 4 + sum(lengths) != len(buf):
            raise CheckpointError(f"{what}: string tensor layout does not match its size")
        length_crc = buf[pos: pos + 4]
        pos += 4
        items = []
        for n in lengths:
            items.append(buf[pos: pos + n])
            pos += n
        if verify_crc:
            # The lengths enter the checksum as uint32 (what TF writes); uint64 is also accepted.
            payload = buf[pos - sum(lengths): pos]
            computed = []
            for fmt in ("I", "Q"):
                if fmt == "I" and lengths and max(lengths) > _U32:
                    continue
                crc = crc32c(struct.pack(f"<{len(lengths)}{fmt}", *lengths))
                computed.append(mask_crc(crc32c(payload, crc32c(length_crc, crc))))
            if info.crc32c not in computed:
                raise CheckpointError(f"{dlabel}: crc32c mismatch for tensor {info.name!r} "
                                      f"(stored {info.crc32c:#010x}, computed {computed[0]:#010x});"
                                      " the data file is corrupted")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(info.shape)


class Tensors(dict):
    """A plain dict, plus ``source``: the file it was read from (used in error messages)."""

    source: str = "checkpoint"


def _labelled(items: dict, source: str) -> Tensors:
    out = Tensors(items)
    out.source = source
    return out


def read_index(path, checkpoint: str | None = None) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and locations of every tensor (the data file is not needed)."""
    with TFCheckpoint(path, checkpoint) as ck:
        return _labelled(ck.index, ck.label)


def read_checkpoint(path, names=None, verify_crc: bool = True,
                    checkpoint: str | None = None) -> dict[str, np.ndarray]:
    """Read tensors as numpy arrays: ``names`` (any dtype; strings come back as object arrays of
    bytes) or, by default, every numeric tensor. bfloat16 is returned as float32."""
    with TFCheckpoint(path, checkpoint) as ck:
        return _labelled(ck.read(names, verify_crc=verify_crc), ck.label)


def read_config(path, checkpoint: str | None = None) -> dict | None:
    """The ``conf.json`` beside the weights (as a dict), or None when there is none."""
    with TFCheckpoint(path, checkpoint) as ck:
        return ck.config()


if __name__ == "__main__":  # pragma: no cover - a small inspection tool
    import sys

    for p in sys.argv[1:]:
        with TFCheckpoint(p) as ck:
            print(f"# {ck.label}: {ck.header}")
            for info in ck.index.values():
                print(f"{info.name}\t{info.dtype}\t{list(info.shape)}")
