"""Pretraining / finetuning loop: masks, loss, learning, exact resume, data parallel, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from astromer_fast.data import Curves, probe_counts
from astromer_fast.model import Astromer, AstromerConfig
from astromer_fast.training import (
    CheckpointError,
    CurveFilter,
    MaskFractions,
    TrainSettings,
    finetune,
    load_training_curves,
    masked_inputs,
    pretrain,
    read_checkpoint,
    train,
)
from astromer_fast.training.data import curve_moments, filter_mask, length_batches
from astromer_fast.training.loss import weighted_rmse, weighted_rmse_reference
from astromer_fast.training.masking import step_generator

TINY = dict(n_blocks=1, d_model=64, n_heads=4, dff=64, dropout=0.0)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Astromer(AstromerConfig(**{**TINY, **kw}))


def synthetic_table(n=24, seed=0, lo=30, hi=260, with_nan=False):
    """Shared-layout table of periodic curves with noise (irregular sampling)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        t = np.sort(rng.uniform(0, 500, k)) + 50000
        period = rng.uniform(0.3, 30)
        m = 15 + rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * t / period) + rng.normal(0, 0.03, k)
        e = rng.uniform(0.01, 0.1, k)
        if with_nan and i % 3 == 0:
            m[::7] = np.nan
            t[1] = np.inf
        rows.append([{"time": float(a), "mag": float(b), "magerr": float(c)}
                     for a, b, c in zip(t, m, e)])
    lc_type = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                                  ("magerr", pa.float32())]))
    return pa.table({"id": [f"obj{i}" for i in range(n)], "band": ["r"] * n,
                     "split": ["test" if i % 6 == 5 else "train" for i in range(n)],
                     "lightcurve": pa.array(rows, lc_type)})


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fr", [MaskFractions(), MaskFractions(0.5, 0.1, 0.1 / 0.9),
                                MaskFractions(0.3, 0.7, 0.5)])
def test_mask_composition_counts_exact(fr):
    B, L = 64, 200
    n_valid = torch.tensor(np.r_[0, 1, 2, 5, 7, 199, 200, np.random.default_rng(1).integers(
        0, 201, B - 7)])
    valid = torch.arange(L)[None, :] < n_valid[:, None]
    m = torch.randn(B, L) * valid
    m_in, hidden, probed = masked_inputs(m, valid, fr, step_generator(3, 0, "cpu"))
    n_p, n_s, n_r, n_m = probe_counts(n_valid.numpy(), fr.probed, fr.same, fr.random)
    assert (probed.sum(-1).numpy() == n_p).all()
    assert (probed & ~valid).sum() == 0
    masked = hidden & valid
    assert (masked.sum(-1).numpy() == n_m).all()
    assert (masked & ~probed).sum() == 0
    assert (m_in[hidden] == 0).all()
    # "same" positions keep their value; the non-probed valid ones too.
    changed = (m_in != m) & valid & ~hidden
    assert (changed & ~probed).sum() == 0
    assert (changed.sum(-1).numpy() <= n_r).all()
    # Random replacements are magnitudes of the same window's valid observations.
    for b in range(B):
        vals = set(m[b, valid[b]].tolist())
        for x in m_in[b, changed[b]].tolist():
            assert x in vals


