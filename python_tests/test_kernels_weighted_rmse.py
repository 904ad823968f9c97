"""Tests of the fused weighted masked RMSE (SPEC.md section 4) on every backend this machine can run.

Oracle: a float64 numpy evaluation of the formula (and of its analytic gradient with respect to
pred) at the same float32 inputs. Tolerances:
  * loss: 2e-6 relative. The kernels form 1/e, the min-max weights and the squared errors in
    float32 (as the reference does) and accumulate in float32/float64: a few float32 roundings.
  * gradient: 1e-5 of the largest |gradient| absolute (+ 1e-5 relative). A weight near its floor of
    1e-3 carries the float32 error of (1/e - lo) / span, ~1e-7 absolute, so its own element is only
    good to ~1e-4 relative, but such elements are tiny next to the largest one.
  * bfloat16 pred: the oracle runs at the bf16 values (exactly representable in float32), so the
    loss keeps the float32 tolerance; the gradient is rounded to bf16 (2^-8 relative).
"""

import os
import shutil
import textwrap

import numpy as np
import pytest
import torch

from astromer_fast.kernels import BackendUnavailableError, available_backends, resolve_backend
from astromer_fast.kernels import _ext
from astromer_fast.kernels.weighted_rmse import (
    _weighted_rmse_bwd,
    _weighted_rmse_op,
    error_weights,
    weighted_rmse,
    weighted_rmse_reference,
)

LOSS_RTOL = 2e-6
GRAD_TOL = 1e-5
SHAPES = [(1, 1), (3, 7), (6, 200), (5, 256), (1, 200)]
CASES = ["mixed", "no_err", "valid_none", "all_unprobed", "zero_neg_err", "const_err"]

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU on this machine"
CPU_BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
CUDA_BACKENDS = available_backends("cuda") if HAS_CUDA else []


# ------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ------------------------------------------------------------------------------------------------
def make_inputs(shape, case="mixed", seed=0, device="cpu"):
    """(pred, target, err, probed, valid) with padding at the end of windows, a window without a
    probed observation, a window with constant errors and one with zero / negative errors."""
    g = torch.Generator().manual_seed(seed)
    L = shape[-1]
    rows = int(np.prod(shape[:-1]))
    n_valid = torch.randint(0, L + 1, (rows,), generator=g)
    n_valid[0] = L  # at least one full window
    valid = torch.arange(L)[None, :] < n_valid[:, None]
    probed = valid & (torch.rand(rows, L, generator=g) < 0.5)
    probed[0, 0] = True  # at least one probed observation overall
    if rows > 2:
        probed[1] = False  # a window (possibly with valid observations) without probed ones
    err = torch.rand(rows, L, generator=g) * 0.2 + 0.01
    if rows > 3:
        err[2] = 0.05  # constant errors: uniform weight 1
        err[3, ::3] = 0.0  # zero errors
        err[3, 1::5] = -0.02  # negative errors
    target = torch.randn(rows, L, generator=g)
    pred = target + 0.3 * torch.randn(rows, L, generator=g)
    # Padding holds arbitrary finite values, as in the pipeline.
    pred = torch.where(valid, pred, 7.0)
    if case == "no_err":
        err = None
    elif case == "valid_none":
        valid = None
    elif case == "all_unprobed":
        probed = torch.zeros_like(probed)
    elif case == "zero_neg_err":
        err[:, ::4] = 0.0
        err[:, 2::7] = -1.0
    elif case == "const_err":
        err[:] = 0.1
    out = [pred, target, err, probed, valid]
    return [None if x is None else x.reshape(shape).to(device) for x in out]


def oracle(pred, target, err, probed, valid=None):
    """(loss, d loss / d pred) in float64 numpy."""
    f = lambda x: x.detach().cpu().double().numpy()  # noqa: E731
    yh, y = f(pred.float()), f(target)
    p = probed.cpu().numpy().astype(np.float64)
    v = p if valid is None else valid.cpu().numpy().astype(np.float64)
    yh, y, p, v = (a.reshape(-1, a.shape[-1]) for a in (yh, y, p, v))
    if err is None:
        w = v
    else:
        inv = 1.0 / np.maximum(f(err).reshape(y.shape), 1e-8)
        lo = np.where(v > 0, inv, np.inf).min(-1, keepdims=True, initial=np.inf)
        hi = np.where(v > 0, inv, -np.inf).max(-1, keepdims=True, initial=-np.inf)
        with np.errstate(invalid="ignore"):
            span = hi - lo
        flat = ~(span > 0)
        w = np.where(flat, 1.0, (inv - lo) / np.where(flat, 1.0, span) + 1e-3) * v
    count = p.sum(-1)
    has = count > 0
    n = int(has.sum())
    grad = np.zeros_like(y)
    if n == 0:
        return 0.0, grad.reshape(pred.shape)
    mse = (w * p * (y - yh) ** 2).sum(-1)[has] / count[has]
    loss = float(np.sqrt(mse.mean() + 1e-12))
    grad[has] = (w * p * (yh - y))[has] / count[has, None] / (loss * n)
    return loss, grad.reshape(pred.shape)


