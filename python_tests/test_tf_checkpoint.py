"""The numpy-only TensorFlow checkpoint reader/writer and the official-name mapping.

Tests on forged checkpoints always run; those on the released weights skip when the shared data
folder (``../shared/data`` beside the repository, or ``$ASTROMER_FAST_SHARED_DATA``) is absent.
"""

from __future__ import annotations

import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_dir
from tf_checkpoint_writer import unmask_crc, write_checkpoint

from astromer_fast.weights.official import (
    infer_architecture,
    official_name_map,
    official_state_dict,
)
from astromer_fast.weights.tf_checkpoint import (
    TABLE_MAGIC,
    CheckpointError,
    TensorInfo,
    crc32c,
    mask_crc,
    masked_crc32c,
    read_checkpoint,
    read_config,
    read_index,
)

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
V1_PARAMS = 661_505


def _official_file(name: str) -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not available: {root} is absent (set ASTROMER_FAST_SHARED_DATA)")
    path = root / "official_weights" / name
    if not path.is_file():
        pytest.skip(f"released weights not available: {path} is absent")
    return path


@pytest.fixture(scope="module")
def v1_zip() -> Path:
    return _official_file("astromer1_macho_a0.zip")


@pytest.fixture(scope="module")
def v2_index() -> Path:
    return _official_file("astromer2_skipclf_alcock.weights.index")


# ----------------------------------------------------------------------------------------------
# forged official-style variables

def fake_official(*, n_blocks=2, dff=16, d=8, leak=False, token=False, head=True, seed=0,
                  classifier=False, optimizer=False) -> dict[str, np.ndarray]:
    """Variables named as the official Keras models name them (v1 layout without token/leak,
    v2 pretraining layout with them), filled with distinct random values."""
    rng = np.random.default_rng(seed)
    enc = "layer_with_weights-1/" if token else "layer_with_weights-0/"
    out = {}

    def put(path, *shape):
        out[path + SUFFIX] = rng.standard_normal(shape).astype(np.float32)

    if token:
        put("layer_with_weights-0/msk_token", 1, 1)
    put(f"{enc}inp_transform/kernel", 1, d)
    put(f"{enc}inp_transform/bias", d)
    for i in range(n_blocks):
        b = f"{enc}enc_layers/{i}/"
        for w in ("wq", "wk", "wv", "dense"):
            put(f"{b}mha/{w}/kernel", d, d)
            put(f"{b}mha/{w}/bias", d)
        if leak:
            for w in ("reshape_leak_1", "reshape_leak_2"):
                put(f"{b}{w}/kernel", d, d)
                put(f"{b}{w}/bias", d)
        put(f"{b}ffn/layer_with_weights-0/kernel", d, dff)
        put(f"{b}ffn/layer_with_weights-0/bias", dff)
        put(f"{b}ffn/layer_with_weights-1/kernel", dff, d)
        put(f"{b}ffn/layer_with_weights-1/bias", d)
        for ln in ("layernorm1", "layernorm2"):
            put(f"{b}{ln}/gamma", d)
            put(f"{b}{ln}/beta", d)
    if head:
        h = "layer_with_weights-2/" if token else "layer_with_weights-1/"
        put(f"{h}bn_0/gamma", d)
        put(f"{h}bn_0/beta", d)
        put(f"{h}reg_layer/kernel", d, 1)
        put(f"{h}reg_layer/bias", 1)
    if classifier:
        put("layer_with_weights-9/gamma", 7)
        put("layer_with_weights-10/kernel", d, 5)
    if optimizer:
        out["optimizer/iter" + SUFFIX] = np.array(3, dtype=np.int64)
        put(f"{enc}enc_layers/0/mha/wq/kernel/.OPTIMIZER_SLOT/optimizer/m", d, d)
        out["save_counter" + SUFFIX] = np.array(1, dtype=np.int64)
    out["_CHECKPOINTABLE_OBJECT_GRAPH"] = np.array(b"\x0a\x03abc", dtype=object)
    return out


