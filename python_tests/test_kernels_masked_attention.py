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
# GPU (skipped here: no GPU on the CI machine)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_gpu_backends_match_float64(backend, dtype, rule):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA here")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for L in LENGTHS:
        q, k, v, kh = make_inputs(3, L, seed=L, device="cuda")
        qd, kd, vd = (x.to(dtype) for x in (q, k, v))
        out, lse = _masked_attention_fwd(qd, kd, vd, kh, rule, backend)
        want, want_lse = oracle(qd.float(), kd.float(), vd.float(), kh, rule)
        assert (out.double() - want).abs().max().item() < tol, L
        assert (lse.double() - want_lse).abs().max().item() < max(tol, 1e-5), L
        do = torch.randn_like(q)
        g = grads(lambda *x: _masked_attention_fwd(*x, kh, rule, backend)[0], qd, kd, vd, do)
        gw = grads(lambda *x: oracle(*x, kh, rule), qd.float(), kd.float(), vd.float(), do)
        for a, b in zip(g, gw):
            assert (a.double() - b).abs().max().item() < 10 * tol * max(1.0, b.abs().max().item()), L


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


def test_model_attention_weights_and_sdpa_still_work():
    t, m, valid, _ = _batch()
    torch.manual_seed(0)
    model = Astromer().eval()
    with torch.no_grad():
        out = model.encode(t, m, ~valid, return_attention=True)
        a = model.encode(t, m, ~valid, backend="torch").last
        b = model.encode(t, m, ~valid, use_sdpa=True).last
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
