"""Tests of the masked attention op (SPEC.md section 3) on every backend this machine can run.

Oracle: float64 attention at the same float32 inputs, with the float32 semantics of the released
code's mask: -1e9 added in float32 to hidden keys (probability exactly 0 next to any visible key; a
row whose keys are all hidden gets logits fl(s - 1e9) = -1e9, i.e. a uniform average over all L keys),
or +1 where query or key is hidden (Astromer 1). Gradients: autograd of that oracle, where the
hidden-key shift has derivative 1 as in the reference model's autograd.

Tolerances (float32 kernels, outputs and gradients of order 1, sums over <= 256 * 64 terms):
  * forward out and lse: 1e-5 absolute; gradients: 2e-5 absolute (relative to max |grad| >= 1);
  * float64 torch-op path: 1e-10; bfloat16 inputs (cast to float32 by the CPU kernel): 2e-2;
  * whole model (6 blocks, fp32): forward 1e-4; one training step: gradients 1e-4 relative to the
    largest, parameters after one SGD step (lr 1e-2) 1e-6.
"""

import math
import textwrap

import pytest
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.kernels import available_backends, masked_attention
from astromer_fast.kernels.masked_attention import (
    _masked_attention_bwd,
    _masked_attention_fwd,
    attention_bias_reference,
)
from astromer_fast.model.astromer import attention_bias

H, HD = 4, 64
RULES = ["key", "query_or_key_plus1"]
LENGTHS = [1, 7, 200, 256]
CPU_BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
OP_BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]  # through the custom op
HAS_CUDA = torch.cuda.is_available()


def make_inputs(B, L, seed=0, dtype=torch.float32, all_hidden_row=True, device="cpu"):
    """q, k, v (B, H, L, HD) and key_hidden (B, L): random padding tails, random masked
    observations, and (B > 1) one window whose keys are all hidden."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, HD, generator=g) for _ in range(3))
    n_valid = torch.randint(1, L + 1, (B,), generator=g)
    kh = (torch.arange(L)[None] >= n_valid[:, None]) | (torch.rand(B, L, generator=g) < 0.2)
    if all_hidden_row and B > 1:
        kh[-1] = True
    return [x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
            for x in (q, k, v, kh)]


def _shift_all_hidden(s32):
    """fl32(fl32(s - 1e9) + 1e9): the value a fully hidden row's logits have (up to a constant)."""
    return ((s32 + -1e9) + 1e9)


def oracle(q, k, v, kh, rule):
    """float64 (out, lse) with float32 mask semantics; differentiable in q, k, v."""
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    kh4 = kh[:, None, None, :]
    if rule == "key":
        all_h = kh.all(-1)[:, None, None, None]
        shifted = s + (_shift_all_hidden(s.detach().float()).double() - s.detach())
        s = torch.where(kh4 & all_h, shifted, torch.where(kh4, s - 1e9, s))
    else:
        s = s + (kh[:, None, :, None] | kh4).double()
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    (out * do.to(out.dtype)).sum().backward()
    return [x.grad for x in leaves]


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("B", [1, 3])
def test_forward_matches_float64(backend, L, rule, B):
    q, k, v, kh = make_inputs(B, L, seed=L + B)
    out = masked_attention(q, k, v, kh, rule, backend=backend)
    want, want_lse = oracle(q, k, v, kh, rule)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max().item() < 1e-5
    if backend in OP_BACKENDS:
        o2, lse = _masked_attention_fwd(q, k, v, kh, rule, backend)
        assert torch.equal(o2, out) or backend == "torch"
        assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
        assert (lse.double() - want_lse).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", [1, 7, 200])
def test_all_hidden_row_is_the_uniform_average_like_the_model(backend, L):
    q, k, v, _ = make_inputs(2, L, seed=5)
    kh = torch.zeros(2, L, dtype=torch.bool)
    kh[1] = True
    out = masked_attention(q, k, v, kh, "key", backend=backend)
    torch.testing.assert_close(out[1], v[1].mean(-2, keepdim=True).expand(H, L, HD),
                               rtol=0, atol=2e-6)
    # ... which is what the current model's attention_bias + softmax gives in float32.
    logits = q @ k.transpose(-1, -2) / 8.0 + attention_bias(kh, "key", torch.float32)
    model_out = torch.softmax(logits, -1) @ v
    torch.testing.assert_close(out, model_out, rtol=0, atol=2e-6)