def expected_torch_shapes(*, n_blocks, dff, d=256, leak, token, head=True) -> dict[str, tuple]:
    s = {"embedding.mag_proj.weight": (d, 1), "embedding.mag_proj.bias": (d,)}
    if token:
        s["embedding.mask_token"] = (1,)
    for i in range(n_blocks):
        b = f"blocks.{i}."
        lins = {"attn.wq": (d, d), "attn.wk": (d, d), "attn.wv": (d, d), "attn.wo": (d, d),
                "ffn1": (dff, d), "ffn2": (d, dff)}
        if leak:
            lins.update({"leak1": (d, d), "leak2": (d, d)})
        for name, shape in lins.items():
            s[b + name + ".weight"] = shape
            s[b + name + ".bias"] = (shape[0],)
        for ln in ("ln1", "ln2"):
            s[b + ln + ".weight"] = (d,)
            s[b + ln + ".bias"] = (d,)
    if head:
        s.update({"head.norm.weight": (d,), "head.norm.bias": (d,), "head.proj.weight": (1, d),
                  "head.proj.bias": (1,)})
    return s


def zip_dir(folder: Path, zpath: Path, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(zpath, "w", compression) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return zpath


# ----------------------------------------------------------------------------------------------
# crc32c

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_reference():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 test vector
    assert crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(1)
    for n in (1, 7, 2047, 2048, 2049, 3001):  # both sides of the lane-parallel threshold
        buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(buf) == _crc32c_bitwise(buf), n
    big = rng.integers(0, 256, 1_000_003, dtype=np.uint8)
    # The lane-parallel path agrees with the byte-at-a-time path, and crcs chain like zlib.crc32.
    whole = crc32c(big)
    assert crc32c(big[600_000:], crc32c(big[:600_000])) == whole
    assert crc32c(big[1:], crc32c(big[:1])) == whole
    assert crc32c(big.tobytes()) == whole  # bytes and arrays alike
    chained = 0
    for i in range(0, big.size, 1000):  # 1000-byte pieces all take the byte-at-a-time path
        chained = crc32c(big[i: i + 1000].tobytes(), chained)
    assert chained == whole


def test_crc_mask_is_tensorflows():
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask_crc(mask_crc(crc)) == crc
    rot = ((0xE3069283 >> 15) | (0xE3069283 << 17)) & 0xFFFFFFFF
    assert mask_crc(0xE3069283) == (rot + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == mask_crc(0xE3069283)


# ----------------------------------------------------------------------------------------------
# round trips through the writer

def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "i16": np.arange(-3, 3, dtype=np.int16),
        "i32": np.arange(12, dtype=np.int32).reshape(2, 3, 2),
        "i64": np.array(2**40, dtype=np.int64),  # a scalar
        "u8": np.arange(256, dtype=np.uint8),
        "u16": np.array([65535], dtype=np.uint16),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "c64": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big": rng.standard_normal((300, 200)).astype(np.float32),
        "names/with/slashes" + SUFFIX: np.ones(2, np.float32),
        "strings": np.array([b"abc", b"", "h\u00e9".encode()], dtype=object),
    }
    write_checkpoint(tmp_path / "ck" / "weights", tensors)
    index = read_index(tmp_path / "ck" / "weights")
    assert set(index) == set(tensors)
    assert index["strings"].dtype == "string" and index["i32"].shape == (2, 3, 2)
    assert index["i64"].shape == () and index["f32"].dtype == "float32"
    assert all(isinstance(i, TensorInfo) for i in index.values())

    numeric = read_checkpoint(tmp_path / "ck" / "weights")
    assert "strings" not in numeric  # DT_STRING is skipped unless asked for
    assert set(numeric) == set(tensors) - {"strings"}
    for name, arr in numeric.items():
        assert arr.dtype == tensors[name].dtype, name
        assert arr.shape == tensors[name].shape, name
        np.testing.assert_array_equal(arr, tensors[name])

    got = read_checkpoint(tmp_path / "ck", names=["strings", "u8"])
    assert list(got) == ["strings", "u8"]
    assert list(got["strings"]) == [b"abc", b"", "h\u00e9".encode()]


def test_reads_only_what_is_asked_and_names_the_unknown(tmp_path):
    write_checkpoint(tmp_path / "w", {"a": np.ones(3, np.float32), "b": np.zeros(2, np.int32)})
    assert list(read_checkpoint(tmp_path / "w", names=["b"])) == ["b"]
    with pytest.raises(CheckpointError, match=r"no tensor named 'c'"):
        read_checkpoint(tmp_path / "w", names=["a", "c"])


def test_zip_folder_prefix_and_index_inputs_agree(tmp_path):
    tensors = fake_official()
    folder = tmp_path / "release" / "model"
    write_checkpoint(folder / "weights", tensors)
    (folder / "conf.json").write_text('{"layers": 2, "dff": 16}')
    z = zip_dir(tmp_path / "release", tmp_path / "model.zip")
    ref = read_checkpoint(z)
    for src in (tmp_path / "release", folder, folder / "weights", folder / "weights.index"):
        got = read_checkpoint(src)
        assert set(got) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])
        assert read_config(src) == {"layers": 2, "dff": 16}
    assert read_config(z) == {"layers": 2, "dff": 16}
    write_checkpoint(tmp_path / "bare" / "weights", {"x": np.ones(1, np.float32)})
    assert read_config(tmp_path / "bare") is None


