"""The fused training forward (``astromer_fast.model.fused_gpu_train``, ``gpu_path="fused"``)
against the plain model: the same loss and the same gradient on every parameter, on the CPU
(float64 for exactness, float32 through ``train()``, bfloat16 against the model under autocast)."""

from __future__ import annotations

import pytest
import torch

from astromer_fast.model import Astromer, AstromerConfig
from astromer_fast.model.fused_gpu_train import fused_train_encode
from astromer_fast.training import TrainSettings, load_training_curves, train
from astromer_fast.training.loss import weighted_rmse_reference
from astromer_fast.training.trainer import (
    GPU_TRAIN_PATH_ENV,
    gpu_train_path,
    training_encoder,
    uses_cpu_fused,
)

SMALL = dict(n_blocks=2, d_model=32, n_heads=2, dff=48)


def small_model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return Astromer(AstromerConfig(**{**SMALL, "dropout": 0.0, **kw})).to(dtype)


def batch(dtype=torch.float64, B=5, L=16, seed=1):
    """Windows with padding, hidden observations, one fully padded and one fully hidden."""
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(torch.rand(B, L, generator=g, dtype=dtype), 1) * 20 - 100
    m = torch.randn(B, L, generator=g, dtype=dtype)
    n_valid = torch.tensor([L, L - 7, 0, 3, L])[:B]
    valid = torch.arange(L)[None] < n_valid[:, None]
    hidden = ~valid | (torch.rand(B, L, generator=g) < 0.3)
    hidden[3] = True  # valid observations, all hidden
    err = torch.rand(B, L, generator=g, dtype=dtype) * 0.1 + 0.01
    probed = valid & (torch.rand(B, L, generator=g) < 0.5)
    probed[4, 0] = True
    return dict(t=t, m=m, hidden=hidden, valid=valid, err=err, probed=probed)


def loss_and_grads(model, b, **kw):
    model.zero_grad(set_to_none=True)
    pred = model(b["t"], b["m"], b["hidden"], **kw)
    loss = weighted_rmse_reference(pred.to(b["m"].dtype), b["m"], b["err"], b["probed"],
                                   b["valid"])
    loss.backward()
    return pred.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["key", "query_or_key_plus1"])
@pytest.mark.parametrize("leak", [True, False])
def test_float64_loss_and_every_gradient_equal_the_plain_model(rule, leak):
    model = small_model(mask_rule=rule, use_leak=leak, use_token=leak)
    b = batch()
    pred_p, loss_p, grads_p = loss_and_grads(model, b, backend="torch")
    pred_f, loss_f, grads_f = loss_and_grads(model, b, backend="torch", fused_train=torch.float64)
    torch.testing.assert_close(pred_f, pred_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-12, atol=0)
    assert_same_gradients(grads_f, grads_p, torch.float64, 1e-7)


def assert_same_gradients(grads, expected, dtype, tol):
    """Every parameter's gradient within ``tol`` of the largest gradient: gradients that are zero
    in exact arithmetic (the key bias's) come out as rounding noise, in relative terms anything."""
    assert set(grads) == set(expected)
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, g in expected.items():
        assert grads[name] is not None and grads[name].dtype == dtype, name
        torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * scale, msg=name)


def test_fp32_windows_with_every_key_hidden_get_the_exact_gradient(monkeypatch):
    """Below float64 such a window's logits all round to -1e9: uniform weights, which do not
    depend on q and k. SDPA's own backward gets that gradient wrong (weights of 1); both the
    fused forward and the plain model's ``sdpa`` attention route those windows around it. The oracle is the plain model whose attention
    passes no gradient to q and k there."""
    import astromer_fast.model.astromer as astromer_module
    from astromer_fast.kernels.masked_attention import masked_attention_reference

    def uniform_where_all_hidden(q, k, v, key_hidden, rule, backend=None):
        full = key_hidden.all(1)[:, None, None, None]
        q, k = torch.where(full, q.detach(), q), torch.where(full, k.detach(), k)
        return masked_attention_reference(q, k, v, key_hidden, rule)[0]

    model = small_model(torch.float32)
    b = batch(torch.float32)
    b["probed"][3] = b["valid"][3]  # the fully hidden window enters the loss
    with monkeypatch.context() as patch:
        patch.setattr(astromer_module, "masked_attention", uniform_where_all_hidden)
        _, loss_p, grads_p = loss_and_grads(model, b, backend="torch")
    _, loss_f, grads_f = loss_and_grads(model, b, backend="torch", fused_train=torch.float32)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=0)
    assert_same_gradients(grads_f, grads_p, torch.float32, 1e-5)