@pytest.mark.parametrize("rule", RULES)
def test_reference_bias_is_the_models(rule):
    _, _, _, kh = make_inputs(3, 9)
    for dt in (torch.float32, torch.float64):
        assert torch.equal(attention_bias_reference(kh, rule, dt), attention_bias(kh, rule, dt))


def test_float64_and_bfloat16_inputs():
    q, k, v, kh = make_inputs(2, 7, dtype=torch.float64)
    out = masked_attention(q, k, v, kh)  # float64 -> torch backend, stays float64
    assert out.dtype == torch.float64
    # float64 through the torch custom op keeps the float32 mask semantics
    o, lse = _masked_attention_fwd(q, k, v, kh, "key", "torch")
    want, want_lse = oracle(q, k, v, kh, "key")
    assert (o - want).abs().max() < 1e-10 and (lse - want_lse).abs().max() < 1e-10
    if "cpu" in CPU_BACKENDS:
        qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
        ob = masked_attention(qb, kb, vb, kh, backend="cpu")
        assert ob.dtype == torch.bfloat16
        want_b = oracle(qb.float(), kb.float(), vb.float(), kh, "key")[0]
        assert (ob.double() - want_b).abs().max() < 2e-2


def test_cpu_threads_agree_bitwise():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    q, k, v, kh = make_inputs(4, 200)
    do = torch.randn_like(q)
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            o, lse = _masked_attention_fwd(q, k, v, kh, "key", "cpu")
            res.append((o, lse, *_masked_attention_bwd(do, q, k, v, o, lse, kh, "key", "cpu")))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_noncontiguous_inputs_and_empty():
    q, k, v, kh = make_inputs(2, 9)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(masked_attention(qt, k, v, kh, backend=backend),
                                   masked_attention(q, k, v, kh, backend=backend))
        e = masked_attention(q[:0], k[:0], v[:0], kh[:0], backend=backend)
        assert e.shape == (0, H, 9, HD)


@pytest.mark.parametrize("layout", ["model_heads", "fused_qkv", "last_dim_strided"])
def test_cpu_kernel_reads_strided_heads_without_copying_and_same_bits(layout):
    """The C++ kernel takes q, k, v by their strides (rows contiguous): the model's (B, L, H, hd)
    heads go in as they are. Results must be bit-identical to dense inputs, forward and backward;
    a last dimension that is not contiguous is copied first."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    from astromer_fast.kernels.masked_attention import _qkv_for

    B, L = 3, 37
    q, k, v, kh = make_inputs(B, L)
    do = torch.randn_like(q)
    if layout == "model_heads":  # what MultiHeadAttention.split gives
        strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    elif layout == "fused_qkv":  # one (B, L, 3, H, hd) projection
        qkv = torch.stack([x.transpose(1, 2) for x in (q, k, v)], 2).contiguous()
        strided = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    else:
        strided = [torch.stack([x, x], -1)[..., 0] for x in (q, k, v)]
    assert all(torch.equal(a, b) for a, b in zip(strided, (q, k, v)))
    assert not any(x.is_contiguous() for x in strided)
    passed = _qkv_for("cpu", *strided)
    if layout == "last_dim_strided":
        assert all(x.is_contiguous() for x in passed)
    else:
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(passed, strided))  # no copy
    o_dense, lse_dense = _masked_attention_fwd(q, k, v, kh, "key", "cpu")
    o_str, lse_str = _masked_attention_fwd(*strided, kh, "key", "cpu")
    assert torch.equal(o_dense, o_str) and torch.equal(lse_dense, lse_str)
    g_dense = _masked_attention_bwd(do, q, k, v, o_dense, lse_dense, kh, "key", "cpu")
    g_str = _masked_attention_bwd(do, *strided, o_str, lse_str, kh, "key", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(g_dense, g_str))
    # and through autograd, against float64
    want = grads(lambda *a: oracle(*a, kh, "key")[0], q, k, v, do)
    got = grads(lambda *a: masked_attention(*a, kh, backend="cpu"), *strided, do)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_.double(), atol=2e-5, rtol=1e-4)


def test_cpu_kernel_leaves_hidden_keys_out_exactly():
    """Rule "key": the C++ kernel runs the softmax over the visible keys only (a hidden key's
    probability underflows to exactly 0). Hidden keys' dk, dv are then exactly 0, as in the
    reference; a window whose keys are all hidden still averages all of them."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    q, k, v, kh = make_inputs(3, 200, seed=3)  # random padding, 20% masked, last window all hidden
    kh[0, ::2] = True  # most keys of window 0 hidden, scattered
    do = torch.randn_like(q)
    o, lse = _masked_attention_fwd(q, k, v, kh, "key", "cpu")
    dq, dk, dv = _masked_attention_bwd(do, q, k, v, o, lse, kh, "key", "cpu")
    hid = kh[:-1, None, :, None].expand(-1, H, -1, HD)
    assert (dk[:-1][hid] == 0).all() and (dv[:-1][hid] == 0).all()
    assert (dv[-1] != 0).all()  # the all-hidden window: uniform weights, every key gets gradient
    o_ref, lse_ref = oracle(q, k, v, kh, "key")
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)
    want = grads(lambda *a: oracle(*a, kh, "key")[0], q, k, v, do)
    for g_, w_ in zip((dq, dk, dv), want):
        torch.testing.assert_close(g_.double(), w_.double(), atol=2e-5, rtol=1e-4)