# ----------------------------------------------------------------------------------------------
# the mapping, on forged checkpoints

def test_v1_layout_maps_and_transposes():
    vars_ = fake_official(n_blocks=2, dff=16, d=8, optimizer=True, classifier=True)
    sd = official_state_dict({k: v for k, v in vars_.items()}, n_blocks=2, dff=16, d_model=8,
                             use_leak=False, use_token=False)
    want = expected_torch_shapes(n_blocks=2, dff=16, d=8, leak=False, token=False)
    assert {k: v.shape for k, v in sd.items()} == want
    e = "layer_with_weights-0/"
    np.testing.assert_array_equal(sd["blocks.1.attn.wo.weight"],
                                  vars_[f"{e}enc_layers/1/mha/dense/kernel{SUFFIX}"].T)
    ffn1 = vars_[f"{e}enc_layers/0/ffn/layer_with_weights-0/kernel{SUFFIX}"]
    np.testing.assert_array_equal(sd["blocks.0.ffn1.weight"], ffn1.T)
    np.testing.assert_array_equal(sd["blocks.0.ln2.bias"],
                                  vars_[f"{e}enc_layers/0/layernorm2/beta{SUFFIX}"])
    np.testing.assert_array_equal(sd["embedding.mag_proj.weight"],
                                  vars_[f"{e}inp_transform/kernel{SUFFIX}"].T)
    np.testing.assert_array_equal(sd["head.proj.weight"],
                                  vars_[f"layer_with_weights-1/reg_layer/kernel{SUFFIX}"].T)
    # classifier variables are reported, optimizer state and bookkeeping are not
    assert sd.extras == sorted(["layer_with_weights-10/kernel" + SUFFIX,
                                "layer_with_weights-9/gamma" + SUFFIX])


