"""The fused CPU encoder (astromer_fast.model.fused_cpu, csrc/cpu/fused_block.cpp) against the
float64 reference model, at every ISA level this CPU supports and in both precisions.

Tolerances, on window embeddings of random models (values ~1):
  * fp32: 2e-5 absolute. Six float32 GEMMs, a softmax and two LayerNorms per block round at ~1e-7;
    summed over blocks and 256-channel dot products that stays below ~5e-6 here.
  * bf16: cosine >= 0.9999 to the float64 embedding and 5e-2 absolute: bfloat16 keeps 8 bits, so
    every GEMM input is off by up to 2^-9 relative; the embedding is a mean of ~100 such rows.
Kernel tests use the same float64 oracles, one pass at a time.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.kernels import _ext
from astromer_fast.model.fused_cpu import (FusedCpuEncoder, cpu_isa_info, fused_cpu_unsupported,
                                           native_bf16, resolve_precision)

pytestmark = pytest.mark.skipif(_ext.cpu_ext() is None, reason="astromer_fast._C is not built")

LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16")


def supported_levels():
    info = cpu_isa_info()
    return LEVELS[: LEVELS.index(info["detected"]) + 1] if info else ()


@pytest.fixture(params=LEVELS)
def isa_level(request):
    """Runs the test with the fused kernels capped at each ISA level (skipping levels above the
    CPU's), then restores the CPU's own level."""
    if request.param not in supported_levels():
        pytest.skip(f"this CPU does not support {request.param} ({cpu_isa_info().get('model')})")
    ext = _ext.cpu_ext()
    ext.set_cpu_isa(request.param)
    assert ext.cpu_isa_info()["active"] == request.param
    yield request.param
    ext.set_cpu_isa(cpu_isa_info()["detected"])


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_blocks=2, d_model=64, n_heads=2, dff=128)
    cfg.update(kw)
    preset = cfg.pop("preset", "astromer2")
    model = Astromer(AstromerConfig.preset(preset, **cfg)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines, biases and MASK token
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "token" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_windows(B, L, seed=0, all_hidden_row=True):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, L + 1, (B,), generator=g)
    n[0] = L
    valid = torch.arange(L)[None] < n[:, None]
    if all_hidden_row and B > 2:
        valid[-1] = False  # a window with nothing valid pools to zeros, never NaN
    t = (torch.sort(torch.rand(B, L, generator=g) * 400, 1).values - 200) * valid
    m = torch.randn(B, L, generator=g) * 0.5 * valid
    return t, m, valid


def reference(model, t, m, valid, layers=False):
    m64 = Astromer(model.config).double().eval()
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        return m64.embed_windows(t.double(), m.double(), valid, layers=layers,
                                 backend="torch").float()


def check(got, want, precision):
    assert torch.isfinite(got).all()
    if precision == "fp32":
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    else:
        flat_g, flat_w = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
        nz = flat_w.norm(dim=-1) > 0
        cos = torch.nn.functional.cosine_similarity(flat_g[nz], flat_w[nz], dim=-1)
        assert cos.min() >= 0.9999, cos.min()
        torch.testing.assert_close(got, want, rtol=0, atol=5e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,heads,L", [("astromer2", 2, 37), ("astromer2", 4, 70),
                                              ("astromer1", 2, 33), ("astromer2", 2, 1)])
def test_fused_encoder_matches_float64_model(isa_level, precision, preset, heads, L):
    # heads=4 of d_model 64 gives head size 16: the AVX-512 BF16 level then runs the generic
    # attention, which takes channels one vector at a time instead of in pairs.
    model = random_model(preset=preset, n_heads=heads)
    t, m, valid = random_windows(6, L)
    enc = FusedCpuEncoder(model, precision)
    got = enc(t, m, valid)
    want = reference(model, t, m, valid)
    check(got, want, precision)
    assert (got[~valid.any(1)] == 0).all()
    layers = enc(t, m, valid, layers=True)
    check(layers, reference(model, t, m, valid, layers=True), precision)
    assert torch.equal(layers[:, -1], got)


def test_fused_encoder_workspace_grows_and_shrinks_without_stale_rows():
    model = random_model()
    enc = FusedCpuEncoder(model, "fp32")
    small = random_windows(3, 20, seed=1)
    big = random_windows(9, 50, seed=2)
    first = enc(*small)
    enc(*big)
    torch.testing.assert_close(enc(*small), first, rtol=0, atol=0)


def test_fused_encoder_rejects_bad_input_and_unsupported_models():
    enc = FusedCpuEncoder(random_model(), "fp32")
    t, m, valid = random_windows(2, 8)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        enc(t[:, :4], m, valid)
    with pytest.raises(TypeError, match="bool"):
        enc(t, m, valid.float())
    cfg = AstromerConfig(n_blocks=1, d_model=24, n_heads=1, dff=48)
    assert "multiples of 16" in fused_cpu_unsupported(cfg)
    with pytest.raises(ValueError, match="cannot run this model"):
        FusedCpuEncoder(Astromer(cfg), "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        FusedCpuEncoder(random_model(), "int4")


# ---------------------------------------------------------------------------------------------
# One pass at a time
# ---------------------------------------------------------------------------------------------
def _bf16_round(x):
    return x.to(torch.bfloat16).to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_layernorm_with_window_means(isa_level, dtype):
    ext = _ext.cpu_ext()
    g = torch.Generator().manual_seed(3)
    B, L, D = 3, 11, 48
    x = torch.randn(B * L, D + 16, generator=g).to(dtype)  # strided: ld > dim
    res = torch.randn(B * L, 2 * D, generator=g).to(dtype)
    bx, br = torch.randn(D, generator=g), torch.randn(D, generator=g)
    gamma, beta = torch.randn(D, generator=g), torch.randn(D, generator=g)
    valid = torch.rand(B * L, generator=g) < 0.6
    valid[L:2 * L] = False
    out = torch.empty(B * L, D, dtype=dtype)
    pooled = torch.full((B, 2, D), 7.0)
    res_view = res[:, D:]
    ext.residual_layernorm(x.data_ptr(), x.stride(0), bx.data_ptr(), res_view.data_ptr(),
                           res.stride(0), br.data_ptr(), gamma.data_ptr(), beta.data_ptr(), 1e-6,
                           B * L, D, dtype == torch.bfloat16, out.data_ptr(), D,
                           valid=valid.data_ptr(), window_rows=L,
                           pooled=pooled.data_ptr() + D * 4, ld_pooled=2 * D, num_threads=2)
    v = x[:, :D].double() + bx.double() + res_view.double() + br.double()
    want = torch.nn.functional.layer_norm(v, (D,), gamma.double(), beta.double(), 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2 * want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
    w = valid.double().view(B, L, 1)
    means = (want.view(B, L, D) * w).sum(1) / w.sum(1).clamp_min(1)
    torch.testing.assert_close(pooled[:, 1].double(), means, rtol=0, atol=1e-5)
    assert (pooled[1, 1] == 0).all() and (pooled[:, 0] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_tanh_in_place(isa_level, dtype):
    ext = _ext.cpu_ext()
    x = torch.linspace(-12, 12, 40 * 80).view(40, 80)
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-7, 0.6249, 0.6251])
    x[1, 0], x[1, 1], x[1, 2] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    bias = torch.zeros(64)
    bias[5] = 0.25
    want = torch.tanh(x[:, :64].double() + bias.double())
    buf = x.clone()
    ext.bias_tanh(buf.data_ptr(), 80, bias.data_ptr(), 40, 64, dtype == torch.bfloat16,
                  buf.data_ptr(), 80, 2)
    got = buf[:, :64].double()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    tol = 3e-7 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got[~nan], want[~nan], rtol=tol, atol=1e-37)
    assert torch.equal(buf[:, 64:], x[:, 64:])  # columns beyond cols untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", [0, 1])
@pytest.mark.parametrize("hd,L", [(32, 45), (64, 70), (16, 9)])
def test_block_attention_against_float64(isa_level, dtype, rule, hd, L):
    # The flash-consistent float64 math: hidden-key terms rounded in float32 as every kernel (and
    # the float32 model) rounds them, so an all-hidden row is the same uniform average.
    from astromer_fast.kernels.masked_attention import _torch_fwd

    ext = _ext.cpu_ext()
    g = torch.Generator().manual_seed(4)
    B, H = 4, 2
    D = H * hd
    qkv = (torch.randn(B * L, 4 * D, generator=g) * 0.7).to(dtype)
    bias = torch.randn(3 * D, generator=g) * 0.2
    hidden = torch.rand(B, L, generator=g) < 0.3
    hidden[1] = True  # every key hidden: a uniform average under rule "key"
    hidden[2] = False
    out = torch.full((B * L, D + 8), 9.0, dtype=dtype)
    ext.block_attention(qkv.data_ptr(), qkv.stride(0), bias.data_ptr(), hidden.data_ptr(), B, L,
                        H, hd, rule, 1 / math.sqrt(hd), False, dtype == torch.bfloat16,
                        out.data_ptr(), out.stride(0), 2)
    y = qkv[:, :3 * D].double() + bias.double()
    q, k, v = (y[:, i * D:(i + 1) * D].reshape(B, L, H, hd).transpose(1, 2) for i in range(3))
    rname = ("key", "query_or_key_plus1")[rule]
    want, _ = _torch_fwd(q, k, v, hidden, rname)
    want = want.transpose(1, 2).reshape(B * L, D)
    tol = 2e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[:, :D].double(), want, rtol=0, atol=tol)
    assert (out[:, D:] == 9.0).all()


def test_block_attention_skips_hidden_queries_only_under_rule_key():
    ext = _ext.cpu_ext()
    B, L, H, hd = 2, 20, 2, 32
    D = H * hd
    qkv = torch.randn(B * L, 3 * D)
    hidden = torch.zeros(B, L, dtype=torch.bool)
    hidden[:, 15:] = True
    outs = []
    for rule, skip in ((0, False), (0, True), (1, True)):
        out = torch.full((B * L, D), 5.0)
        ext.block_attention(qkv.data_ptr(), 3 * D, 0, hidden.data_ptr(), B, L, H, hd, rule, 0.2,
                            skip, False, out.data_ptr(), D, 1)
        outs.append(out.view(B, L, D))
    assert torch.equal(outs[1][:, :15], outs[0][:, :15])
    assert (outs[1][:, 15:] == 0).all()
    assert (outs[2][:, 15:] != 0).any()  # rule query_or_key_plus1 reads hidden rows: computed


def test_kernels_refuse_bad_arguments():
    ext = _ext.cpu_ext()
    x = torch.zeros(4, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        ext.bias_tanh(x.data_ptr(), 24, 0, 4, 24, False, x.data_ptr(), 24, 1)
    with pytest.raises(ValueError, match="head_dim"):
        ext.block_attention(x.data_ptr(), 24, 0, x.data_ptr(), 1, 4, 1, 8, 0, 1.0, False, False,
                            x.data_ptr(), 8, 1)
    with pytest.raises(ValueError, match="window_rows"):
        ext.residual_layernorm(x.data_ptr(), 24, 0, 0, 0, 0, x.data_ptr(), x.data_ptr(), 1e-6, 4,
                               16, False, x.data_ptr(), 24, pooled=x.data_ptr(), ld_pooled=16,
                               window_rows=3, valid=x.data_ptr())


# ---------------------------------------------------------------------------------------------
# Dispatch and precision choice
# ---------------------------------------------------------------------------------------------
def test_isa_levels_above_the_cpu_are_refused():
    ext = _ext.cpu_ext()
    info = ext.cpu_isa_info()
    assert info["detected"] in LEVELS and info["active"] in LEVELS
    above = LEVELS[LEVELS.index(info["detected"]) + 1:]
    for level in above:
        with pytest.raises(ValueError, match="does not support"):
            ext.set_cpu_isa(level)
    with pytest.raises(ValueError, match="unknown ISA level"):
        ext.set_cpu_isa("amx")
    assert ext.cpu_isa_info()["active"] == info["active"]


def _python(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=300)


def test_isa_environment_variable_caps_the_level():
    code = ("from astromer_fast.model.fused_cpu import cpu_isa_info; import json; "
            "print(json.dumps(cpu_isa_info()))")
    proc = _python(code, ASTROMER_FAST_CPU_ISA="baseline")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["active"] == "baseline"
    proc = _python(code, ASTROMER_FAST_CPU_ISA="sse9")
    assert proc.returncode != 0 and "ASTROMER_FAST_CPU_ISA" in proc.stderr


def test_default_precision_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("ASTROMER_FAST_PRECISION", raising=False)
    assert resolve_precision() == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("auto") == resolve_precision()
    monkeypatch.setenv("ASTROMER_FAST_PRECISION", "fp32")
    assert resolve_precision() == "fp32"
    monkeypatch.setenv("ASTROMER_FAST_PRECISION", "half")
    with pytest.raises(ValueError, match="ASTROMER_FAST_PRECISION"):
        resolve_precision()


def test_embed_in_each_precision_records_it(tiny_model_dir, monkeypatch):
    import astromer_fast
    from astromer_fast.data import sample_path

    monkeypatch.delenv("ASTROMER_FAST_PRECISION", raising=False)
    model = random_model(n_blocks=1)
    out = {}
    for precision in ("fp32", "bf16", None):
        table = astromer_fast.embed(sample_path(), model=model, device="cpu", progress=False,
                                    precision=precision)
        meta = json.loads(table.schema.metadata[b"astromer_fast"])
        assert meta["precision"] == (precision or resolve_precision())
        out[precision] = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    a, b = out["fp32"], out["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999
    np.testing.assert_array_equal(out[None], out[resolve_precision()])
    with pytest.raises(ValueError, match="precision must be one of"):
        astromer_fast.embed(sample_path(), model=model, device="cpu", progress=False,
                            precision="fp16")


def test_packaged_model_bf16_on_real_eros_windows(shared_data):
    """bfloat16 against float32 with the packaged weights, on real EROS-1 curves: every curve's
    embedding cosine >= 0.9999 (what bench/RESULTS.md reports over all 7,282)."""
    import pyarrow.compute as pc

    import astromer_fast

    table = pq.read_table(shared_data / "eros1.parquet")
    table = table.filter(pc.equal(table["band"], "r")).slice(0, 96)
    emb = {}
    for precision in ("fp32", "bf16"):
        out = astromer_fast.embed(table, device="cpu", progress=False, precision=precision)
        emb[precision] = np.stack(out["embedding"].to_numpy(zero_copy_only=False))
    a, b = emb["fp32"], emb["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert len(cos) > 90 and cos.min() >= 0.9999


# ---------------------------------------------------------------------------------------------
# Training: forward and gradients of the fused passes
# ---------------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["astromer2", "astromer1"])
def test_fused_training_gradients_match_float64_model(isa_level, preset):
    """Dropout off (eval): the fused forward and every parameter's gradient against the float64
    plain model, relative (norm) error per parameter measured against what the plain model
    itself is off by in the same precision (float32 with the C++ kernels; bf16 autocast), plus a
    margin: a random Astromer 1 can have attention-score gradients float32 gets only to ~1e-3."""
    from astromer_fast.model.fused_cpu import fused_cpu_encode

    model = random_model(preset=preset)
    g = torch.Generator().manual_seed(5)
    B, L = 5, 37
    valid = torch.arange(L)[None] < torch.randint(3, L + 1, (B,), generator=g)[:, None]
    hidden = ~valid | (torch.rand(B, L, generator=g) < 0.2)
    t = (torch.rand(B, L, generator=g) * 100 - 50) * valid
    m = torch.randn(B, L, generator=g) * valid
    w = torch.randn(B, L, 64, generator=g)
    model.eval()
    ref = Astromer(model.config).double().eval()
    ref.load_state_dict(model.state_dict())
    out_ref = ref.encode(t.double(), m.double(), hidden, backend="torch").last
    (out_ref * w.double()).sum().backward()
    want = _grads(ref)

    def rel_errors(got):
        return {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in want
                if not n.endswith("wk.bias")}  # exactly 0: a key bias cannot change a softmax

    yardstick = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out_plain = model.encode(t, m, hidden, backend="cpu" if precision == "fp32"
                                     else "torch").last
        (out_plain.float() * w).sum().backward()
        yardstick[precision] = rel_errors(_grads(model))
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        out = fused_cpu_encode(model, t, m, hidden, precision)
        assert out.dtype == torch.float32 and out.shape == (B, L, 64)
        (out * w).sum().backward()
        got = _grads(model)
        assert set(got) == set(want)
        if precision == "fp32":
            torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=2e-5)
        else:
            assert (out.double() - out_ref).abs().max() < 0.1
        margin = 1e-4 if precision == "fp32" else 0.02
        for n, e in rel_errors(got).items():
            assert e < 3 * yardstick[precision][n] + margin, (n, e, yardstick[precision][n])


def test_fused_block_dropout_masks_and_their_gradients():
    """Training mode: the fused block equals the plain block computed with the masks the kernels
    report (dropout_keep_mask), forward and backward, in float64."""
    from astromer_fast.model.fused_cpu import _block_params, _FusedBlock

    ext = _ext.cpu_ext()
    model = random_model(n_blocks=1)
    blk = model.blocks[0]
    cfg = model.config
    B, L, D = 3, 24, 64
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B * L, D, generator=g, requires_grad=True)
    hidden = torch.rand(B, L, generator=g) < 0.25
    keep, seeds = 0.9, [12345, 2**61 + 7]
    out = _FusedBlock.apply(x, hidden, (B, L), cfg, torch.float32, keep, seeds,
                            *_block_params(blk))
    dy = torch.randn(B * L, D, generator=g)
    out.backward(dy)
    got = {n: p.grad.clone() for n, p in blk.named_parameters()}
    got_x = x.grad.clone()

    masks = []
    for s in seeds:
        mk = torch.empty(B * L, D, dtype=torch.uint8)
        ext.dropout_keep_mask(s, keep, B * L, D, mk.data_ptr())
        masks.append(mk.double() / keep)
    kept = torch.stack([(m_ > 0).double().mean() for m_ in masks])
    assert ((kept > 0.8) & (kept < 0.97)).all()  # about 90% kept
    assert not torch.equal(masks[0], masks[1])

    ref = type(blk)(cfg).double()
    ref.load_state_dict(blk.state_dict())
    xr = x.detach().double().requires_grad_()
    from astromer_fast.kernels.masked_attention import AttentionMask

    h = xr.view(B, L, D)
    a, _ = ref.attn(h, AttentionMask(hidden, cfg.mask_rule, "torch"))
    a = ref.ln1(ref.leak1(h) + a * masks[0].view(B, L, D))
    f = ref.ffn2(torch.tanh(ref.ffn1(a))) * masks[1].view(B, L, D)
    want_out = ref.ln2(ref.leak2(a) + f).reshape(B * L, D)
    want_out.backward(dy.double())
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(got_x.double(), xr.grad, rtol=0, atol=1e-4)
    for n, p in ref.named_parameters():
        if n.endswith("wk.bias"):
            continue
        err = ((got[n].double() - p.grad).norm() / p.grad.norm()).item()
        assert err < 1e-4, (n, err)


def test_trainer_takes_the_fused_path_on_the_cpu_unless_asked_not_to():
    from astromer_fast.training.trainer import TrainSettings, uses_bf16, uses_cpu_fused

    model = random_model()
    assert uses_cpu_fused(model, TrainSettings(), "cpu")
    assert not uses_cpu_fused(model, TrainSettings(cpu_fused=False), "cpu")
    assert not uses_cpu_fused(model, TrainSettings(backend="torch"), "cpu")
    assert not uses_cpu_fused(model, TrainSettings(backend="sdpa"), "cpu")
    with pytest.warns(DeprecationWarning, match="backend='sdpa'"):
        old = TrainSettings(sdpa=True)
    assert old.backend == "sdpa" and not uses_cpu_fused(model, old, "cpu")
    odd = Astromer(AstromerConfig(n_blocks=1, d_model=24, n_heads=1, dff=48))
    assert not uses_cpu_fused(odd, TrainSettings(), "cpu")
    assert uses_bf16(TrainSettings(bf16=True), "cpu")
    assert uses_bf16(TrainSettings(), "cpu") == (resolve_precision() == "bf16")


def test_packed_windows_with_holes_match_the_model():
    """Under rule key the encoder packs the valid observations of each window, wherever they
    sit: a window with hidden observations in its middle (not only padding at its end) gives the
    model's embedding."""
    model = random_model()
    g = torch.Generator().manual_seed(7)
    B, L = 5, 41
    valid = torch.rand(B, L, generator=g) < 0.7
    valid[2] = False
    valid[3, :] = False
    valid[3, 17] = True  # a single valid observation
    t = (torch.rand(B, L, generator=g) * 300 - 150) * valid
    m = torch.randn(B, L, generator=g) * valid
    for precision in ("fp32", "bf16"):
        enc = FusedCpuEncoder(model, precision)
        check(enc(t, m, valid), reference(model, t, m, valid), precision)
        check(enc(t, m, valid, layers=True), reference(model, t, m, valid, layers=True), precision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_attention_packed_equals_padded(isa_level, dtype):
    ext = _ext.cpu_ext()
    g = torch.Generator().manual_seed(8)
    B, L, H, hd = 4, 50, 2, 32
    D = H * hd
    n = torch.tensor([50, 13, 0, 33])
    valid = torch.arange(L)[None] < n[:, None]
    padded = (torch.randn(B * L, 3 * D, generator=g) * 0.5).to(dtype)
    bias = torch.randn(3 * D, generator=g) * 0.1
    out_padded = torch.zeros(B * L, D, dtype=dtype)
    hidden = (~valid).contiguous()  # named: a temporary's memory would be freed before the call
    ext.block_attention(padded.data_ptr(), 3 * D, bias.data_ptr(), hidden.data_ptr(),
                        B, L, H, hd, 0, 0.17, True, dtype == torch.bfloat16,
                        out_padded.data_ptr(), D, 2)
    packed = padded[valid.reshape(-1)].contiguous()
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(n, 0)
    out_packed = torch.full((int(n.sum()), D), 3.0, dtype=dtype)
    ext.block_attention(packed.data_ptr(), 3 * D, bias.data_ptr(), 0, B, L, H, hd, 0, 0.17, True,
                        dtype == torch.bfloat16, out_packed.data_ptr(), D, 2,
                        row_offsets=offsets.data_ptr())
    assert torch.equal(out_packed, out_padded[valid.reshape(-1)])
    with pytest.raises(ValueError, match="rule key"):
        ext.block_attention(packed.data_ptr(), 3 * D, 0, 0, B, L, H, hd, 1, 0.17, False, False,
                            out_packed.data_ptr(), D, 1, row_offsets=offsets.data_ptr())