def test_return_weights():
    q, k, v, kh = make_inputs(2, 7)
    out, w = masked_attention(q, k, v, kh, "key", return_weights=True)
    assert w.shape == (2, H, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, H, 7))
    torch.testing.assert_close(out, masked_attention(q, k, v, kh, backend="torch"))


def test_input_validation_messages():
    q, k, v, kh = make_inputs(2, 7)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_attention(q, k[:, :, :5], v, kh)
    with pytest.raises(TypeError, match="torch.bool"):
        masked_attention(q, k, v, kh.float())
    with pytest.raises(ValueError, match=r"key_hidden must be \(B, L\)"):
        masked_attention(q, k, v, kh[:, :5])
    with pytest.raises(ValueError, match="rule"):
        masked_attention(q, k, v, kh, "bogus")
    if "cpu" in CPU_BACKENDS:
        with pytest.raises(ValueError, match="multiple of 16"):
            masked_attention(q[..., :8], k[..., :8], v[..., :8], kh, backend="cpu")


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("rule", RULES)
def test_gradients_match_float64_autograd(backend, L, rule):
    B = 1 if L == 256 else 3
    q, k, v, kh = make_inputs(B, L, seed=7 + L)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = grads(lambda *x: masked_attention(*x, kh, rule, backend=backend), q, k, v, do)
    want = grads(lambda *x: oracle(*x, kh, rule), q, k, v, do)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32
        err = (a.double() - b).abs().max().item()
        assert err < 2e-5 * max(1.0, b.abs().max().item()), (name, err)
    if backend in OP_BACKENDS:  # the custom op's own backward, also for the torch backend
        got_op = grads(lambda *x: _masked_attention_fwd(*x, kh, rule, backend)[0], q, k, v, do)
        for a, b in zip(got_op, want):
            assert (a.double() - b).abs().max().item() < 2e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_float64(rule):
    """gradcheck of the custom op (torch implementation, the flash-style backward with D_i) in
    float64. Rows whose keys are all hidden are excluded: their value is piecewise constant in
    float32 semantics while the gradient is, as in the reference model, the smooth one."""
    q, k, v, kh = make_inputs(2, 5, dtype=torch.float64, all_hidden_row=False, seed=3)
    q, k, v = (x[:, :1, :, :16].clone().requires_grad_(True) for x in (q, k, v))
    assert not kh.all(-1).any()
    fn = lambda q, k, v: _masked_attention_fwd(q, k, v, kh, rule, "torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("rule", RULES)
def test_opcheck(rule):
    for backend in OP_BACKENDS:
        q, k, v, kh = make_inputs(2, 7, seed=11)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        torch.library.opcheck(_masked_attention_fwd, (q, k, v, kh, rule, backend))
        o, lse = _masked_attention_fwd(q.detach(), k.detach(), v.detach(), kh, rule, backend)
        torch.library.opcheck(_masked_attention_bwd,
                              (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, kh,
                               rule, backend))


# ------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess: TRITON_INTERPRET must be set before triton.jit runs)
# ------------------------------------------------------------------------------------------------
_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_kernels_masked_attention import make_inputs, oracle, grads
    from astromer_fast.kernels import available_backends, masked_attention
    from astromer_fast.kernels.masked_attention import _masked_attention_fwd
    assert "triton" in available_backends("cpu"), available_backends("cpu")
    errs = {}
    for L in (1, 7, 20, 33):
        for rule in ("key", "query_or_key_plus1"):
            q, k, v, kh = make_inputs(2, L, seed=L)
            q, k, v = (x[:, :2, :, :32].contiguous() for x in (q, k, v))
            out, lse = _masked_attention_fwd(q, k, v, kh, rule, "triton")
            want, want_lse = oracle(q, k, v, kh, rule)
            do = torch.randn_like(q)
            g = grads(lambda *x: masked_attention(*x, kh, rule, backend="triton"), q, k, v, do)
            gw = grads(lambda *x: oracle(*x, kh, rule), q, k, v, do)
            errs[f"{L}-{rule}"] = max([(out.double() - want).abs().max().item(),
                                       (lse.double() - want_lse).abs().max().item()]
                                      + [(a.double() - b).abs().max().item() for a, b in zip(g, gw)])
    print(json.dumps(errs))
    """
)


def test_triton_fwd_bwd_under_interpreter(run_triton_interpreted):
    errs = run_triton_interpreted(_TRITON_SCRIPT)
    assert errs and max(errs.values()) < 2e-5, errs


# ------------------------------------------------------------------------------------------------
# GPU: every kernel backend available on CUDA, fp32 and bf16, against the float64 oracle
# ------------------------------------------------------------------------------------------------
# Errors are max |got - want| / max |want|, max |want| floored (outputs 1e-3, gradients 0.1) so that
# an all-zero reference, e.g. dq and dk when L = 1 (rounding leaves ~1e-7 there), is compared
# absolutely. fp32 kernels: ~1e-6 (fp32 accumulation over
# <= 256 * 64 terms); bf16 kernels: P and dS are rounded to bf16 before their products and the
# outputs are bf16, ~2^-8 each: an emulation of exactly those roundings gives 2e-3 .. 7e-3.
GPU_BACKENDS = ([b for b in available_backends("cuda") if b != "torch"] if HAS_CUDA
                else ["cuda", "triton"])
GPU_TOL = {torch.float32: dict(out=2e-5, lse=1e-5, grad=5e-5),
           torch.bfloat16: dict(out=1e-2, lse=1e-4, grad=2e-2)}
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


def rel_err(got, want, floor=1e-3):
    want = want.double().cpu()
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def grad_err(got, want):
    return rel_err(got, want, floor=0.1)


def gpu_case(B, L, dtype, seed):
    """Inputs on the GPU (q, k, v exactly representable in dtype), do rounded to dtype, and the
    float64 oracle's out, lse and gradients at those values (computed on the CPU)."""
    q, k, v, kh = make_inputs(B, L, seed=seed)
    q, k, v = (x.to(dtype).float() for x in (q, k, v))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).float()
    return q, k, v, kh, do


