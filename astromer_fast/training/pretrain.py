"""Masked-reconstruction pretraining, the loop that produced the packaged preview model.

One random 200-observation window per curve per epoch, SPEC section 4's probed/same/random/masked
composition, the official weighted RMSE, Adam(0.9, 0.98, 1e-9). Batches are drawn in length-sorted
groups and cut to their longest window: padded keys get exactly zero attention weight, so the cut
changes nothing but the cost (most survey curves are far shorter than 200 observations).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from astromer_fast.training.loss import probed_metrics, weighted_rmse


@dataclass
class PretrainSettings:
    batch_size: int = 64
    lr: float = 1e-3
    max_minutes: float = 30.0
    max_steps: int | None = None
    val_fraction: float = 0.02
    val_every: int = 100
    seed: int = 0
    probed_frac: float = 0.5
    same_frac: float = 0.2
    random_frac: float = 0.2
    threads: int | None = None


def read_training_table(paths, exclude_split: str | None = "test") -> pa.Table:
    """Concatenate the (id, band, lightcurve) columns of Parquet files in the shared layout,
    leaving out rows whose ``split`` equals ``exclude_split`` (kept unseen for evaluation)."""
    parts = []
    for path in paths:
        t = pq.read_table(path)
        if exclude_split is not None and "split" in t.column_names:
            t = t.filter(pc.not_equal(t["split"], exclude_split))
        parts.append(t.select(["id", "band", "lightcurve"]).combine_chunks())
    return pa.concat_tables(parts)


def prepare_curves(table: pa.Table, min_obs: int = 5):
    from astromer_fast.data import Curves, basic_clean, official_clean

    curves, _ = basic_clean(Curves.from_arrow(table["lightcurve"]))
    curves, _ = official_clean(curves)
    return curves.take(np.flatnonzero(curves.lengths >= min_obs))


def batches_by_length(n_valid: np.ndarray, batch_size: int, rng, group: int = 32):
    """Shuffled batches whose members have similar lengths: shuffle, then sort within groups of
    ``group`` batches so each batch can be cut to its longest window."""
    order = rng.permutation(len(n_valid))
    span = batch_size * group
    out = []
    for s in range(0, len(order), span):
        chunk = order[s:s + span]
        chunk = chunk[np.argsort(n_valid[chunk], kind="stable")]
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def masked_batch(w, idx, settings: PretrainSettings, rng, device):
    """Tensors of one training batch, cut to its longest window."""
    from astromer_fast.data import apply_probe, probe_masks

    width = max(int(w.n_valid[idx].max()), 1)
    valid = w.valid[idx, :width]
    m = w.m[idx, :width]
    masks = probe_masks(valid, rng, probed_frac=settings.probed_frac,
                        same_frac=settings.same_frac, random_frac=settings.random_frac)
    m_in, hidden = apply_probe(m, valid, masks, rng)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    err = None if w.err is None else as_t(w.err[idx, :width])
    return dict(t=as_t(w.t[idx, :width]), m_in=as_t(m_in), hidden=as_t(hidden), target=as_t(m),
                err=err, probed=as_t(masks.probed), valid=as_t(valid))


@torch.no_grad()
def evaluate(model, w, settings, device, batch_size=256) -> dict:
    """Probed-subset RMSE/R² and the loss on fixed validation windows (masks seeded, so every
    evaluation sees the same task)."""
    model.eval()
    rng = np.random.default_rng(12345)
    preds, targets, probes, losses = [], [], [], []
    for s in range(0, len(w.n_valid), batch_size):
        b = masked_batch(w, np.arange(s, min(s + batch_size, len(w.n_valid))), settings, rng,
                         device)
        pred = model(b["t"], b["m_in"], b["hidden"])
        losses.append(float(weighted_rmse(pred, b["target"], b["err"], b["probed"], b["valid"])))
        preds.append(pred[b["probed"]])
        targets.append(b["target"][b["probed"]])
    model.train()
    y, yh = torch.cat(targets), torch.cat(preds)
    met = probed_metrics(yh[None], y[None], torch.ones_like(y, dtype=torch.bool)[None])
    met["loss"] = float(np.mean(losses))
    return met


def pretrain(paths, out_dir, *, model=None, settings: PretrainSettings | None = None,
             log=print):
    """Pretrain (or continue training) ``model`` on the curves of ``paths``; write the best
    validation model with ``save_pretrained`` into ``out_dir`` and ``metrics.csv`` beside it."""
    from astromer_fast.data import make_windows
    from astromer_fast.model import Astromer

    s = settings or PretrainSettings()
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    curves = prepare_curves(read_training_table(paths))
    n = len(curves)
    perm = rng.permutation(n)
    n_val = max(1, int(s.val_fraction * n))
    val_curves = curves.take(np.sort(perm[:n_val]))
    train_curves = curves.take(np.sort(perm[n_val:]))
    val_w = make_windows(val_curves, mode="random", rng=np.random.default_rng(777))
    log(f"{n} curves ({len(train_curves)} train, {n_val} validation), "
        f"{int(curves.lengths.sum())} observations, prepared in {time.perf_counter() - t0:.1f} s")

    model = (model or Astromer()).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98), eps=1e-9)
    rows, best, step, windows_seen = [], math.inf, 0, 0
    start = time.perf_counter()
    deadline = start + 60 * s.max_minutes
    epoch = 0
    done = False
    while not done:
        w = make_windows(train_curves, mode="random", rng=rng)
        for idx in batches_by_length(w.n_valid, s.batch_size, rng):
            b = masked_batch(w, idx, s, rng, device)
            pred = model(b["t"], b["m_in"], b["hidden"])
            loss = weighted_rmse(pred, b["target"], b["err"], b["probed"], b["valid"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}; refusing the update")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            windows_seen += len(idx)
            out_of_time = time.perf_counter() > deadline or (s.max_steps and step >= s.max_steps)
            if step % s.val_every == 0 or out_of_time:
                met = evaluate(model, val_w, s, device)
                elapsed = time.perf_counter() - start
                row = dict(step=step, epoch=epoch, windows=windows_seen, seconds=round(elapsed, 1),
                           train_loss=loss.item(), val_loss=met["loss"], val_rmse=met["rmse"],
                           val_r2=met["r2"])
                rows.append(row)
                log(json.dumps(row))
                if met["loss"] < best:
                    best = met["loss"]
                    model.save_pretrained(out_dir, metadata={"training": asdict(s), **row,
                                                             "device": str(device)})
                _write_csv(rows, out_dir / "metrics.csv")
            if out_of_time:
                done = True
                break
        epoch += 1
    return rows


def _write_csv(rows, path):
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
