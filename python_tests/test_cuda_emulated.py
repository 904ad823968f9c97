"""The CUDA kernels of input_embedding, weighted_rmse and the scalar masked attention, run on the CPU.

Each csrc/cuda/<name>_kernels.cuh is compiled with g++ against
python_tests/cuda_emulation/emu_cuda.h (CUDA threads as fibers, interleaved at random at every
barrier; shared memory NaN-filled and guarded; fast-math intrinsics refused at compile time) by a
small driver in python_tests/cuda_emulation that launches the kernels with the geometry of the
.cu host code, loaded with ctypes, and compared with the float64 oracles, cases and tolerances
of test_kernels_<name>.py (imported, not copied). Every output is NaN before the launch, so an
element that a kernel fails to write shows up.

What this shows: indexing, tails, masking, grid-stride loops, synchronisation (a missing barrier
gives wrong or seed-dependent results here) and the float32 numerics of the source. What it does
not: speed, the real hardware, and the last bits of libm functions and FMA contraction (see
emu_cuda.h), which is why results are compared with tolerances and bitwise only among runs of
the emulation itself. See test_attention_tensor_cores.py for the same approach with the
tensor-core kernels.
"""

import ctypes
import math
import os
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import test_kernels_input_embedding as ie
import test_kernels_masked_attention as ma
import test_kernels_weighted_rmse as wr
from test_attention_tensor_cores import from_bf16_bits, to_bf16_bits

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EMU_DIR = HERE / "cuda_emulation"
DRIVERS = ("weighted_rmse", "attention", "input_embedding")
KERNEL_HEADERS = {"weighted_rmse": "weighted_rmse_kernels.cuh",
                  "attention": "masked_attention_kernels.cuh",
                  "input_embedding": "input_embedding_kernels.cuh"}