def _kernel_runners():
    import importlib

    # (the package re-exports the function masked_attention under the module's name)
    ma = importlib.import_module("astromer_fast.kernels.masked_attention")
    return ma._FWD, ma._BWD


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("L", LENGTHS)
def test_gpu_kernels_match_float64(backend, dtype, rule, L):
    """The raw kernels, outputs poisoned with NaN first (an element they fail to write shows up),
    forward and backward, batch 1 and 3 (the last window of 3 has every key hidden)."""
    fwd, bwd = _kernel_runners()
    tol = GPU_TOL[dtype]
    for B in (1, 3):
        q, k, v, kh, do = gpu_case(B, L, dtype, seed=L + B)
        want, want_lse = oracle(q, k, v, kh, rule)
        want_g = grads(lambda *x: oracle(*x, kh, rule), q, k, v, do)
        qd, kd, vd, dod = (x.to(device="cuda", dtype=dtype) for x in (q, k, v, do))
        khd = kh.cuda().view(torch.uint8)
        out = torch.full_like(qd, float("nan"))
        lse = torch.full((B, H, L), float("nan"), device="cuda")
        fwd[backend](qd, kd, vd, khd, rule, out, lse)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), (B, "unwritten or NaN")
        e_out, e_lse = rel_err(out, want), (lse.double().cpu() - want_lse).abs().max().item()
        assert e_out < tol["out"] and e_lse < tol["lse"], (B, e_out, e_lse)
        dq, dk, dv = (torch.full_like(qd, float("nan")) for _ in range(3))
        bwd[backend](dod, qd, kd, vd, out, lse, khd, rule, dq, dk, dv)
        for name, a, b in zip("qkv", (dq, dk, dv), want_g):
            assert torch.isfinite(a).all(), (B, name, "unwritten or NaN")
            assert grad_err(a, b) < tol["grad"], (B, name, grad_err(a, b))


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_public_op_autograd_and_all_hidden(backend, dtype):
    """Through masked_attention() and autograd (the path the model takes), with padding, masked
    observations and a window whose keys are all hidden (uniform average, never NaN)."""
    tol = GPU_TOL[dtype]
    q, k, v, kh, do = gpu_case(4, 200, dtype, seed=3)
    kh[1] = True
    want, _ = oracle(q, k, v, kh, "key")
    want_g = grads(lambda *x: oracle(*x, kh, "key"), q, k, v, do)
    args = [x.to(device="cuda", dtype=dtype) for x in (q, k, v)]
    khd, dod = kh.cuda(), do.to(device="cuda", dtype=dtype)
    out = masked_attention(*args, khd, "key", backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, want) < tol["out"]
    torch.testing.assert_close(out[1].float().cpu(), want[1].float(), rtol=0,
                               atol=tol["out"] * want.abs().max().item())
    got_g = grads(lambda *x: masked_attention(*x, khd, "key", backend=backend), *args, dod)
    for name, a, b in zip("qkv", got_g, want_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert grad_err(a, b) < tol["grad"], (name, grad_err(a, b))


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_many_windows_and_current_stream(backend):
    """B * H = 65,600 (more than a grid's y or z dimension holds) on a side stream: spot-check the
    first and last windows against the oracle."""
    B, L = 16400, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, HD, device="cuda", generator=g, dtype=torch.bfloat16)
               .requires_grad_(True) for _ in range(3))
    kh = torch.rand(B, L, device="cuda", generator=g) < 0.3
    kh[-1] = True
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = masked_attention(q, k, v, kh, "key", backend=backend)
        grads_ = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    s.synchronize()
    assert all(torch.isfinite(x).all() for x in grads_)
    q, k, v, out = (x.detach() for x in (q, k, v, out))
    for sl in (slice(0, 2), slice(B - 2, B)):
        want, _ = oracle(q[sl].float().cpu(), k[sl].float().cpu(), v[sl].float().cpu(),
                         kh[sl].cpu(), "key")
        assert rel_err(out[sl], want) < GPU_TOL[torch.bfloat16]["out"], sl