def test_v2_pretraining_layout_maps_token_and_leaks():
    vars_ = fake_official(n_blocks=3, dff=16, d=8, leak=True, token=True)
    kw = dict(n_blocks=3, dff=16, d_model=8, use_leak=True, use_token=True)
    names = official_name_map(vars_, **kw)
    assert names["embedding.mask_token"] == ("layer_with_weights-0/msk_token" + SUFFIX, False)
    assert names["blocks.2.leak2.weight"] == (
        "layer_with_weights-1/enc_layers/2/reshape_leak_2/kernel" + SUFFIX, True)
    assert names["head.norm.weight"][0] == "layer_with_weights-2/bn_0/gamma" + SUFFIX
    sd = official_state_dict(vars_, **kw)
    assert sd["embedding.mask_token"].shape == (1,)
    assert sd["embedding.mask_token"][0] == vars_["layer_with_weights-0/msk_token" + SUFFIX][0, 0]
    np.testing.assert_array_equal(
        sd["blocks.1.leak1.weight"],
        vars_["layer_with_weights-1/enc_layers/1/reshape_leak_1/kernel" + SUFFIX].T)
    assert infer_architecture(vars_) == dict(n_blocks=3, dff=16, d_model=8, use_leak=True,
                                             use_token=True, has_head=True)
    # given shapes only (an index), the mapping returns our shapes
    shapes = official_state_dict({k: v.shape for k, v in vars_.items()
                                  if v.dtype != object}, **kw)
    assert dict(shapes) == expected_torch_shapes(n_blocks=3, dff=16, d=8, leak=True, token=True)


def test_missing_variable_is_named(tmp_path):
    vars_ = fake_official()
    gone = "layer_with_weights-0/enc_layers/1/mha/wk/bias" + SUFFIX
    del vars_[gone]
    write_checkpoint(tmp_path / "w", vars_)
    with pytest.raises(CheckpointError) as err:
        official_name_map(read_index(tmp_path / "w"), n_blocks=2, dff=16, d_model=8,
                          use_leak=False, use_token=False)
    msg = str(err.value)
    assert "missing 1 variable(s)" in msg
    assert "blocks.1.attn.wk.bias <- layer_with_weights-0/enc_layers/1/mha/wk/bias" in msg
    assert "mis-shaped" not in msg


def test_misshaped_variable_is_named(tmp_path):
    vars_ = fake_official()
    name = "layer_with_weights-0/enc_layers/0/ffn/layer_with_weights-0/kernel" + SUFFIX
    vars_[name] = vars_[name].T.copy()  # [16, 8] where [8, 16] is expected
    write_checkpoint(tmp_path / "m" / "weights", vars_)
    z = zip_dir(tmp_path / "m", tmp_path / "m.zip")
    with pytest.raises(CheckpointError) as err:
        official_state_dict(read_checkpoint(z), n_blocks=2, dff=16, d_model=8,
                            use_leak=False, use_token=False)
    msg = str(err.value)
    assert msg.startswith(f"{z}!weights.index: does not match the official Astromer layout")
    assert "mis-shaped 1 variable(s)" in msg
    assert "blocks.0.ffn1.weight" in msg and "expected [8, 16], found [16, 8]" in msg
    assert "missing" not in msg


def test_wrong_architecture_lists_everything():
    vars_ = fake_official(n_blocks=3, dff=16, d=8)
    with pytest.raises(CheckpointError) as err:  # a 3-block checkpoint read as 2 blocks
        official_name_map(vars_, n_blocks=2, dff=16, d_model=8, use_leak=False, use_token=False)
    msg = str(err.value)
    assert "16 model variable(s) this architecture does not use: " \
           "layer_with_weights-0/enc_layers/2/* (16 variables)" in msg
    assert "n_blocks=3" in msg  # what the checkpoint looks like
    with pytest.raises(CheckpointError) as err:  # asking for leaks a v1 checkpoint lacks
        official_name_map(vars_, n_blocks=3, dff=16, d_model=8, use_leak=True, use_token=False)
    assert "missing 12 variable(s)" in str(err.value) and "reshape_leak_1" in str(err.value)
    vars_["layer_with_weights-0/enc_layers/1/extra/kernel" + SUFFIX] = np.ones((8, 8), np.float32)
    with pytest.raises(CheckpointError) as err:  # in a used block, names are listed one by one
        official_name_map(vars_, n_blocks=3, dff=16, d_model=8, use_leak=False, use_token=False)
    assert ("1 model variable(s) this architecture does not use: "
            "layer_with_weights-0/enc_layers/1/extra/kernel") in str(err.value)
    with pytest.raises(CheckpointError, match="does not use.*msk_token"):  # a token left unused
        official_name_map(fake_official(d=8, token=True, leak=True), n_blocks=2, dff=16,
                          d_model=8, use_leak=True, use_token=False)
    with pytest.raises(CheckpointError, match="no enc_layers"):
        official_name_map({"foo/kernel": (3, 3)}, n_blocks=2, dff=16, d_model=8,
                          use_leak=False, use_token=False)