H100_SMS = 132


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def build_driver(out_dir: Path, name: str, header_dir: Path = None, defines=()) -> Path:
    """Compiles cuda_emulation/<name>_driver.cpp into a shared library; warnings fail the test.
    header_dir, when given, holds a cuda/<kernels header> that replaces the real one."""
    lib = out_dir / f"{name}_emu.so"
    includes = ([f"-I{header_dir}"] if header_dir else []) + [f"-I{REPO / 'csrc'}", f"-I{EMU_DIR}"]
    cmd = [_compiler(), "-O2", "-std=c++20", "-pthread", "-fPIC", "-shared",
           "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
           *[f"-D{d}" for d in defines], *includes,
           str(EMU_DIR / f"{name}_driver.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    return lib


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    if _compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    out = tmp_path_factory.mktemp("cuda_emu")
    with ThreadPoolExecutor(len(DRIVERS)) as pool:  # the compilers run in parallel
        paths = dict(zip(DRIVERS, pool.map(lambda n: build_driver(out, n), DRIVERS)))
    return {name: load(path, name) for name, path in paths.items()}


def load(path: Path, name: str):
    """The driver library with its functions' ctypes signatures."""
    P, I, LL, F, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_double
    lib = ctypes.CDLL(str(path))
    sigs = {
        ("weighted_rmse", "wrmse_emu_forward"): [P, I, P, P, P, P, LL, LL, P, P, P, P, I],
        ("attention", "attn_emu_forward"): [I, P, P, P, P, I, I, I, I, F, P, P],
        ("attention", "attn_emu_backward"): [I, P, P, P, P, I, I, I, I, F, P, P, P, P, P, P, P],
        ("input_embedding", "embed_emu_forward"): [P, P, P, P, P, P, D, LL, I, P, I],
    }
    for (driver, fn), args in sigs.items():
        if driver == name:
            f = getattr(lib, fn)
            f.restype, f.argtypes = ctypes.c_char_p, args
    return lib


def _ptr(a):
    return None if a is None else a.ctypes.data


def _np(x, dtype):
    return None if x is None else np.ascontiguousarray(x.detach().cpu().numpy().astype(dtype))


def _check(err):
    assert err is None, err.decode()


# ------------------------------------------------------------------------------------------------
# Weighted RMSE (csrc/cuda/weighted_rmse_kernels.cuh): loss, scale and dir; grad = dir * scale
# ------------------------------------------------------------------------------------------------
def wrmse_emulated(libs, pred, target, err, probed, valid, sms=H100_SMS):
    """(loss, scale, dir) as torch float32, every output (and the workspace) NaN beforehand."""
    L = pred.shape[-1]
    rows = pred.numel() // L if L else int(np.prod(pred.shape[:-1]))
    bf16 = pred.dtype == torch.bfloat16
    p = to_bf16_bits(pred.float().numpy()) if bf16 else _np(pred, np.float32)
    t, e = _np(target, np.float32), _np(err, np.float32)
    pr, va = _np(probed, np.uint8), _np(valid, np.uint8)
    work = np.full(2 * max(rows, 1), np.nan, np.float32)
    loss, scale = np.full(1, np.nan, np.float32), np.full(1, np.nan, np.float32)
    dir_ = np.full(pred.shape, np.nan, np.float32)
    _check(libs["weighted_rmse"].wrmse_emu_forward(
        _ptr(p), int(bf16), _ptr(t), _ptr(e), _ptr(pr), _ptr(va), rows, L, _ptr(work),
        _ptr(loss), _ptr(scale), _ptr(dir_), sms))
    return torch.from_numpy(loss)[0], torch.from_numpy(scale)[0], torch.from_numpy(dir_)


def _wrmse_cases():
    shapes = wr.SHAPES + [(2, 3, 50), (3, 1030), (300, 37)]
    return [(s, c) for s in shapes for c in wr.CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,case", _wrmse_cases(), ids=lambda x: "x".join(map(str, x))
                         if isinstance(x, tuple) else x)
def test_weighted_rmse_matches_float64(libs, shape, case, dtype):
    """Every shape and case of test_kernels_weighted_rmse.py (padding, a window without probed
    observations, constant / zero / negative errors, err None, valid None, nothing probed) plus
    batch dims, a long window and more windows than one grid pass. A 1-SM launch geometry for the
    larger cases, so that the windows kernel's grid-stride loop takes several turns."""
    pred, target, err, probed, valid = wr.make_inputs(shape, case, seed=zlib.crc32(f"{shape}{case}".encode()) % 1000)
    pred = pred.to(dtype)
    sms = 1 if shape[0] >= 6 else H100_SMS
    loss, scale, dir_ = wrmse_emulated(libs, pred, target, err, probed, valid, sms=sms)
    assert torch.isfinite(loss) and torch.isfinite(scale), "loss/scale unwritten or NaN"
    assert torch.isfinite(dir_).all(), "dir unwritten or NaN"
    assert (dir_[~probed] == 0).all(), "dir must be 0 at unprobed observations"
    # The custom op's backward is the elementwise dir * (upstream * scale) (no CUDA kernel).
    wr.assert_matches_oracle(loss, dir_ * scale, (pred, target, err, probed, valid),
                             what=f"{shape} {case} {dtype}")
    if case == "all_unprobed":
        assert float(loss) == 0.0 and float(scale) == 0.0 and torch.count_nonzero(dir_) == 0


@pytest.mark.parametrize("shape", [(0, 7), (4, 0)])
def test_weighted_rmse_empty(libs, shape):
    pred, target = torch.zeros(shape), torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    loss, scale, _ = wrmse_emulated(libs, pred, target, torch.ones(shape), mask, mask)
    assert float(loss) == 0.0 and float(scale) == 0.0


def test_weighted_rmse_is_bitwise_deterministic(libs, monkeypatch):
    """No atomics, fixed reduction orders: the same bits whatever the interleaving of the threads
    (EMU_SEED) and whatever the launch geometry (GPU size), fp32 and bf16 pred."""
    for dtype in (torch.float32, torch.bfloat16):
        pred, target, err, probed, valid = wr.make_inputs((64, 200), "mixed", seed=2)
        pred = pred.to(dtype)
        monkeypatch.delenv("EMU_SEED", raising=False)
        ref = wrmse_emulated(libs, pred, target, err, probed, valid)
        for seed, sms in [(7, H100_SMS), (123, 1), (99991, 3)]:
            monkeypatch.setenv("EMU_SEED", str(seed))
            got = wrmse_emulated(libs, pred, target, err, probed, valid, sms=sms)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (dtype, seed, sms)


# ------------------------------------------------------------------------------------------------
# Scalar masked attention (csrc/cuda/masked_attention_kernels.cuh): out, lse, dq, dk, dv
# ------------------------------------------------------------------------------------------------
ATTN_LENGTHS = [1, 7, 16, 33, 200, 256]


class AttnArrays:
    """q, k, v, do (float32 values exactly representable in dtype) as the kernels' host arrays."""

    def __init__(self, q, k, v, do, dtype):
        self.bf16 = dtype == torch.bfloat16
        conv = (lambda x: to_bf16_bits(x.numpy())) if self.bf16 else (lambda x: _np(x, np.float32))
        self.q, self.k, self.v, self.do = (conv(x) for x in (q, k, v, do))

    def empty(self):
        return np.full(self.q.shape, 0x7FC0, np.uint16) if self.bf16 else \
            np.full(self.q.shape, np.nan, np.float32)

    def to_torch(self, a):
        return from_bf16_bits(a) if self.bf16 else torch.from_numpy(a)


def attn_emulated(libs, arrs, kh, rule, backward=True):
    B, Hh, L, hd = arrs.q.shape
    khn = _np(kh, np.uint8)
    rule_id = ma.RULES.index(rule)
    scale = 1.0 / math.sqrt(hd)
    lib = libs["attention"]
    out, lse = arrs.empty(), np.full((B, Hh, L), np.nan, np.float32)
    _check(lib.attn_emu_forward(int(arrs.bf16), _ptr(arrs.q), _ptr(arrs.k), _ptr(arrs.v),
                                _ptr(khn), B, Hh, L, rule_id, scale, _ptr(out), _ptr(lse)))
    res = [arrs.to_torch(out), torch.from_numpy(lse)]
    if backward:
        dq, dk, dv = arrs.empty(), arrs.empty(), arrs.empty()
        delta = np.full((B, Hh, L), np.nan, np.float32)
        _check(lib.attn_emu_backward(int(arrs.bf16), _ptr(arrs.q), _ptr(arrs.k), _ptr(arrs.v),
                                     _ptr(khn), B, Hh, L, rule_id, scale, _ptr(out), _ptr(lse),
                                     _ptr(arrs.do), _ptr(delta), _ptr(dq), _ptr(dk), _ptr(dv)))
        res += [arrs.to_torch(x) for x in (dq, dk, dv)]
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", ma.RULES)
@pytest.mark.parametrize("L", ATTN_LENGTHS)
def test_attention_matches_float64(libs, L, rule, dtype):
    """Forward (out, lse) and backward (dq, dk, dv) at B = 1 and B = 3 (the last window of 3 has
    every key hidden), against the float64 oracle at the dtype-exact inputs, with the GPU
    tolerances of test_kernels_masked_attention.py (GPU_TOL)."""
    tol = ma.GPU_TOL[dtype]
    for B in (1, 3):
        q, k, v, kh, do = ma.gpu_case(B, L, dtype, seed=L + B)
        out, lse, *g = attn_emulated(libs, AttnArrays(q, k, v, do, dtype), kh, rule)
        want, want_lse = ma.oracle(q, k, v, kh, rule)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), (B, "unwritten or NaN")
        e_out = ma.rel_err(out, want)
        e_lse = (lse.double() - want_lse).abs().max().item()
        assert e_out < tol["out"] and e_lse < tol["lse"], (B, e_out, e_lse)
        want_g = ma.grads(lambda *x: ma.oracle(*x, kh, rule), q, k, v, do)
        for name, a, b in zip("qkv", g, want_g):
            assert torch.isfinite(a).all(), (B, name, "unwritten or NaN")
            assert ma.grad_err(a, b) < tol["grad"], (B, name, ma.grad_err(a, b))


def test_attention_all_hidden_window_is_the_uniform_average(libs):
    q, k, v, _, do = ma.gpu_case(2, 200, torch.float32, seed=5)
    kh = torch.zeros(2, 200, dtype=torch.bool)
    kh[1] = True
    out, lse = attn_emulated(libs, AttnArrays(q, k, v, do, torch.float32), kh, "key",
                             backward=False)
    mean = v[1].mean(-2, keepdim=True).expand(ma.H, 200, ma.HD)
    torch.testing.assert_close(out[1], mean, rtol=0, atol=2e-6)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_is_bitwise_independent_of_interleaving(libs, dtype, monkeypatch):
    q, k, v, kh, do = ma.gpu_case(3, 33, dtype, seed=9)
    arrs = AttnArrays(q, k, v, do, dtype)
    monkeypatch.delenv("EMU_SEED", raising=False)
    ref = attn_emulated(libs, arrs, kh, "query_or_key_plus1")
    for seed in (5, 77):
        monkeypatch.setenv("EMU_SEED", str(seed))
        got = attn_emulated(libs, arrs, kh, "query_or_key_plus1")
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), seed