def run(backend, pred, target, err, probed, valid, grad=True):
    x = pred.detach().clone().requires_grad_(grad)
    loss = weighted_rmse(x, target, err, probed, valid, backend=backend)
    if not grad:
        return loss, None
    loss.backward()
    return loss.detach(), x.grad


def assert_matches_oracle(loss, g, inputs, grad_rel=GRAD_TOL, what=""):
    want, want_g = oracle(*inputs)
    assert loss.shape == () and torch.isfinite(loss), what
    assert abs(float(loss) - want) <= LOSS_RTOL * want + 1e-9, (what, float(loss), want)
    if g is not None:
        gd = g.detach().cpu().double().numpy()
        assert np.isfinite(gd).all(), what
        tol = grad_rel * np.abs(want_g).max() + grad_rel * np.abs(want_g) + 1e-12
        assert (np.abs(gd - want_g) <= tol).all(), (what, float(np.abs(gd - want_g).max()))


# ------------------------------------------------------------------------------------------------
# Accuracy, forward and backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES)
def test_cpu_backends_match_float64(backend, shape, case):
    inputs = make_inputs(shape, case, seed=hash((shape, case)) % 1000)
    loss, g = run(backend, *inputs)
    assert loss.dtype == torch.float32
    assert_matches_oracle(loss, g, inputs, what=f"{backend} {shape} {case}")
    if case == "all_unprobed":
        assert float(loss) == 0.0 and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_windows_batch_dims_and_empty(backend):
    # L beyond one Triton block / many SIMD chunks, and (..., L) batch dimensions.
    for shape in [(3, 1030), (2, 3, 50)]:
        inputs = make_inputs(shape, "mixed", seed=3)
        loss, g = run(backend, *inputs)
        assert g.shape == shape
        assert_matches_oracle(loss, g, inputs, what=f"{backend} {shape}")
    for shape in [(0, 7), (4, 0)]:
        pred, target = torch.zeros(shape, requires_grad=True), torch.zeros(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        loss = weighted_rmse(pred, target, torch.ones(shape), mask, mask, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and pred.grad.shape == shape


def test_cpu_kernel_bf16_pred():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    for case in ("mixed", "no_err"):
        pred, target, err, probed, valid = make_inputs((6, 200), case, seed=5)
        pb = pred.bfloat16()
        loss, g = run("cpu", pb, target, err, probed, valid)
        assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
        assert_matches_oracle(loss, g, (pb, target, err, probed, valid), grad_rel=2 ** -7)
        # Same as the float32 kernel at the bf16 values (the bf16 load is exact).
        loss32, g32 = run("cpu", pb.float(), target, err, probed, valid)
        assert torch.equal(loss, loss32) and torch.equal(g, g32.bfloat16())


def test_matches_the_reference_it_replaced():
    """The kernels against the plain-PyTorch reference (previously training/loss.py) directly."""
    for shape, case in [((6, 200), "mixed"), ((5, 256), "zero_neg_err"), ((3, 7), "no_err")]:
        inputs = make_inputs(shape, case, seed=11)
        ref, g_ref = run("torch", *inputs)
        for backend in CPU_BACKENDS:
            loss, g = run(backend, *inputs)
            torch.testing.assert_close(loss, ref, rtol=LOSS_RTOL, atol=1e-9)
            torch.testing.assert_close(g, g_ref, rtol=GRAD_TOL, atol=GRAD_TOL * float(g_ref.abs().max()))


def test_error_weights_guards():
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    err = torch.tensor([[0.1, 0.2, 0.0, 5.0], [0.3] * 4, [0.1, 0.2, 0.3, 0.4]])
    w = error_weights(err, valid)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0, :3], torch.tensor([1e-3 + (10 - 5) / (1e8 - 5), 1e-3, 1 + 1e-3]))
    assert w[0, 3] == 0 and torch.equal(w[1], torch.ones(4)) and torch.equal(w[2], torch.zeros(4))
    assert torch.equal(error_weights(None, valid), valid.float())


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    inputs = make_inputs((64, 200), "mixed", seed=2)
    first = run(backend, *inputs)
    for _ in range(3):
        again = run(backend, *inputs)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_cpu_threads_agree_bitwise():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    inputs = make_inputs((257, 200), "mixed", seed=4)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append(run("cpu", *inputs))
    finally:
        torch.set_num_threads(old)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])