@needs_cuda
def test_gpu_default_backend_runs_and_forced_errors_are_clear():
    q, k, v, kh, _ = gpu_case(2, 7, torch.float32, seed=0)
    out = masked_attention(q.cuda(), k.cuda(), v.cuda(), kh.cuda())
    assert rel_err(out, oracle(q, k, v, kh, "key")[0]) < GPU_TOL[torch.float32]["out"]
    if "cuda" in GPU_BACKENDS:
        with pytest.raises(ValueError, match="hd 64"):
            x = q[..., :32].cuda().contiguous()
            masked_attention(x, x, x, kh.cuda(), backend="cuda")


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------
def _batch(B=3, L=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_valid = torch.tensor([L, 57, 0])[:B]
    valid = torch.arange(L)[None] < n_valid[:, None]
    t = torch.sort(torch.rand(B, L, generator=g) * 1000 - 500, 1).values * valid
    m = torch.randn(B, L, generator=g) * valid
    probed = valid & (torch.rand(B, L, generator=g) < 0.3)
    return t, m, valid, probed


@pytest.mark.parametrize("preset", ["astromer2", "astromer1"])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_model_forward_and_training_step_match_reference(preset, backend):
    t, m, valid, probed = _batch()
    hidden = ~valid | probed
    models = {}
    for name in ("torch", backend):
        torch.manual_seed(0)
        models[name] = Astromer(AstromerConfig.preset(preset, dropout=0.0))
    with torch.no_grad():
        ref = models["torch"](t, m, hidden, backend="torch")
        got = models[backend](t, m, hidden, backend=backend)
    assert (got - ref).abs().max().item() < 1e-4
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        pred = model(t, m, hidden, backend=name)
        loss = ((pred - m) ** 2 * probed).sum() / probed.sum()
        loss.backward()
        opt.step()
    for (n1, p1), (n2, p2) in zip(models["torch"].named_parameters(), models[backend].named_parameters()):
        g1, g2 = p1.grad, p2.grad
        if g1 is None:  # e.g. the MASK token of astromer1 does not exist / is unused
            assert g2 is None, n1
            continue
        assert (g1 - g2).abs().max().item() <= 1e-4 * max(1.0, g1.abs().max().item()), n1
        assert (p1 - p2).abs().max().item() < 1e-6, n1


def _model_step(model, t, m, hidden, err, probed, valid, backend, amp):
    """Forward and the gradients of one training step (the official loss), as float64 on the CPU."""
    from astromer_fast.training import weighted_rmse

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        pred = model(t, m, hidden, backend=backend)
    loss = weighted_rmse(pred, m, err, probed, valid, backend=backend)
    loss.backward()
    return pred.detach().double().cpu(), {n: p.grad.double().cpu()
                                          for n, p in model.named_parameters() if p.grad is not None}


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_gpu_model_forward_and_training_step(backend, amp):
    """Astromer 2 on the GPU with each kernel backend against the float64 reference model (CPU).
    fp32: forward and every gradient within 2e-4 of the largest. bf16 autocast: no worse than
    twice what the plain PyTorch model gets under the same autocast (plus a small floor)."""
    t, m, valid, probed = _batch()
    err = (torch.rand(t.shape, generator=torch.Generator().manual_seed(4)) * 0.1 + 0.01) * valid
    hidden = ~valid | probed
    torch.manual_seed(0)
    base = Astromer(AstromerConfig.astromer2(dropout=0.0))
    with torch.no_grad():
        base.embedding.mask_token.fill_(0.3)  # a non-zero token, so that its path is exercised
    ref = copy_model(base).double()
    want, want_g = _model_step(ref, t.double(), m.double(), hidden, err, probed, valid, "torch",
                               False)
    dev = [x.cuda() for x in (t, m, hidden, err, probed, valid)]
    results = {}
    for name in ("torch", backend):
        results[name] = _model_step(copy_model(base).cuda(), *dev, name, amp)

    def errs(res):
        out, g = res
        return rel_err(out, want), max(grad_err(g[n], want_g[n]) for n in want_g)

    e_out, e_grad = errs(results[backend])
    assert set(results[backend][1]) == set(want_g)
    if not amp:
        assert e_out < 2e-4 and e_grad < 2e-4, (e_out, e_grad)
    else:
        r_out, r_grad = errs(results["torch"])
        assert e_out <= 2 * r_out + 2e-3 and e_grad <= 2 * r_grad + 2e-2, (e_out, e_grad, r_out, r_grad)


def copy_model(model):
    import copy

    return copy.deepcopy(model)


def test_model_attention_weights_and_sdpa_still_work():
    t, m, valid, _ = _batch()
    torch.manual_seed(0)
    model = Astromer().eval()
    with torch.no_grad():
        out = model.encode(t, m, ~valid, return_attention=True)
        a = model.encode(t, m, ~valid, backend="torch").last
        b = model.encode(t, m, ~valid, backend="sdpa").last
    assert len(out.attention) == 6 and out.attention[0].shape == (3, 4, 200, 200)
    torch.testing.assert_close(out.last, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_model_fullgraph_cpu(backend):
    torch._dynamo.reset()
    t, m, valid, probed = _batch(L=40)
    hidden = ~valid | probed
    torch.manual_seed(0)
    model = Astromer(AstromerConfig(dropout=0.0))
    explain = torch._dynamo.explain(model)(t, m, hidden, backend=backend)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(t, m, hidden, backend=backend)
    got.sum().backward()
    g_compiled = model.blocks[0].attn.wq.weight.grad.clone()
    model.zero_grad()
    want = model(t, m, hidden, backend=backend)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_compiled, model.blocks[0].attn.wq.weight.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_inductor_op_cpu():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("astromer_fast._C not available")
    torch._dynamo.reset()
    q, k, v, kh = make_inputs(2, 20)

    @torch.compile(fullgraph=True)
    def f(q, k, v, kh):
        return masked_attention(q * 1.0, k, v, kh, backend="cpu") * 2.0

    torch.testing.assert_close(f(q, k, v, kh), 2.0 * masked_attention(q, k, v, kh, backend="cpu"))


@pytest.mark.parametrize("rule", ["key", "query_or_key_plus1"])
def test_sdpa_default_path_matches_reference(rule):
    # What a CUDA tensor gets by default (backends.CUDA_DEFAULTS): checked here on the CPU,
    # where SDPA runs too, including an all-hidden window and padding.
    from astromer_fast.kernels.masked_attention import _sdpa, masked_attention_reference

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 23, 64, generator=g, dtype=torch.float64) for _ in range(3))
    kh = torch.rand(3, 23, generator=g) < 0.3
    kh[1] = True
    kh[2, 15:] = True
    # Against the float32 reference: an all-hidden row's -1e9 swamps its logits in float32 (a
    # uniform average), as in the model; in float64 the logits would survive the shift.
    want = masked_attention_reference(q.float(), k.float(), v.float(), kh, rule)[0]
    got = _sdpa(q.float(), k.float(), v.float(), kh, rule)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Windows with a valid key also agree with float64 math.
    exact = masked_attention_reference(q, k, v, kh, rule)[0]
    keep = ~kh.all(-1)
    torch.testing.assert_close(got[keep].double(), exact[keep], rtol=1e-4, atol=1e-5)