def test_headless_checkpoint_needs_require_head_false():
    vars_ = fake_official(head=False, classifier=True)
    kw = dict(n_blocks=2, dff=16, d_model=8, use_leak=False, use_token=False)
    with pytest.raises(CheckpointError, match="no regression head.*require_head=False"):
        official_name_map(vars_, **kw)
    names = official_name_map(vars_, require_head=False, **kw)
    assert not any(k.startswith("head.") for k in names)
    assert sorted(names.absent) == ["head.norm.bias", "head.norm.weight", "head.proj.bias",
                                    "head.proj.weight"]


# ----------------------------------------------------------------------------------------------
# bad input

def _forged(tmp_path, name="ck") -> Path:
    prefix = tmp_path / name / "weights"
    write_checkpoint(prefix, {"a/kernel": np.arange(64, dtype=np.float32).reshape(8, 8),
                              "b/bias": np.ones(8, np.float32)})
    return prefix


def test_truncated_data_file(tmp_path):
    prefix = _forged(tmp_path)
    data = Path(str(prefix) + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(prefix)
    msg = str(err.value)
    assert "truncated data file" in msg and "'a/kernel'" in msg
    assert "needs bytes 0..256 but data file has 100 bytes" in msg
    assert str(data) in msg
    # the same inside a zip
    z = zip_dir(tmp_path / "ck", tmp_path / "t.zip")
    with pytest.raises(CheckpointError, match=r"t\.zip!weights\.data-00000-of-00001: truncated"):
        read_checkpoint(z)


def test_missing_data_file(tmp_path):
    prefix = _forged(tmp_path)
    Path(str(prefix) + ".data-00000-of-00001").unlink()
    assert set(read_index(prefix)) == {"a/kernel", "b/bias"}  # the index alone still reads
    with pytest.raises(CheckpointError, match="data-00000-of-00001: data file missing"):
        read_checkpoint(prefix)


def test_flipped_byte_fails_the_crc(tmp_path):
    prefix = _forged(tmp_path)
    data = Path(str(prefix) + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0x01  # inside a/kernel (bytes 0..256)
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(prefix)
    assert "crc32c mismatch for tensor 'a/kernel'" in str(err.value)
    assert "b/bias" in read_checkpoint(prefix, names=["b/bias"])  # the other one is intact
    unchecked = read_checkpoint(prefix, verify_crc=False)
    assert not np.array_equal(unchecked["a/kernel"], np.arange(64, dtype=np.float32).reshape(8, 8))


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "random.bin"
    junk.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"random\.bin: not a TensorFlow checkpoint index "
                                              r"\(bad table magic"):
        read_index(junk)
    text = tmp_path / "notes.txt"
    text.write_text("these are not the weights you are looking for\n" * 3)
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a TensorFlow checkpoint"):
        read_checkpoint(text)
    tiny = tmp_path / "tiny.index"
    tiny.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="shorter than the 48-byte table footer"):
        read_index(tiny)
    empty_zip = tmp_path / "empty.zip"
    zipfile.ZipFile(empty_zip, "w").close()
    with pytest.raises(CheckpointError, match=r"empty\.zip: not a checkpoint: the zip holds no "
                                              r"weights\.index"):
        read_checkpoint(empty_zip)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("macho/conf.json", "{}")
    with pytest.raises(CheckpointError, match="holds no weights.index"):
        read_index(other_zip)
    fake_zip = tmp_path / "fake.zip"
    fake_zip.write_bytes(b"PK but not really a zip")
    with pytest.raises(CheckpointError, match=r"fake\.zip: not a checkpoint: not a valid zip"):
        read_index(fake_zip)
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_index(tmp_path / "nothing_here")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_index(tmp_path / "does_not_exist")


