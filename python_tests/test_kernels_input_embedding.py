"""Tests of the fused input embedding (SPEC.md section 2) on every backend this machine can run.

Oracle: a float64 numpy evaluation of the formula at the same float32 inputs. Tolerances:
  * 1e-6 absolute for every backend. Values here stay below ~8 in magnitude, where one float32
    rounding of the output is already up to 2.4e-7, so 1e-6 leaves room for the ~1e-7 error of the
    fp32 polynomials in the CUDA/Triton kernels, and none for a float32 angle (off by ~1e-4 rad
    at |t| = 3000 days), which is the bug this guards against.
  * 1e-12 for the float64 path of the torch backend.
  * Gradients (plain-PyTorch backward, float32 sums over up to a few thousand terms): 1e-5 relative.
"""

import importlib
import importlib.util
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch

from astromer_fast.kernels import (
    BackendUnavailableError,
    available_backends,
    input_embedding,
    input_embedding_reference,
    resolve_backend,
)
from astromer_fast.kernels import _ext
from astromer_fast.kernels.input_embedding import _input_embedding_op

TOL = 1e-6
SHAPES = [(1, 1), (3, 7), (2, 200), (1, 256)]
D = 256

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU on this machine"
CPU_BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
CUDA_BACKENDS = available_backends("cuda") if HAS_CUDA else []


def oracle(t, m, hidden, w, b, token, base=10000.0):
    """float64 numpy evaluation of out[r, j] = PE_j(t[r]) + m'[r] w[j] + b[j]."""
    t = np.asarray(t, np.float64)
    dim = len(w)
    j = np.arange(dim)
    angle = t[..., None] * base ** (-2.0 * j / dim)
    pe = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    mp = np.asarray(m, np.float64)
    if token is not None and hidden is not None:
        mp = np.where(np.asarray(hidden), float(np.asarray(token).reshape(())), mp)
    return pe + mp[..., None] * np.asarray(w, np.float64) + np.asarray(b, np.float64)


def make_inputs(shape, dim=D, seed=0, device="cpu", with_token=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64) * 6000.0 - 3000.0
    flat = t.view(-1)
    flat[0] = 3000.0  # the ends of the +-3000 day span
    if flat.numel() > 1:
        flat[-1] = -3000.0
    t = t.float()
    m = torch.randn(shape, generator=g)
    hidden = torch.rand(shape, generator=g) < 0.35
    w = torch.randn(dim, generator=g) * 0.5
    b = torch.randn(dim, generator=g) * 0.1
    token = torch.tensor([0.37]) if with_token else None
    tensors = [t, m, hidden, w, b, token]
    return [None if x is None else x.to(device) for x in tensors]


def max_err(out, t, m, hidden, w, b, token):
    ref = oracle(*(None if x is None else x.detach().cpu().numpy() for x in (t, m, hidden, w, b, token)))
    return float(np.abs(out.detach().cpu().double().numpy() - ref).max())


