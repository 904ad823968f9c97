"""Tensor-core CUDA attention (csrc/cuda/masked_attention_tc.cuh), bf16, hd 64, L <= 256.

CPU part (always runs where g++ is available): the kernel header itself is compiled with g++
against python_tests/cuda_emulation/emu_cuda.h (CUDA threads as fibers that are interleaved at
random at every barrier; WMMA tiles held whole by every lane and stored by lane 0 only), loaded
with ctypes and compared with the float64 oracle of test_kernels_masked_attention.py at
bf16-rounded inputs, with the bf16 tolerances of its GPU tests (GPU_TOL). It checks indexing,
masking, tails, synchronisation and the numerics of the roundings (P and dS rounded to bf16 before
their products, bf16 outputs); it does not check speed or the real hardware.

GPU part (skipped without CUDA): the real kernels through the public op with
ASTROMER_FAST_CUDA_ATTENTION=tensor_cores against the same oracle, and against the scalar kernels.
"""

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from test_kernels_masked_attention import GPU_TOL, grad_err, grads, make_inputs, oracle, rel_err

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EMU_DIR = HERE / "cuda_emulation"
KERNEL_HEADER = REPO / "csrc" / "cuda" / "masked_attention_tc.cuh"
H, HD = 4, 64
TOL = GPU_TOL[torch.bfloat16]
RULES = ["key", "query_or_key_plus1"]
RULE_ID = {"key": 0, "query_or_key_plus1": 1}
LENGTHS = [1, 7, 16, 33, 200, 256]
HAS_CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------
# bf16 as uint16 bit patterns
# ------------------------------------------------------------------------------------------------
def to_bf16_bits(x) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((b.astype(np.uint32) << 16).view(np.float32))