def test_truncated_or_corrupted_index(tmp_path):
    prefix = _forged(tmp_path)
    index = Path(str(prefix) + ".index")
    good = index.read_bytes()
    index.write_bytes(good[: len(good) - 20])  # the footer is cut
    with pytest.raises(CheckpointError, match="bad table magic.*truncated"):
        read_index(prefix)
    index.write_bytes(good[40:])  # the head is cut: the footer points past the file
    with pytest.raises(CheckpointError, match="truncated index: the index block needs bytes"):
        read_index(prefix)
    bad = bytearray(good)
    bad[5] ^= 0xFF  # inside the data block
    index.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="crc32c mismatch in the data #0 block"):
        read_index(prefix)
    # a snappy-compressed block is refused by name (the type byte follows the block)
    assert struct.unpack("<Q", good[-8:])[0] == TABLE_MAGIC
    bad = bytearray(good)
    bad[_first_data_block_size(good)] = 1
    index.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="snappy-compressed; only uncompressed"):
        read_index(prefix)


def _first_data_block_size(index_bytes: bytes) -> int:
    """The size of the first data block, read off the index block named by the footer."""
    from astromer_fast.weights.tf_checkpoint import _block_entries, _read_block, _varint

    footer = index_bytes[-48:]
    pos = 0
    for _ in range(2):  # skip the metaindex handle
        _, pos = _varint(footer, pos, 40, "footer")
    off, pos = _varint(footer, pos, 40, "footer")
    size, pos = _varint(footer, pos, 40, "footer")
    (_, handle), = _block_entries(_read_block(index_bytes, off, size, "x", "index"), "x", "index")
    data_off, p = _varint(handle, 0, len(handle), "handle")
    data_size, _ = _varint(handle, p, len(handle), "handle")
    assert data_off == 0
    return data_size


def test_several_checkpoints_are_listed_and_one_can_be_chosen(tmp_path):
    root = tmp_path / "many"
    write_checkpoint(root / "a" / "weights", {"x": np.ones(2, np.float32)})
    write_checkpoint(root / "b" / "weights", {"x": np.zeros(2, np.float32)})
    z = zip_dir(root, tmp_path / "many.zip")
    for src in (root, z):
        with pytest.raises(CheckpointError, match=r"holds 2 checkpoints \(a/weights, b/weights\)"):
            read_checkpoint(src)
        np.testing.assert_array_equal(read_checkpoint(src, checkpoint="b")["x"], np.zeros(2))
        np.testing.assert_array_equal(read_checkpoint(src, checkpoint="a/weights")["x"], np.ones(2))
        with pytest.raises(CheckpointError, match="checkpoint 'c' not found; it holds a/weights"):
            read_index(src, checkpoint="c")


# ----------------------------------------------------------------------------------------------
# the released weights

def test_read_v1_release_zip(v1_zip):
    t0 = time.perf_counter()
    variables = read_checkpoint(v1_zip)  # every numeric tensor, crc verified
    elapsed = time.perf_counter() - t0
    print(f"read {v1_zip.name}: {len(variables)} tensors in {elapsed * 1000:.1f} ms")
    index = read_index(v1_zip)
    assert set(variables) == {n for n, i in index.items() if i.dtype != "string"}
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in index and len(variables) == 38
    assert sum(a.size for a in variables.values()) == V1_PARAMS
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in variables.values())

    assert infer_architecture(index) == dict(n_blocks=2, dff=128, d_model=256, use_leak=False,
                                             use_token=False, has_head=True)
    sd = official_state_dict(variables, n_blocks=2, d_model=256, dff=128, use_leak=False,
                             use_token=False)
    assert {k: v.shape for k, v in sd.items()} == expected_torch_shapes(
        n_blocks=2, dff=128, leak=False, token=False)
    assert sum(v.size for v in sd.values()) == V1_PARAMS
    assert sd.extras == [] and sd.absent == []
    np.testing.assert_array_equal(
        sd["blocks.0.attn.wq.weight"],
        variables["layer_with_weights-0/enc_layers/0/mha/wq/kernel" + SUFFIX].T)
    # the same names and shapes from the index alone
    shapes = official_state_dict(index, n_blocks=2, d_model=256, dff=128, use_leak=False,
                                 use_token=False)
    assert dict(shapes) == {k: v.shape for k, v in sd.items()}

    conf = read_config(v1_zip)
    assert conf["layers"] == 2 and conf["dff"] == 128 and conf["heads"] == 4