def test_masks_paper_example_and_determinism():
    valid = torch.ones(4, 200, dtype=torch.bool)
    m = torch.randn(4, 200)
    a = masked_inputs(m, valid, MaskFractions(), step_generator(0, 7, "cpu"))
    b = masked_inputs(m, valid, MaskFractions(), step_generator(0, 7, "cpu"))
    c = masked_inputs(m, valid, MaskFractions(), step_generator(0, 8, "cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    # SPEC: with 200 valid obs, 100 probed = 20 same + 16 random + 64 masked.
    assert a[2].sum(-1).tolist() == [100] * 4
    assert (a[1] & valid).sum(-1).tolist() == [64] * 4


def test_loss_and_gradient_match_reference():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 50, generator=g, requires_grad=True)
    target = torch.randn(6, 50, generator=g)
    err = torch.rand(6, 50, generator=g) * 0.2 + 0.01
    valid = torch.arange(50)[None] < torch.tensor([50, 40, 3, 0, 17, 50])[:, None]
    probed = valid & (torch.rand(6, 50, generator=g) < 0.5)
    ref_pred = pred.detach().double().requires_grad_()
    ref = weighted_rmse_reference(ref_pred, target.double(), err, probed, valid)
    ref.backward()
    loss = weighted_rmse(pred, target, err, probed, valid)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    torch.testing.assert_close(pred.grad.double(), ref_pred.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def test_paper_filter_drops_noise_keeps_variables():
    rng = np.random.default_rng(0)
    t = np.arange(300.0)
    noise = 15 + rng.normal(0, 0.03, 300)       # Gaussian, small spread: noise-like
    sine = 15 + 0.5 * np.sin(t / 5)               # std ~0.35: variable
    flare = 15 + rng.normal(0, 0.02, 300)
    flare[100:103] -= 2.0                         # strong skew and kurtosis, small std
    c = Curves.from_arrays([t, t, t], [noise, sine, flare], [np.full(300, 0.05)] * 3)
    std, skew, kurt = curve_moments(c)
    assert abs(kurt[0]) < 1 and abs(skew[0]) < 0.5 and kurt[2] > 10
    assert filter_mask(c, CurveFilter()).tolist() == [False, True, True]
    assert filter_mask(c, CurveFilter(rule="all")).tolist() == [False, False, True]


def test_load_cleans_bad_values_and_excludes_split():
    tbl = synthetic_table(24, with_nan=True)
    data = load_training_curves(None, table=tbl, curve_filter=None)
    assert data.counts["split=test"] == 4
    assert len(data) == 20
    assert np.isfinite(data.curves.time).all() and np.isfinite(data.curves.mag).all()
    assert (data.curves.err > 0).all() and (data.curves.err < 1).all()
    assert "obj5" not in set(data.ids)


def test_length_batches_cover_each_window_once():
    n_valid = np.random.default_rng(0).integers(1, 201, 1000)
    batches = length_batches(n_valid, 64, seed=1)
    allidx = np.concatenate(batches)
    assert sorted(allidx.tolist()) == list(range(1000))
    assert batches[0].tolist() == length_batches(n_valid, 64, seed=1)[0].tolist()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def test_tiny_model_overfits_a_few_windows():
    tbl = synthetic_table(4, lo=40, hi=60, seed=3)
    data = load_training_curves(None, table=tbl, exclude_split=None, curve_filter=None)
    model = tiny_model()
    s = TrainSettings(batch_size=4, lr=3e-3, max_steps=300, warmup_steps=20, val_every=50,
                      patience=None, same_frac=1.0, random_frac=0.0, schedule="constant",
                      checkpoint_every=10_000)
    # same_frac=1: every probed value is visible, so the task is an identity map to learn.
    from astromer_fast.training.data import epoch_windows
    from astromer_fast.training.trainer import evaluate

    before = evaluate(model, epoch_windows(data.curves, 0), s, torch.device("cpu"), False)
    res = train(model, data, data, None, settings=s, log=None)
    last = res.history[-1]
    assert last["val_loss"] < 0.02 and last["val_loss"] < 0.1 * before["loss"]
    assert last["val_r2"] > 0.99


def _settings(**kw):
    base = dict(batch_size=8, lr=1e-3, max_steps=12, warmup_steps=3, val_every=4,
                checkpoint_every=5, patience=None, val_fraction=0.2, seed=5)
    return TrainSettings(**{**base, **kw})


def test_resume_equals_uninterrupted(tmp_path):
    tbl = synthetic_table(30)
    full = pretrain(tbl, tmp_path / "full", model=tiny_model(dropout=0.1), settings=_settings(),
                    curve_filter=None, log=None)
    # Killed at step 7 (the last checkpoint is at step 5), then resumed to 12.
    def crash(progress):
        if progress.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tbl, tmp_path / "cut", model=tiny_model(dropout=0.1), settings=_settings(),
                 curve_filter=None, log=None, on_step=crash)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint")["step"] == 5
    resumed = pretrain(tbl, tmp_path / "cut", model=tiny_model(seed=99, dropout=0.1),
                       settings=_settings(), resume=True, curve_filter=None, log=None)
    for (n1, p1), (n2, p2) in zip(full.model.state_dict().items(),
                                  resumed.model.state_dict().items()):
        assert torch.equal(p1, p2), n1
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "windows_per_s")}
                          for r in rows]  # noqa: E731
    a = [r for r in strip(full.history) if r["step"] > 5]
    b = [r for r in strip(resumed.history) if r["step"] > 5]
    assert a == b
    assert (tmp_path / "cut" / "metrics.csv").is_file()
    assert (tmp_path / "cut" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    tbl = synthetic_table(12)
    pretrain(tbl, tmp_path / "run", model=tiny_model(), settings=_settings(max_steps=5),
             curve_filter=None, log=None)
    ck = tmp_path / "run" / "checkpoint"
    assert read_checkpoint(ck)["step"] == 5
    blob = bytearray((ck / "optimizer.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (ck / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: corrupt"):
        pretrain(tbl, tmp_path / "run", model=tiny_model(), settings=_settings(), resume=True,
                 curve_filter=None, log=None)
    (ck / "trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(tbl, tmp_path / "none", model=tiny_model(), settings=_settings(), resume=True,
                 curve_filter=None, log=None)


def test_non_finite_step_is_refused(tmp_path):
    tbl = synthetic_table(8)
    data = load_training_curves(None, table=tbl, exclude_split=None, curve_filter=None)
    model = tiny_model()
    with torch.no_grad():
        model.head.proj.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    msgs = []
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        train(model, data, None, None, settings=_settings(max_bad_steps=3), log=msgs.append)
    assert any("update refused" in m for m in msgs)
    for k, v in model.state_dict().items():  # no update was applied
        assert torch.equal(v, before[k]) or torch.isnan(v).all(), k


def test_finetune_api_returns_model_and_history():
    tbl = synthetic_table(16)
    model = tiny_model()
    w0 = model.head.proj.weight.detach().clone()
    res = finetune(model, tbl, TrainSettings(batch_size=8, max_steps=6, val_every=3,
                                             warmup_steps=1, val_fraction=0.25), log=None)
    assert res.model is model and len(res.history) == 2
    assert {"step", "train_loss", "val_loss", "val_rmse", "val_r2"} <= set(res.history[0])
    assert not torch.equal(w0, model.head.proj.weight)


# ------------------------------------------------------------------------------------------------
# Data parallel: 2 CPU processes (gloo) == 1 process on the concatenated batch
# ------------------------------------------------------------------------------------------------
_DDP_WORKER = r"""
import os, sys, json, torch, numpy as np
import torch.distributed as dist
sys.path.insert(0, os.environ["TEST_DIR"])
from test_training import synthetic_table, tiny_model, TrainSettings
from astromer_fast.training import load_training_curves, train
out = sys.argv[1]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
torch.set_num_threads(1)
data = load_training_curves(None, table=synthetic_table(20), exclude_split=None, curve_filter=None)
s = TrainSettings(batch_size=8, max_steps=1, val_every=1000, clip_norm=1e9, warmup_steps=0,
                  patience=None, seed=2, schedule="constant")
# First Adam step: exp_avg = (1 - beta1) * grad, so the checkpoint carries the gradient.
train(tiny_model(), data, None, out, settings=s, log=None)
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _run_worker(script, out, world, tmp_path):
    env = {**os.environ, "TEST_DIR": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", str(script), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_ddp_two_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_WORKER)
    _run_worker(script, tmp_path / "one", 1, tmp_path)
    _run_worker(script, tmp_path / "two", 2, tmp_path)
    a = load_file(str(tmp_path / "one" / "checkpoint" / "optimizer.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "optimizer.safetensors"))
    grads = [k for k in a if k.endswith("exp_avg")]
    assert grads and set(a) == set(b)
    for k in grads:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-9, msg=k)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_pretrain_resume_and_finetune(tmp_path):
    from astromer_fast.cli import main

    data = tmp_path / "curves.parquet"
    import pyarrow.parquet as pq

    pq.write_table(synthetic_table(16), data)
    out = tmp_path / "run"
    common = ["--batch-size", "8", "--val-every", "2", "--checkpoint-every", "2",
              "--warmup-steps", "1", "--no-paper-filter"]
    assert main(["pretrain", str(data), "-o", str(out), "--max-steps", "2", *common]) == 0
    assert main(["pretrain", str(data), "-o", str(out), "--max-steps", "4", "--resume",
                 *common]) == 0
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 4
    assert (out / "config.json").is_file() and (out / "metrics.csv").is_file()
    ft = tmp_path / "ft"
    assert main(["finetune", str(data), "-o", str(ft), "--model", str(out), "--max-steps", "2",
                 "--batch-size", "8", "--val-every", "1"]) == 0
    assert (ft / "model.safetensors").is_file()
    assert main(["pretrain", str(data), "-o", str(out)]) == 2  # no budget: refused


@pytest.mark.parametrize("cmd", ["pretrain", "finetune"])
def test_cli_help(cmd):
    r = subprocess.run([sys.executable, "-m", "astromer_fast", cmd, "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout and "torchrun" in r.stdout