# ------------------------------------------------------------------------------------------------
# Forward accuracy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no_token"])
def test_forward_cpu_matches_float64(backend, shape, with_token):
    t, m, hidden, w, b, token = make_inputs(shape, with_token=with_token)
    out = input_embedding(t, m, hidden, w, b, token, backend=backend)
    assert out.shape == (*shape, D) and out.dtype == torch.float32
    assert max_err(out, t, m, hidden, w, b, token) < TOL


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES + [(64, 200)])
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no_token"])
def test_forward_gpu_matches_float64(backend, shape, with_token):
    if backend not in CUDA_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable on CUDA here")
    t, m, hidden, w, b, token = make_inputs(shape, device="cuda", with_token=with_token)
    out = input_embedding(t, m, hidden, w, b, token, backend=backend)
    assert out.device.type == "cuda" and out.shape == (*shape, D)
    assert max_err(out, t, m, hidden, w, b, token) < TOL


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "torch"] or ["cuda", "triton"])
def test_gpu_kernels_write_every_output(backend):
    """The raw runners into a NaN-poisoned output: every element written, L 1/7/200/256, batch 1
    and a batch larger than one grid pass."""
    import importlib

    ie = importlib.import_module("astromer_fast.kernels.input_embedding")
    if backend not in CUDA_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable on CUDA here")
    for shape in [(1, 1), (1, 7), (3, 200), (2, 256), (4096, 200)]:
        t, m, hidden, w, b, token = make_inputs(shape, device="cuda")
        out = torch.full((*shape, D), float("nan"), device="cuda")
        ie._RUNNERS[backend](t, m, hidden, w, b, token, 10000.0, out)
        assert torch.isfinite(out).all(), shape
        assert max_err(out, t, m, hidden, w, b, token) < TOL, shape


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_kernel_runs_on_the_current_stream():
    if "cuda" not in CUDA_BACKENDS:
        pytest.skip("astromer_fast._C_cuda not available")
    t, m, hidden, w, b, token = make_inputs((32, 200), device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = input_embedding(t, m, hidden, w, b, token, backend="cuda")
    s.synchronize()
    assert max_err(out, t, m, hidden, w, b, token) < TOL


def test_hidden_without_token_is_ignored():
    t, m, hidden, w, b, _ = make_inputs((3, 7))
    a = input_embedding(t, m, hidden, w, b, None)
    c = input_embedding(t, m, None, w, b, None)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_token_shapes_and_noncontiguous_inputs():
    t, m, hidden, w, b, token = make_inputs((7, 3))
    expected = oracle(*(x.numpy() for x in (t, m, hidden, w, b, token)))
    # Transposed views (non-contiguous) and a 0-d token.
    tt, mt, ht = t.t().contiguous().t(), m.t().contiguous().t(), hidden.t().contiguous().t()
    assert not tt.is_contiguous()
    for backend in CPU_BACKENDS:
        out = input_embedding(tt, mt, ht, w, b, token.reshape(()), backend=backend)
        assert np.abs(out.double().numpy() - expected).max() < TOL


def test_batch_dims_and_empty():
    t, m, hidden, w, b, token = make_inputs((2, 3, 5))
    for backend in CPU_BACKENDS:
        out = input_embedding(t, m, hidden, w, b, token, backend=backend)
        assert out.shape == (2, 3, 5, D)
        assert max_err(out, t, m, hidden, w, b, token) < TOL
        empty = input_embedding(t[:0], m[:0], hidden[:0], w, b, token, backend=backend)
        assert empty.shape == (0, 3, 5, D)


def test_base_is_a_parameter():
    t, m, hidden, w, b, token = make_inputs((2, 50), dim=64)
    for backend in CPU_BACKENDS:
        out = input_embedding(t, m, hidden, w, b, token, base=1000.0, backend=backend)
        ref = oracle(*(x.numpy() for x in (t, m, hidden, w, b, token)), base=1000.0)
        assert np.abs(out.double().numpy() - ref).max() < TOL


def test_cpu_threads_agree_bitwise():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    t, m, hidden, w, b, token = make_inputs((64, 200))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = input_embedding(t, m, hidden, w, b, token, backend="cpu")
        torch.set_num_threads(max(2, old))
        many = input_embedding(t, m, hidden, w, b, token, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_float64_defaults_to_torch_and_stays_float64():
    t, m, hidden, w, b, token = (x.double() if x.is_floating_point() else x for x in make_inputs((3, 7)))
    out = input_embedding(t, m, hidden, w, b, token)
    assert out.dtype == torch.float64
    assert max_err(out, t, m, hidden, w, b, token) < 1e-12
    if "cpu" in CPU_BACKENDS:  # forced float32 kernel: cast in, cast back
        out32 = input_embedding(t.float().double(), m.float().double(), hidden, w.float().double(),
                                b.float().double(), token.float().double(), backend="cpu")
        assert out32.dtype == torch.float64
        assert max_err(out32, t.float(), m.float(), hidden, w.float(), b.float(), token.float()) < TOL


def test_odd_dim_only_on_torch_backend():
    t, m, hidden, w, b, token = make_inputs((2, 5), dim=7)
    out = input_embedding(t, m, hidden, w, b, token, backend="torch")
    assert max_err(out, t, m, hidden, w, b, token) < TOL
    if "cpu" in CPU_BACKENDS:
        with pytest.raises(ValueError, match="even D"):
            input_embedding(t, m, hidden, w, b, token, backend="cpu")


def test_input_validation_messages():
    t, m, hidden, w, b, token = make_inputs((3, 7))
    with pytest.raises(ValueError, match="m has shape"):
        input_embedding(t, m[:, :5], hidden, w, b, token)
    with pytest.raises(TypeError, match="hidden must be a torch.bool"):
        input_embedding(t, m, hidden.float(), w, b, token)
    with pytest.raises(ValueError, match="w and b"):
        input_embedding(t, m, hidden, w, b[:10], token)
    with pytest.raises(ValueError, match="token must have shape"):
        input_embedding(t, m, hidden, w, b, torch.zeros(2))
    with pytest.raises(TypeError, match="floating-point"):
        input_embedding(t.long(), m, hidden, w, b, token)


# ------------------------------------------------------------------------------------------------
# Custom op: opcheck, autograd, torch.compile
# ------------------------------------------------------------------------------------------------
def _op_backends(device):
    return [b for b in available_backends(device) if b != "triton" or device == "cuda"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no_token"])
def test_opcheck(device, with_token):
    for backend in _op_backends(device):
        t, m, hidden, w, b, token = make_inputs((3, 7), dim=16, device=device, with_token=with_token)
        for x in (m, w, b, token):
            if x is not None:
                x.requires_grad_(True)
        torch.library.opcheck(_input_embedding_op, (t, m, hidden, w, b, token, 10000.0, backend))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_gradients_match_reference_autograd(device):
    for backend in available_backends(device):
        if backend == "triton" and device == "cpu":
            continue  # interpreter: covered by the subprocess test below
        for with_token in (True, False):
            t, m, hidden, w, b, token = make_inputs((4, 50), dim=32, device=device, with_token=with_token)
            grads = []
            for fn in (lambda *a: input_embedding(*a, backend=backend), input_embedding_reference):
                leaves = [x.clone().requires_grad_(True) if x is not None and x.is_floating_point() else x
                          for x in (t, m, hidden, w, b, token)]
                # Non-uniform upstream gradient so that every term of the sums matters.
                up = torch.linspace(-1, 1, 4 * 50 * 32, device=device).reshape(4, 50, 32)
                (fn(*leaves) * up).sum().backward()
                grads.append([None if x is None or not x.is_floating_point() else x.grad
                              for x in leaves])
            for name, g_op, g_ref in zip("t m hidden w b token".split(), *grads):
                if g_ref is None:
                    assert g_op is None, name
                    continue
                torch.testing.assert_close(g_op, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()) + 1e-7,
                                           msg=f"grad of {name} ({backend}, token={with_token})")


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    t, m, hidden, w, b, token = make_inputs((2, 200), dim=64)
    w.requires_grad_(True)

    def f(t, m, hidden, w, b, token):
        return torch.tanh(input_embedding(t, m, hidden, w, b, token)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(t, m, hidden, w, b, token)
    (g_compiled,) = torch.autograd.grad(got, w)
    want = f(t, m, hidden, w, b, token)
    (g_eager,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, g_eager)


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    t, m, hidden, w, b, token = make_inputs((2, 200), dim=64)

    @torch.compile(fullgraph=True)
    def f(t, m, hidden, w, b, token):
        return input_embedding(t, m, hidden, w, b, token) * 2.0

    torch.testing.assert_close(f(t, m, hidden, w, b, token), 2.0 * input_embedding(t, m, hidden, w, b, token))


# ------------------------------------------------------------------------------------------------
# Triton under the interpreter (a subprocess: TRITON_INTERPRET must be set before triton.jit runs)
# ------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from test_kernels_input_embedding import SHAPES, make_inputs, max_err
    from astromer_fast.kernels import available_backends, input_embedding
    assert "triton" in available_backends("cpu"), available_backends("cpu")
    errs = {}
    for shape in SHAPES + [(2, 5)]:
        for with_token in (True, False):
            dim = 6 if shape == (2, 5) else 256
            x = make_inputs(shape, dim=dim, with_token=with_token)
            out = input_embedding(*x, backend="triton")
            assert out.shape == (*shape, dim)
            errs[f"{shape}-{with_token}"] = max_err(out, *x)
    print(json.dumps(errs))
    """
)


def test_triton_backend_under_interpreter(run_triton_interpreted):
    errs = run_triton_interpreted(_TRITON_SCRIPT)
    assert errs and max(errs.values()) < TOL, errs


# ------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------
def test_available_and_default_backends(monkeypatch):
    monkeypatch.delenv("ASTROMER_FAST_BACKEND", raising=False)
    cpu = available_backends("cpu")
    assert "torch" in cpu and "cuda" not in cpu
    assert resolve_backend("cpu") == ("cpu" if _ext.cpu_ext() is not None else "torch")
    if HAS_CUDA:
        assert resolve_backend("cuda") == available_backends("cuda")[0]


def test_forcing_backends(monkeypatch):
    monkeypatch.delenv("ASTROMER_FAST_BACKEND", raising=False)
    assert resolve_backend("cpu", "torch") == "torch"
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown astromer_fast backend"):
        resolve_backend("cpu", "bogus")
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            resolve_backend("cpu", "triton")

    x = make_inputs((2, 5), dim=8)
    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    torch.testing.assert_close(input_embedding(*x), input_embedding_reference(*x), rtol=0, atol=0)

    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        input_embedding(*x)
    input_embedding(*x, backend="torch")  # an explicit argument wins over the environment

    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="ASTROMER_FAST_BACKEND"):
        input_embedding(*x)

    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "auto")
    assert resolve_backend("cpu") == available_backends("cpu")[0]


# ------------------------------------------------------------------------------------------------
# The compiled extensions
# ------------------------------------------------------------------------------------------------
def test_cpu_extension_is_built():
    ext = _ext.cpu_ext()
    assert ext is not None, f"astromer_fast._C failed to import: {_ext.cpu_ext_error()}"
    info = ext.build_info()
    assert info["compiler"] and info["build_type"]


def _cuda_build_expected() -> bool:
    flag = os.environ.get("ASTROMER_FAST_CUDA", "auto").strip().lower()
    return shutil.which("nvcc") is not None and flag not in ("0", "off", "false", "no")


@pytest.mark.skipif(not _cuda_build_expected(), reason="nvcc is not on PATH (or ASTROMER_FAST_CUDA=0)")
def test_cuda_extension_is_built_when_nvcc_is_present():
    spec = importlib.util.find_spec("astromer_fast._C_cuda")
    assert spec is not None, "nvcc is on PATH but astromer_fast._C_cuda was not built/installed"
    # Linked against the static CUDA runtime: importing needs no driver and no libcudart.so.
    mod = importlib.import_module("astromer_fast._C_cuda")
    info = mod.build_info()
    assert info["cuda_archs"] and info["cudart_compiled"] >= 12000
    if mod.device_count() == 0:
        assert not HAS_CUDA
        # Without a GPU/driver a launch must fail with the CUDA error string, not crash.
        with pytest.raises(RuntimeError, match="astromer_fast._C_cuda: .+"):
            mod.input_embedding_forward(8, 8, 0, 8, 8, 0, 10000.0, 1, 2, 8, 0, 0)
        with pytest.raises(BackendUnavailableError):
            resolve_backend("cuda", "cuda")
    else:
        assert HAS_CUDA and mod.device_count() == torch.cuda.device_count()


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_launch_errors_raise():
    mod = _ext.cuda_ext()
    if mod is None:
        pytest.skip("astromer_fast._C_cuda not available")
    out = torch.empty(3, device="cuda")  # 4-byte offset: misaligned float2 output
    with pytest.raises(RuntimeError, match="aligned"):
        mod.input_embedding_forward(8, 8, 0, 8, 8, 0, 10000.0, 1, 2, out.data_ptr() + 4, 0, 0)