def test_bf16_rounding_helper_matches_torch():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 100
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 0.0])  # ties
    got = from_bf16_bits(to_bf16_bits(x.numpy()))
    assert torch.equal(got, x.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------------
# Building and calling the emulated kernels
# ------------------------------------------------------------------------------------------------
def _compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def build_emulation(out_dir: Path, name: str, defines=(), header_dir: Path = None) -> Path:
    """Compiles tc_attention_driver.cpp (which includes the kernel header) into a shared library.
    header_dir, when given, holds a cuda/masked_attention_tc.cuh that replaces the real one."""
    lib = out_dir / f"{name}.so"
    includes = ([f"-I{header_dir}"] if header_dir else []) + [f"-I{REPO / 'csrc'}", f"-I{EMU_DIR}"]
    cmd = [_compiler(), "-O2", "-std=c++20", "-pthread", "-fPIC", "-shared",
           "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
           *[f"-D{d}" for d in defines], *includes,
           str(EMU_DIR / "tc_attention_driver.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    return lib


class Emulated:
    """ctypes wrapper of the driver: numpy in, torch (float32) out."""

    def __init__(self, path: Path):
        import ctypes

        c = ctypes
        self.lib = c.CDLL(str(path))
        P, I, F = c.c_void_p, c.c_int, c.c_float
        self.lib.tc_emu_forward.restype = c.c_char_p
        self.lib.tc_emu_forward.argtypes = [P, P, P, P, I, I, I, I, F, I, I, P, P]
        self.lib.tc_emu_backward.restype = c.c_char_p
        self.lib.tc_emu_backward.argtypes = [P, P, P, P, I, I, I, I, F, I, I, P, P, P, P, P, P, P]
        self.lib.tc_emu_smem_bytes.restype = None
        self.lib.tc_emu_smem_bytes.argtypes = [I, c.POINTER(c.c_uint), c.POINTER(c.c_uint),
                                               c.POINTER(c.c_uint)]

    def smem_bytes(self, L):
        import ctypes

        vals = [ctypes.c_uint() for _ in range(3)]
        self.lib.tc_emu_smem_bytes(L, *[ctypes.byref(v) for v in vals])
        return dict(zip(("fwd", "dq", "dkdv"), (v.value for v in vals)))

    def forward(self, qb, kb, vb, kh, rule, nsplit=0, sms=132):
        """qb, kb, vb: bf16 bits (B, H, L, 64); kh: bool (B, L). Returns (out, lse) float32,
        both NaN-prefilled so that elements the kernel does not write stay NaN."""
        B, Hh, L, _ = qb.shape
        khn = np.ascontiguousarray(kh.numpy().astype(np.uint8))
        out = np.full(qb.shape, 0x7FC0, np.uint16)
        lse = np.full((B, Hh, L), np.nan, np.float32)
        err = self.lib.tc_emu_forward(qb.ctypes.data, kb.ctypes.data, vb.ctypes.data,
                                      khn.ctypes.data, B, Hh, L, RULE_ID[rule],
                                      1.0 / math.sqrt(HD), nsplit, sms, out.ctypes.data,
                                      lse.ctypes.data)
        assert err is None, err.decode()
        return from_bf16_bits(out), torch.from_numpy(lse), out

    def backward(self, qb, kb, vb, kh, rule, out_bits, lse, dob, nsplit=0, sms=132):
        B, Hh, L, _ = qb.shape
        khn = np.ascontiguousarray(kh.numpy().astype(np.uint8))
        lse = np.ascontiguousarray(lse.numpy())
        dq, dk, dv = (np.full(qb.shape, 0x7FC0, np.uint16) for _ in range(3))
        delta = np.full((B, Hh, L), np.nan, np.float32)
        err = self.lib.tc_emu_backward(qb.ctypes.data, kb.ctypes.data, vb.ctypes.data,
                                       khn.ctypes.data, B, Hh, L, RULE_ID[rule],
                                       1.0 / math.sqrt(HD), nsplit, sms, out_bits.ctypes.data,
                                       lse.ctypes.data, dob.ctypes.data, delta.ctypes.data,
                                       dq.ctypes.data, dk.ctypes.data, dv.ctypes.data)
        assert err is None, err.decode()
        return tuple(from_bf16_bits(x) for x in (dq, dk, dv))


needs_cxx = pytest.mark.skipif(_compiler() is None, reason="no C++ compiler (g++) to build the "
                                                           "CPU emulation of the CUDA kernels")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if _compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    return Emulated(build_emulation(tmp_path_factory.mktemp("tc_emu"), "tc_emu"))


def bf16_case(B, L, seed):
    """Inputs as bf16 bits plus their exact float32 values, do likewise, and key_hidden."""
    q, k, v, kh = make_inputs(B, L, seed=seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    bits = [to_bf16_bits(x.numpy()) for x in (q, k, v, do)]
    vals = [from_bf16_bits(b) for b in bits]
    return bits, vals, kh


# ------------------------------------------------------------------------------------------------
# CPU: the emulated kernels against the float64 oracle
# ------------------------------------------------------------------------------------------------
@needs_cxx
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("B", [1, 3])
def test_emulated_tc_kernels_match_float64(emu, B, L, rule):
    """Forward (out, lse) and backward (dq, dk, dv); the last of 3 windows has every key hidden.
    B = 1 runs the launch geometry of a large GPU (windows split over several CTAs), B = 3 that of
    a single-SM GPU (one CTA per window, each warp looping over several 16-row tiles)."""
    (qb, kb, vb, dob), (q, k, v, do), kh = bf16_case(B, L, seed=L + B)
    sms = 132 if B == 1 else 1
    out, lse, out_bits = emu.forward(qb, kb, vb, kh, rule, sms=sms)
    want, want_lse = oracle(q, k, v, kh, rule)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "unwritten or NaN"
    e_out = rel_err(out, want)
    e_lse = (lse.double() - want_lse).abs().max().item()
    assert e_out < TOL["out"] and e_lse < TOL["lse"], (e_out, e_lse)

    got = emu.backward(qb, kb, vb, kh, rule, out_bits, lse, dob, sms=sms)
    want_g = grads(lambda *x: oracle(*x, kh, rule), q, k, v, do)
    for name, a, b in zip("qkv", got, want_g):
        assert torch.isfinite(a).all(), (name, "unwritten or NaN")
        assert grad_err(a, b) < TOL["grad"], (name, grad_err(a, b))


@needs_cxx
def test_emulated_all_hidden_window_is_the_uniform_average(emu):
    (qb, kb, vb, _), (q, k, v, _), _ = bf16_case(2, 200, seed=4)
    kh = torch.zeros(2, 200, dtype=torch.bool)
    kh[1] = True
    out, lse, _ = emu.forward(qb, kb, vb, kh, "key")
    mean = v[1].double().mean(-2, keepdim=True).expand(H, 200, HD)
    assert (out[1].double() - mean).abs().max().item() < 2 ** -8 * mean.abs().max().item() + 1e-6
    assert torch.isfinite(lse).all()


@needs_cxx
@pytest.mark.parametrize("nsplit", [1, 2, 3])
def test_emulated_results_do_not_depend_on_split_or_interleaving(emu, nsplit, monkeypatch):
    """Correctly synchronised kernels give bit-identical results whatever the order in which the
    emulation interleaves the threads (EMU_SEED) and however the windows are split over CTAs."""
    (qb, kb, vb, dob), _, kh = bf16_case(3, 200, seed=9)
    ref = emu.forward(qb, kb, vb, kh, "key", nsplit=1)
    ref_g = emu.backward(qb, kb, vb, kh, "key", ref[2], ref[1], dob, nsplit=1)
    monkeypatch.setenv("EMU_SEED", str(1000 + nsplit))
    got = emu.forward(qb, kb, vb, kh, "key", nsplit=nsplit)
    got_g = emu.backward(qb, kb, vb, kh, "key", got[2], got[1], dob, nsplit=nsplit)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert all(torch.equal(a, b) for a, b in zip(got_g, ref_g))


@needs_cxx
def test_emulation_runs_the_same_with_os_threads(emu, tmp_path):
    """The other thread model of emu_cuda.h (one std::thread per CUDA thread, OS scheduling) on a
    small case: bit-identical to the fiber model."""
    lib = Emulated(build_emulation(tmp_path, "tc_emu_os", defines=["EMU_OS_THREADS"]))
    (qb, kb, vb, dob), _, kh = bf16_case(2, 33, seed=2)
    a = emu.forward(qb, kb, vb, kh, "query_or_key_plus1")
    b = lib.forward(qb, kb, vb, kh, "query_or_key_plus1")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ga = emu.backward(qb, kb, vb, kh, "query_or_key_plus1", a[2], a[1], dob)
    gb = lib.backward(qb, kb, vb, kh, "query_or_key_plus1", b[2], b[1], dob)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# The emulation must catch a missing warp barrier. Each mutation deletes one __syncwarp() of the
# kernel source (the text before it locates it uniquely); the mutated kernel must then give a
# wrong answer for at least one of a few interleavings.
_MUTATIONS = {
    "fwd: S stored, read by all lanes": (
        "    if (nt < ntiles) score_tiles<1>(buf, lds, sK, nt, qa);\n",
        "    __syncwarp();\n"),
    "dq: dS tile written, loaded as a fragment": (
        "          ds = pr * (chP[r * kChunkLd + c] - delta_r) * p.scale;\n        }\n"
        "        tDS[r * kTileLd + c] = __float2bfloat16_rn(ds);\n      }\n",
        "      __syncwarp();\n"),
}


@needs_cxx
@pytest.mark.parametrize("mutation", sorted(_MUTATIONS))
def test_emulation_catches_a_missing_syncwarp(emu, tmp_path, mutation, monkeypatch):
    before, sync = _MUTATIONS[mutation]
    src = KERNEL_HEADER.read_text()
    assert src.count(before + sync) == 1, "mutation site not found: update the test"
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "masked_attention_tc.cuh").write_text(src.replace(before + sync, before))
    bad = Emulated(build_emulation(tmp_path, "tc_emu_bad", header_dir=tmp_path))
    (qb, kb, vb, dob), _, kh = bf16_case(1, 33, seed=3)
    good = emu.forward(qb, kb, vb, kh, "key")
    good_g = emu.backward(qb, kb, vb, kh, "key", good[2], good[1], dob)
    wrong = False
    for seed in range(4):
        monkeypatch.setenv("EMU_SEED", str(seed))
        got = bad.forward(qb, kb, vb, kh, "key")
        got_g = bad.backward(qb, kb, vb, kh, "key", good[2], good[1], dob)
        wrong |= not (torch.equal(got[0], good[0]) and torch.equal(got[1], good[1]))
        wrong |= not all(torch.equal(a, b) for a, b in zip(got_g, good_g))
    assert wrong, "the emulation did not notice a missing __syncwarp"


@needs_cxx
def test_shared_memory_fits_two_ctas_per_sm_at_l200(emu):
    """Design budget on H100/H200 (228 KB of shared memory per SM, 227 KB per block, 1 KB
    reserved per block): two CTAs per SM at L = 200 for all three kernels; L = 256 fits one."""
    s200, s256 = emu.smem_bytes(200), emu.smem_bytes(256)
    assert all(2 * (b + 1024) <= 228 * 1024 for b in s200.values()), s200
    assert all(b <= 227 * 1024 for b in s256.values()), s256


# ------------------------------------------------------------------------------------------------
# The environment variable
# ------------------------------------------------------------------------------------------------
def test_cuda_attention_env_var(monkeypatch):
    from astromer_fast.kernels import masked_attention as _  # noqa: F401  (package re-export)
    import importlib

    ma = importlib.import_module("astromer_fast.kernels.masked_attention")
    monkeypatch.delenv("ASTROMER_FAST_CUDA_ATTENTION", raising=False)
    assert ma._cuda_attention_kernel() == "simt"
    for value in ("simt", "tensor_cores"):
        monkeypatch.setenv("ASTROMER_FAST_CUDA_ATTENTION", value)
        assert ma._cuda_attention_kernel() == value
    monkeypatch.setenv("ASTROMER_FAST_CUDA_ATTENTION", "tensorcores")
    with pytest.raises(ValueError, match="ASTROMER_FAST_CUDA_ATTENTION='tensorcores'"):
        ma._cuda_attention_kernel()


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels (run on an H100/H200; skipped here)
# ------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


def _runners():
    import importlib

    ma = importlib.import_module("astromer_fast.kernels.masked_attention")
    return ma._FWD["cuda"], ma._BWD["cuda"]


def _gpu_run(kind, qd, kd, vd, khd, dod, rule, monkeypatch):
    monkeypatch.setenv("ASTROMER_FAST_CUDA_ATTENTION", kind)
    fwd, bwd = _runners()
    B, _, L, _ = qd.shape
    out = torch.full_like(qd, float("nan"))
    lse = torch.full((B, H, L), float("nan"), device="cuda")
    fwd(qd, kd, vd, khd, rule, out, lse)
    dq, dk, dv = (torch.full_like(qd, float("nan")) for _ in range(3))
    bwd(dod, qd, kd, vd, out, lse, khd, rule, dq, dk, dv)
    torch.cuda.synchronize()
    return out, lse, (dq, dk, dv)


@needs_cuda
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("B,L", [(b, l) for l in LENGTHS for b in (1, 3)] + [(64, 200)])
def test_gpu_tc_kernels_match_float64(B, L, rule, monkeypatch):
    _, (q, k, v, do), kh = bf16_case(B, L, seed=L + B)
    want, want_lse = oracle(q, k, v, kh, rule)
    want_g = grads(lambda *x: oracle(*x, kh, rule), q, k, v, do)
    qd, kd, vd, dod = (x.to(device="cuda", dtype=torch.bfloat16) for x in (q, k, v, do))
    khd = kh.cuda().view(torch.uint8)
    out, lse, g = _gpu_run("tensor_cores", qd, kd, vd, khd, dod, rule, monkeypatch)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "unwritten or NaN"
    assert rel_err(out, want) < TOL["out"], rel_err(out, want)
    assert (lse.double().cpu() - want_lse).abs().max().item() < TOL["lse"]
    for name, a, b in zip("qkv", g, want_g):
        assert torch.isfinite(a).all(), (name, "unwritten or NaN")
        assert grad_err(a, b) < TOL["grad"], (name, grad_err(a, b))


@needs_cuda
@pytest.mark.parametrize("rule", RULES)
def test_gpu_tc_equals_simt_within_bf16_tolerance(rule, monkeypatch):
    _, (q, k, v, do), kh = bf16_case(64, 200, seed=1)
    qd, kd, vd, dod = (x.to(device="cuda", dtype=torch.bfloat16) for x in (q, k, v, do))
    khd = kh.cuda().view(torch.uint8)
    tc = _gpu_run("tensor_cores", qd, kd, vd, khd, dod, rule, monkeypatch)
    simt = _gpu_run("simt", qd, kd, vd, khd, dod, rule, monkeypatch)
    assert rel_err(tc[0], simt[0].float().cpu()) < TOL["out"]
    assert (tc[1] - simt[1]).abs().max().item() < TOL["lse"]
    for a, b in zip(tc[2], simt[2]):
        assert grad_err(a, b.float().cpu()) < TOL["grad"]
    # Different kernels round differently: bit-identical outputs would mean that the
    # tensor-core path silently fell back to the scalar one.
    assert not torch.equal(tc[0], simt[0]), "tensor_cores ran the scalar kernel"


@needs_cuda
def test_gpu_tc_public_op_autograd(monkeypatch):
    """Through masked_attention(backend="cuda") and autograd, with the variable set."""
    from astromer_fast.kernels import masked_attention

    monkeypatch.setenv("ASTROMER_FAST_CUDA_ATTENTION", "tensor_cores")
    _, (q, k, v, do), kh = bf16_case(4, 200, seed=3)
    kh[1] = True
    want, _ = oracle(q, k, v, kh, "key")
    want_g = grads(lambda *x: oracle(*x, kh, "key"), q, k, v, do)
    args = [x.to(device="cuda", dtype=torch.bfloat16) for x in (q, k, v)]
    khd, dod = kh.cuda(), do.to(device="cuda", dtype=torch.bfloat16)
    out = masked_attention(*args, khd, "key", backend="cuda")
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < TOL["out"]
    got_g = grads(lambda *x: masked_attention(*x, khd, "key", backend="cuda"), *args, dod)
    for name, a, b in zip("qkv", got_g, want_g):
        assert a.dtype == torch.bfloat16 and grad_err(a, b) < TOL["grad"], name
    monkeypatch.setenv("ASTROMER_FAST_CUDA_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="ASTROMER_FAST_CUDA_ATTENTION"):
        masked_attention(*args, khd, "key", backend="cuda")