def test_sdpa_is_one_name_for_every_op():
    from astromer_fast.kernels.backends import pick_backend, resolve_backend

    f32 = torch.float32
    assert pick_backend("masked_attention", "cpu", f32, "sdpa") == "sdpa"
    assert pick_backend("input_embedding", "cpu", f32, "sdpa") == "torch"
    assert pick_backend("weighted_rmse", "cpu", f32, "SDPA") == "torch"
    assert resolve_backend("cpu", "sdpa") == "torch"
    with pytest.raises(ValueError, match="sdpa"):
        pick_backend("masked_attention", "cpu", f32, "flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_gradient_of_a_window_with_every_key_hidden(dtype):
    """Such a window attends uniformly (the -1e9 terms swamp the scores below float64), so its
    output is the mean of v and q, k get no gradient; torch's SDPA backward alone returned every
    weight as 1 there."""
    from astromer_fast.kernels.masked_attention import masked_attention

    g = torch.Generator().manual_seed(0)
    B, H, L, hd = 3, 2, 9, 16
    q, k, v = (torch.randn(B, H, L, hd, generator=g).to(dtype).requires_grad_() for _ in range(3))
    hidden = torch.zeros(B, L, dtype=torch.bool)
    hidden[0] = True  # every key hidden
    hidden[1, 4:] = True
    w = torch.randn(B, H, L, hd, generator=g).to(dtype)
    out = masked_attention(q, k, v, hidden, "key", backend="sdpa")
    (out.float() * w.float()).sum().backward()
    mean_v = v.detach().float().mean(2, keepdim=True).expand(-1, -1, L, -1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out[0].float() - mean_v[0]).abs().max() < tol
    assert q.grad[0].abs().max() == 0 and k.grad[0].abs().max() == 0
    want_dv = w[0].float().sum(1, keepdim=True).expand(-1, L, -1) / L
    assert (v.grad[0].float() - want_dv).abs().max() < tol * L
    # The other windows' gradients are the reference's.
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = masked_attention(q2, k2, v2, hidden, "key", backend="torch")
    (ref * w.double()).sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert (got[1:].double() - want[1:]).abs().max() < (1e-4 if dtype == torch.float32
                                                              else 0.1)
    with torch.no_grad():  # inference: the plain call, the same forward
        again = masked_attention(q, k, v, hidden, "key", backend="sdpa")
    assert (again.float() - out.detach().float()).abs().max() < tol