# ------------------------------------------------------------------------------------------------
# Custom op: opcheck, gradcheck, autograd, torch.compile
# ------------------------------------------------------------------------------------------------
def _op_backends(device):
    return [b for b in available_backends(device) if b != "triton" or device == "cuda"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("case", ["mixed", "no_err", "valid_none", "all_unprobed"])
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(device, case, need_grad):
    for backend in _op_backends(device):
        pred, target, err, probed, valid = make_inputs((4, 7), case, device=device)
        pred.requires_grad_(need_grad)
        torch.library.opcheck(_weighted_rmse_op, (pred, target, err, probed, valid, need_grad, backend))


def test_opcheck_bf16_pred():
    for backend in _op_backends("cpu"):
        pred, target, err, probed, valid = make_inputs((4, 7), "mixed")
        pred = pred.bfloat16().requires_grad_(True)
        torch.library.opcheck(_weighted_rmse_op, (pred, target, err, probed, valid, True, backend))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_cpu_fused_backward_is_bitwise_the_torch_expression(bf16):
    """The C++ backward (grad written in pred's dtype) against (dir * (g * scale)).to(dtype), with
    values that sit on bf16 rounding ties and NaN/inf, and any thread count."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    g = torch.Generator().manual_seed(0)
    dir_ = torch.randn(1000, 333, generator=g)
    dir_.view(-1)[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                      1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3e38])
    gl, sc = torch.tensor(0.7), torch.tensor(1.3)
    dt = torch.bfloat16 if bf16 else torch.float32
    want = (dir_ * (gl * sc)).to(dt)
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = _weighted_rmse_bwd(dir_, gl, sc, bf16)
            nan = want.isnan()  # (NaN payloads may differ; NaN-ness may not)
            assert got.dtype == dt and torch.equal(got.isnan(), nan)
            bits = torch.int16 if bf16 else torch.int32
            assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])
    finally:
        torch.set_num_threads(old)
    torch.library.opcheck(_weighted_rmse_bwd, (dir_[1:5, :5].contiguous(), gl, sc, bf16))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_backward_paths_give_the_same_bits(bf16, monkeypatch):
    """The autograd backward takes the C++ pass for large bfloat16 gradients on the CPU and two
    PyTorch ops otherwise: both give the same bits, at any size, with a non-unit upstream grad."""
    import sys

    # (sys.modules: the package re-exports the function under the module's name)
    wr = sys.modules["astromer_fast.kernels.weighted_rmse"]
    if "cpu" not in _op_backends("cpu"):
        pytest.skip("astromer_fast._C not available")
    pred, target, err, probed, valid = make_inputs((6, 200), "mixed", seed=3)
    if bf16:
        pred = pred.bfloat16()
    grads = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(wr, "_CPP_BWD_MIN_NUMEL", threshold)
        x = pred.clone().requires_grad_(True)
        (0.75 * weighted_rmse(x, target, err, probed, valid, backend="cpu")).backward()
        assert x.grad.dtype == pred.dtype and x.grad.isfinite().all()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("case", ["mixed", "no_err", "zero_neg_err", "const_err", "all_unprobed"])
def test_gradcheck_float64_torch_backend(case):
    pred, target, err, probed, valid = make_inputs((3, 7), case, seed=7)
    pred = pred.double().requires_grad_(True)
    target = target.double()

    def f(p):
        return weighted_rmse(p, target, err, probed, valid, backend="torch")

    assert f(pred).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (pred,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, (pred,), eps=1e-6, atol=1e-6, rtol=1e-4) if case == "mixed" else True


def test_no_grad_path_and_upstream_gradient():
    inputs = make_inputs((6, 200), "mixed", seed=8)
    for backend in CPU_BACKENDS:
        with torch.no_grad():
            loss = weighted_rmse(*inputs, backend=backend)
        assert_matches_oracle(loss, None, inputs)
        # A non-unit upstream gradient scales d loss / d pred.
        x = inputs[0].clone().requires_grad_(True)
        (3.5 * weighted_rmse(x, *inputs[1:], backend=backend)).backward()
        _, g = oracle(*inputs)
        np.testing.assert_allclose(x.grad.double().numpy(), 3.5 * g, rtol=1e-4, atol=1e-5 * np.abs(3.5 * g).max())


def test_op_without_need_grad_refuses_backward():
    pred, target, err, probed, valid = make_inputs((3, 7))
    pred.requires_grad_(True)
    for backend in _op_backends("cpu"):
        loss, _, _ = _weighted_rmse_op(pred, target, err, probed, valid, False, backend)
        with pytest.raises(RuntimeError, match="need_grad=False"):
            loss.backward()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cpu(compiler):
    torch._dynamo.reset()
    pred, target, err, probed, valid = make_inputs((6, 200), "mixed", seed=9)
    w = torch.tensor(1.3, requires_grad=True)

    def f(w, pred, target, err, probed, valid):
        return weighted_rmse(torch.tanh(pred * w), target, err, probed, valid) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    got = compiled(w, pred, target, err, probed, valid)
    (g_compiled,) = torch.autograd.grad(got, w)
    want = f(w, pred, target, err, probed, valid)
    (g_eager,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_compiled, g_eager)
    with torch.no_grad():  # the need_grad=False variant traces too
        torch.testing.assert_close(compiled(w, pred, target, err, probed, valid), want.detach())


# ------------------------------------------------------------------------------------------------
# Triton under the interpreter (a subprocess: TRITON_INTERPRET must be set before triton.jit runs)
# ------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_kernels_weighted_rmse import CASES, SHAPES, assert_matches_oracle, make_inputs, run
    from astromer_fast.kernels import available_backends
    assert "triton" in available_backends("cpu"), available_backends("cpu")
    done = []
    for shape in SHAPES + [(2, 1030), (2, 3, 9)]:
        for case in CASES:
            inputs = make_inputs(shape, case, seed=1)
            loss, g = run("triton", *inputs)
            assert_matches_oracle(loss, g, inputs, what=f"triton {shape} {case}")
            again = run("triton", *inputs)
            assert torch.equal(loss, again[0]) and torch.equal(g, again[1]), "not deterministic"
            done.append(f"{shape}-{case}")
    # bf16 pred
    pred, target, err, probed, valid = make_inputs((6, 200), "mixed", seed=5)
    pb = pred.bfloat16()
    loss, g = run("triton", pb, target, err, probed, valid)
    assert g.dtype == torch.bfloat16
    assert_matches_oracle(loss, g, (pb, target, err, probed, valid), grad_rel=2 ** -7)
    done.append("bf16")
    print(json.dumps(done))
    """
)