def test_encoder_output_and_dropout_masks_follow_the_model():
    model = small_model(dropout=0.2).train()
    b = batch()
    torch.manual_seed(7)
    plain = model.encode(b["t"], b["m"], b["hidden"], backend="torch").last
    torch.manual_seed(7)
    fused = fused_train_encode(model, b["t"], b["m"], b["hidden"], backend="torch")
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.manual_seed(8)
    assert not torch.allclose(fused_train_encode(model, b["t"], b["m"], b["hidden"],
                                                 backend="torch"), plain)


def test_bf16_matches_the_model_under_autocast():
    model = small_model(torch.float32, d_model=64, n_heads=4)
    b = batch(torch.float32, L=32)
    b["probed"][3] = b["valid"][3]  # the fully hidden window enters the loss
    with torch.no_grad():
        exact = model(b["t"], b["m"], b["hidden"], backend="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred_p, loss_p, grads_p = loss_and_grads(model, b, backend="sdpa")
    pred_f, loss_f, grads_f = loss_and_grads(model, b, fused_train=torch.bfloat16)
    assert pred_f.dtype == pred_p.dtype == torch.bfloat16
    # Both round like bf16; they are closer to each other than either is to float32.
    gap = (pred_f.float() - pred_p.float()).abs().max()
    assert gap <= (pred_p.float() - exact).abs().max() and gap < 0.05
    assert abs(loss_f - loss_p) < 1e-2 * loss_p
    flat = lambda g: torch.cat([x.flatten() for x in g.values()])  # noqa: E731
    assert all(g.dtype == torch.float32 for g in grads_f.values())
    assert torch.nn.functional.cosine_similarity(flat(grads_f), flat(grads_p), dim=0) > 0.999


def test_fused_train_options_are_checked():
    model = small_model(torch.float32)
    b = batch(torch.float32)
    with pytest.raises(ValueError, match="bfloat16 or in the parameters' dtype"):
        model(b["t"], b["m"], b["hidden"], fused_train=torch.float16)
    with pytest.raises(ValueError, match="ask for one"):
        model(b["t"], b["m"], b["hidden"], fused_train=torch.float32, cpu_fused="fp32")
    with pytest.raises(TypeError, match="return_layers"):
        model(b["t"], b["m"], b["hidden"], fused_train=torch.float32, return_layers=True)


# ------------------------------------------------------------------------------------------------
# Through train()
# ------------------------------------------------------------------------------------------------
def test_gpu_path_setting_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="gpu_path must be one of"):
        TrainSettings(gpu_path="fast")
    monkeypatch.delenv(GPU_TRAIN_PATH_ENV, raising=False)
    model = small_model(torch.float32)
    s = TrainSettings()
    # No GPU is needed to resolve a CUDA device's choice.
    assert gpu_train_path(s, "cuda") == "plain" and gpu_train_path(s, "cpu") is None
    assert training_encoder(model, TrainSettings(gpu_path="fused"), "cpu") == "fused_train"
    assert training_encoder(model, TrainSettings(gpu_path="plain"), "cpu") == "plain"
    assert not uses_cpu_fused(model, TrainSettings(gpu_path="plain"), "cpu")
    monkeypatch.setenv(GPU_TRAIN_PATH_ENV, "fused")
    assert gpu_train_path(s, "cuda") == "fused"
    assert gpu_train_path(s, "cpu") is None  # the variable is about CUDA devices
    assert gpu_train_path(TrainSettings(gpu_path="plain"), "cuda") == "plain"  # the setting wins
    monkeypatch.setenv(GPU_TRAIN_PATH_ENV, "fastest")
    with pytest.raises(ValueError, match=GPU_TRAIN_PATH_ENV):
        gpu_train_path(s, "cuda")