def test_v1_extracted_folder_reads_the_same(v1_zip, tmp_path):
    with zipfile.ZipFile(v1_zip) as zf:
        zf.extractall(tmp_path)
    ref = read_checkpoint(v1_zip)
    for src in (tmp_path, tmp_path / "macho", tmp_path / "macho" / "weights",
                tmp_path / "macho" / "weights.index"):
        got = read_checkpoint(src)
        assert list(got) == list(ref)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])
        assert read_config(src) == read_config(v1_zip)


def test_v1_rewritten_with_our_writer_is_byte_identical(v1_zip, tmp_path):
    index = read_index(v1_zip)
    everything = read_checkpoint(v1_zip, names=list(index))  # object graph (a string) included
    order = [i.name for i in sorted(index.values(), key=lambda i: i.offset)]
    write_checkpoint(tmp_path / "weights", everything, order=order)
    assert read_index(tmp_path / "weights") == index
    with zipfile.ZipFile(v1_zip) as zf:
        assert (tmp_path / "weights.index").read_bytes() == zf.read("macho/weights.index")
        assert ((tmp_path / "weights.data-00000-of-00001").read_bytes()
                == zf.read("macho/weights.data-00000-of-00001"))
    # in name order (the default) the offsets differ but every array reads back identically
    write_checkpoint(tmp_path / "sorted" / "weights", everything)
    again = read_checkpoint(tmp_path / "sorted")
    for k, v in read_checkpoint(v1_zip).items():
        np.testing.assert_array_equal(again[k], v)


def test_v2_index_maps_completely(v2_index):
    index = read_index(v2_index)
    arch = infer_architecture(index)
    assert arch == dict(n_blocks=6, dff=512, d_model=256, use_leak=True, use_token=False,
                        has_head=False)
    kw = dict(n_blocks=6, d_model=256, dff=512, use_leak=True, use_token=True)
    # A classifier checkpoint: no regression head, and no MASK token (the classifier bypasses it).
    with pytest.raises(CheckpointError) as err:
        official_name_map(index, **kw)
    msg = str(err.value)
    assert "missing 5 variable(s)" in msg and "require_head=False" in msg
    assert "no MASK token" in msg and "mis-shaped" not in msg

    names = official_name_map(index, require_head=False, require_token=False, **kw)
    assert names["embedding.mag_proj.weight"] == ("layer_with_weights-0/kernel" + SUFFIX, True)
    assert names["blocks.5.leak2.bias"] == (
        "layer_with_weights-1/enc_layers/5/reshape_leak_2/bias" + SUFFIX, False)
    assert sorted(names.absent) == ["embedding.mask_token", "head.norm.bias", "head.norm.weight",
                                    "head.proj.bias", "head.proj.weight"]
    assert len(names.extras) == 11 and all("optimizer" not in e for e in names.extras)
    assert "layer_with_weights-2/gamma" + SUFFIX in names.extras  # the 7 layer weights

    shapes = official_state_dict(index, require_head=False, require_token=False, **kw)
    want = expected_torch_shapes(n_blocks=6, dff=512, leak=True, token=True, head=False)
    assert dict(shapes) == want
    encoder = sum(int(np.prod(s)) for k, s in want.items() if k != "embedding.mask_token")
    assert encoder == 3_952_640  # SPEC section 3: the Astromer 2 encoder
    with pytest.raises(CheckpointError, match="data file missing"):
        read_checkpoint(v2_index)