def test_triton_backend_under_interpreter(run_triton_interpreted):
    done = run_triton_interpreted(_TRITON_SCRIPT)
    assert len(done) == (len(SHAPES) + 2) * len(CASES) + 1


# ------------------------------------------------------------------------------------------------
# GPU (skipped here: no GPU on the CI machine)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_float64(backend, dtype):
    if backend not in CUDA_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable on CUDA here")
    for shape in SHAPES + [(4096, 200), (3, 1030)]:
        for case in CASES:
            pred, target, err, probed, valid = make_inputs(shape, case, seed=1, device="cuda")
            pred = pred.to(dtype)
            loss, g = run(backend, pred, target, err, probed, valid)
            assert g.dtype == dtype
            assert_matches_oracle(loss, g, (pred, target, err, probed, valid),
                                  grad_rel=GRAD_TOL if dtype == torch.float32 else 2 ** -7,
                                  what=f"{backend} {dtype} {shape} {case}")
            if backend != "torch":
                again = run(backend, pred, target, err, probed, valid)
                assert torch.equal(loss, again[0]) and torch.equal(g, again[1]), "not deterministic"


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "torch"] or ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_kernels_write_every_output(backend, dtype):
    """The raw runners with loss, scale and dir poisoned with NaN first: each must be written
    (dir is 0 in windows without a probed observation and at unprobed observations)."""
    import importlib

    wr = importlib.import_module("astromer_fast.kernels.weighted_rmse")
    if backend not in CUDA_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable on CUDA here")
    for shape in [(1, 1), (1, 7), (3, 200), (5, 256), (8192, 200)]:
        for case in ("mixed", "no_err", "valid_none", "all_unprobed"):
            pred, target, err, probed, valid = make_inputs(shape, case, seed=2, device="cuda")
            pred = pred.to(dtype)
            loss, scale = (torch.full((), float("nan"), device="cuda") for _ in range(2))
            dir_ = torch.full(shape, float("nan"), device="cuda")
            wr._RUNNERS[backend](pred, target, err, probed, valid, loss, scale, dir_)
            what = (shape, case)
            assert torch.isfinite(loss) and torch.isfinite(scale) and torch.isfinite(dir_).all(), what
            want, want_g = oracle(pred, target, err, probed, valid)
            assert abs(float(loss) - want) <= LOSS_RTOL * want + 1e-9, what
            assert (dir_[~probed] == 0).all(), what
            g = (dir_ * scale).double().cpu().numpy()
            assert np.abs(g - want_g).max() <= 1e-5 * max(np.abs(want_g).max(), 1e-12), what


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_cuda_kernel_runs_on_the_current_stream():
    if "cuda" not in CUDA_BACKENDS:
        pytest.skip("astromer_fast._C_cuda not available")
    inputs = make_inputs((512, 200), "mixed", device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        loss, g = run("cuda", *inputs)
    s.synchronize()
    assert_matches_oracle(loss, g, inputs)


# ------------------------------------------------------------------------------------------------
# Dispatch, validation, the compiled extensions
# ------------------------------------------------------------------------------------------------
def test_training_loss_is_the_one_dispatch_point(monkeypatch):
    from astromer_fast import training
    from astromer_fast.training import loss as loss_mod

    assert loss_mod.weighted_rmse is weighted_rmse and training.weighted_rmse is weighted_rmse
    assert loss_mod.error_weights is error_weights and callable(loss_mod.probed_metrics)
    monkeypatch.delenv("ASTROMER_FAST_BACKEND", raising=False)
    assert resolve_backend("cpu") == CPU_BACKENDS[0]
    inputs = make_inputs((6, 200), "mixed")
    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "torch")
    assert torch.equal(loss_mod.weighted_rmse(*inputs), weighted_rmse_reference(*inputs))
    monkeypatch.setenv("ASTROMER_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        loss_mod.weighted_rmse(*inputs)
    weighted_rmse(*inputs, backend="torch")  # an explicit argument wins over the environment


def test_float64_defaults_to_torch():
    pred, target, err, probed, valid = make_inputs((3, 7))
    out = weighted_rmse(pred.double(), target.double(), err, probed, valid)
    assert out.dtype == torch.float64
    if "cpu" in CPU_BACKENDS:  # forced float32 kernel: cast in
        out32 = weighted_rmse(pred.double(), target.double(), err, probed, valid, backend="cpu")
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out, rtol=LOSS_RTOL, atol=0)