def test_cli_gpu_path_reaches_the_settings():
    import argparse

    from astromer_fast.training.cli import _settings, add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["pretrain", "data", "-o", "out", "--gpu-path", "fused"])
    assert _settings(args).gpu_path == "fused"
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "data", "-o", "out", "--gpu-path", "fast"])


def test_training_steps_equal_the_plain_path_in_fp32():
    from test_training import synthetic_table

    data = load_training_curves(None, table=synthetic_table(16, lo=20, hi=90),
                                exclude_split=None, curve_filter=None)
    base = dict(batch_size=8, max_steps=4, val_every=2, warmup_steps=1, patience=None,
                checkpoint_every=10**6, bf16=False, seed=3)
    runs = {}
    for path in ("plain", "fused"):
        torch.manual_seed(0)
        model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=32, dropout=0.1))
        runs[path] = train(model, data, data, None, log=None, device="cpu",
                           settings=TrainSettings(gpu_path=path, **base))
    a, b = runs["plain"], runs["fused"]
    assert len(a.history) == len(b.history) == 2
    for ra, rb in zip(a.history, b.history):
        for key in ("train_loss", "val_loss", "val_rmse"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), key


# ------------------------------------------------------------------------------------------------
# CUDA graphs (TrainSettings.cuda_graphs)
# ------------------------------------------------------------------------------------------------
def test_capturable_loss_equals_the_reference():
    from astromer_fast.training.cuda_graphs import graph_safe_weighted_rmse

    b = batch()
    b["probed"][0] = False  # a window without probed observations drops out of the mean
    pred = torch.randn_like(b["m"], requires_grad=True)
    ref_pred = pred.detach().clone().requires_grad_()
    loss = graph_safe_weighted_rmse(pred, b["m"], b["err"], b["probed"], b["valid"])
    ref = weighted_rmse_reference(ref_pred, b["m"], b["err"], b["probed"], b["valid"])
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=1e-10, atol=1e-14)


def _train_tiny(data, device, **kw):
    torch.manual_seed(0)
    model = Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=32, dropout=0.0))
    msgs = []
    settings = TrainSettings(batch_size=8, max_steps=3, val_every=10**6, warmup_steps=1,
                             patience=None, checkpoint_every=10**6, seed=3, **kw)
    res = train(model, data, None, None, log=msgs.append, settings=settings, device=device)
    return res, msgs


def test_cuda_graphs_on_the_cpu_say_why_and_train_eagerly():
    from test_training import synthetic_table

    data = load_training_curves(None, table=synthetic_table(12, lo=20, hi=60),
                                exclude_split=None, curve_filter=None)
    eager, _ = _train_tiny(data, "cpu", gpu_path="fused", bf16=False)
    graphed, msgs = _train_tiny(data, "cpu", gpu_path="fused", bf16=False, cuda_graphs=True)
    assert [m for m in msgs if "cuda_graphs: CUDA graphs need a CUDA device" in m]
    assert graphed.history[-1]["train_loss"] == eager.history[-1]["train_loss"]
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        TrainSettings(cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA device; this machine has none")
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_cuda_graphs_train_like_eager_steps(path):
    from test_training import synthetic_table

    data = load_training_curves(None, table=synthetic_table(24, lo=20, hi=90),
                                exclude_split=None, curve_filter=None)
    eager, _ = _train_tiny(data, "cuda", gpu_path=path)
    graphed, msgs = _train_tiny(data, "cuda", gpu_path=path, cuda_graphs=True)
    assert not [m for m in msgs if "CUDA graphs off" in m], msgs
    assert graphed.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"],
                                                              rel=1e-2)