# ------------------------------------------------------------------------------------------------
# Input embedding (csrc/cuda/input_embedding_kernels.cuh)
# ------------------------------------------------------------------------------------------------
def embed_emulated(libs, t, m, hidden, w, b, token, base=10000.0, sms=H100_SMS):
    rows, dim = t.numel(), w.numel()
    out = np.full((rows, dim), np.nan, np.float32)
    arrs = [_np(t.reshape(-1), np.float32), _np(m.reshape(-1), np.float32),
            _np(None if hidden is None else hidden.reshape(-1), np.uint8),
            _np(w, np.float32), _np(b, np.float32), _np(token, np.float32)]
    _check(libs["input_embedding"].embed_emu_forward(*(_ptr(a) for a in arrs), base, rows, dim,
                                                     _ptr(out), sms))
    return torch.from_numpy(out).reshape(*t.shape, dim)


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no_token"])
@pytest.mark.parametrize("shape,dim,sms", [
    *[(s, ie.D, H100_SMS) for s in ie.SHAPES],
    ((64, 200), ie.D, 1),    # more pairs than one grid pass: the grid-stride loop turns
    ((3, 7), 250, H100_SMS),  # 125 pairs per row: rows straddle blocks at odd offsets
    ((5,), 6, H100_SMS),     # dim far below the block size
    ((2, 3), 2 * 1000 + 2, 1),  # omega table longer than the block (several loads per thread)
])
def test_input_embedding_matches_float64(libs, shape, dim, sms, with_token):
    t, m, hidden, w, b, token = ie.make_inputs(shape, dim=dim, with_token=with_token)
    out = embed_emulated(libs, t, m, hidden, w, b, token, sms=sms)
    assert torch.isfinite(out).all(), "unwritten or NaN"
    assert ie.max_err(out, t, m, hidden, w, b, token) < ie.TOL