def test_input_validation_messages():
    pred, target, err, probed, valid = make_inputs((3, 7))
    with pytest.raises(ValueError, match="target has shape"):
        weighted_rmse(pred, target[:, :5], err, probed, valid)
    with pytest.raises(TypeError, match="probed must be a torch.bool"):
        weighted_rmse(pred, target, err, probed.float(), valid)
    with pytest.raises(TypeError, match="valid must be a torch.bool"):
        weighted_rmse(pred, target, err, probed, valid.long())
    with pytest.raises(TypeError, match="pred must be a floating-point"):
        weighted_rmse(pred.long(), target, err, probed, valid)
    with pytest.raises(ValueError, match="0-d"):
        weighted_rmse(pred[0, 0], target[0, 0], None, probed[0, 0])
    with pytest.raises(ValueError, match="unknown backend"):
        _weighted_rmse_op(pred, target, err, probed, valid, False, "bogus")


def test_cpu_extension_exports_the_kernel():
    ext = _ext.cpu_ext()
    assert ext is not None, f"astromer_fast._C failed to import: {_ext.cpu_ext_error()}"
    assert hasattr(ext, "weighted_rmse_forward")


def _cuda_build_expected() -> bool:
    flag = os.environ.get("ASTROMER_FAST_CUDA", "auto").strip().lower()
    return shutil.which("nvcc") is not None and flag not in ("0", "off", "false", "no")


@pytest.mark.skipif(not _cuda_build_expected(), reason="nvcc is not on PATH (or ASTROMER_FAST_CUDA=0)")
def test_cuda_extension_exports_the_kernel():
    import importlib

    mod = importlib.import_module("astromer_fast._C_cuda")
    assert hasattr(mod, "weighted_rmse_forward")
    if mod.device_count() == 0:
        # Without a GPU/driver the call must fail with the CUDA error string, not crash.
        with pytest.raises(RuntimeError, match="astromer_fast._C_cuda: .+"):
            mod.weighted_rmse_forward(8, False, 8, 0, 8, 0, 1, 2, 8, 8, 0, 0, 0, 0)