def test_input_embedding_large_times_need_the_double_reduction(libs):
    """|t| up to 1e5 days (angles to 1e5 rad, where a float32 angle is off by ~4e-3 rad): the
    double argument reduction keeps the result at the float64 oracle within TOL. Also t = 0,
    exact multiples of the quadrant boundaries, and a hidden row without token."""
    g = torch.Generator().manual_seed(3)
    t = (torch.rand(4, 50, generator=g, dtype=torch.float64) * 2e5 - 1e5).float()
    t[0, :4] = torch.tensor([0.0, 1e5, -1e5, float(math.pi / 2)])
    _, m, hidden, w, b, token = ie.make_inputs((4, 50), seed=3)
    out = embed_emulated(libs, t, m, hidden, w, b, token)
    assert torch.isfinite(out).all()
    assert ie.max_err(out, t, m, hidden, w, b, token) < ie.TOL
    # hidden without a token is ignored, as on every backend
    a = embed_emulated(libs, t, m, hidden, w, b, None)
    c = embed_emulated(libs, t, m, None, w, b, None)
    assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# The emulation itself
# ------------------------------------------------------------------------------------------------
def test_fast_math_intrinsics_do_not_compile(libs, tmp_path):
    """glibc declares functions named __expf, __sinf, ... (its exact versions): a kernel calling
    the CUDA fast-math intrinsic would silently get another function. emu_cuda.h makes it an
    error."""
    src = tmp_path / "uses_sinf.cpp"
    src.write_text('#include "emu_cuda.h"\n__device__ float f(float x) { return __sinf(x); }\n')
    proc = subprocess.run([_compiler(), "-std=c++20", "-fsyntax-only", f"-I{EMU_DIR}", str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cannot_reproduce" in proc.stderr, proc.stderr


# Deleting a barrier must make the emulated kernel wrong for some interleaving. (The text before
# the barrier locates it uniquely in the kernel header.)
_MUTATIONS = {
    "attention fwd: next K/V tile overwrites the one still being read": (
        "attention",
        "  for (int j0 = 0; j0 < L; j0 += kTile) {\n",
        "    __syncthreads();  // the previous tile is no longer read (and sQ is loaded)\n"),
    "weighted_rmse reduce: tree step reads a partial not yet written": (
        "weighted_rmse",
        "      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + s];\n    }\n",
        "    __syncthreads();\n"),
}


@pytest.mark.parametrize("mutation", sorted(_MUTATIONS))
def test_emulation_catches_a_missing_barrier(libs, tmp_path, mutation, monkeypatch):
    driver, before, sync = _MUTATIONS[mutation]
    header = REPO / "csrc" / "cuda" / KERNEL_HEADERS[driver]
    src = header.read_text()
    assert src.count(before + sync) == 1, "mutation site not found: update the test"
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / header.name).write_text(src.replace(before + sync, before))
    bad = load(build_driver(tmp_path, driver, header_dir=tmp_path), driver)
    wrong = False
    if driver == "attention":
        q, k, v, kh, do = ma.gpu_case(1, 200, torch.float32, seed=1)
        arrs = AttnArrays(q, k, v, do, torch.float32)
        good = attn_emulated(libs, arrs, kh, "key", backward=False)
        for seed in range(3):
            monkeypatch.setenv("EMU_SEED", str(seed))
            got = attn_emulated({"attention": bad}, arrs, kh, "key", backward=False)
            wrong |= not all(torch.equal(a, b) for a, b in zip(got, good))
    else:
        inputs = wr.make_inputs((300, 37), "mixed", seed=1)
        good = wrmse_emulated(libs, *inputs)
        for seed in range(3):
            monkeypatch.setenv("EMU_SEED", str(seed))
            got = wrmse_emulated({"weighted_rmse": bad}, *inputs)
            wrong |= not all(torch.equal(a, b) for a, b in zip(got, good))
    assert wrong, "the emulation did not notice the missing barrier"


def test_os_thread_model_gives_the_same_bits(libs, tmp_path):
    """The other thread model of emu_cuda.h (a std::thread per CUDA thread, OS scheduling, static
    shared arrays allocated under a lock): bit-identical to the fiber model."""
    os_lib = {"weighted_rmse": load(build_driver(tmp_path, "weighted_rmse",
                                                 defines=["EMU_OS_THREADS"]), "weighted_rmse")}
    inputs = wr.make_inputs((20, 37), "mixed", seed=6)
    a = wrmse_emulated(libs, *inputs, sms=1)
    b = wrmse_emulated(os_lib, *inputs, sms=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
