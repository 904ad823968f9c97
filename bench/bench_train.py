"""Training-loop throughput: ``astromer_fast.training.train`` with each encoder and kernel choice
beside the eager PyTorch model with SDPA, same data, same machine, one run.

    python bench/bench_train.py                      # CPU: real curves if ../shared/data exists
    python bench/bench_train.py --device cuda --batch-size 512 --steps 300

Every variant runs the whole loop (windows, device-side masks, forward, loss, backward, clipping,
Adam) for ``--steps`` steps after ``--warmup`` untimed ones; windows/s counts trained windows.
Ratios are against the first row: the plain model (bf16 autocast on CUDA) with every op in
PyTorch and the attention through SDPA with the key mask (``backend="sdpa"``), the eager reference
of the training-speed goal. The others: the fused training forward (``gpu_path="fused"``,
``astromer_fast.model.fused_gpu_train``), the loop's defaults, and the reference math
(``backend="torch"``: explicit softmax attention); on CUDA also the fused forward replayed from
CUDA graphs (``cuda_graphs=True``; its timed steps include the capture of each batch width they
meet first). Rows print as they finish and the JSON is rewritten after each, so a run cut short
keeps what it measured. Data: the shared kit's curves when present (as the default model was
trained), else generated survey-like curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.data import Curves
from astromer_fast.training import TrainSettings, load_training_curves, train


def generated(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 400, n)
    total = int(lengths.sum())
    c = Curves(58000 + np.cumsum(rng.uniform(0.1, 2, total)), rng.normal(18, 0.3, total),
               rng.uniform(0.01, 0.1, total), np.concatenate([[0], np.cumsum(lengths)]))
    return pa.table({"id": [f"c{i}" for i in range(n)], "lightcurve": c.to_arrow()})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=os.environ.get("ASTROMER_FAST_SHARED_DATA",
                                                    str(Path(__file__).resolve().parents[2]
                                                        / "shared" / "data")))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    bs = a.batch_size or (512 if cuda else 32)
    steps = a.steps or (200 if cuda else 20)
    files = sorted(Path(a.data).glob("pretrain/*.parquet")) if Path(a.data).is_dir() else []
    if files:
        data = load_training_curves(files, curve_filter=None)
        source = "shared data: " + ", ".join(f.name for f in files)
    else:
        data = load_training_curves(None, table=generated(4 * bs * (steps + a.warmup)),
                                    curve_filter=None)
        source = "generated curves (20-400 obs)"
    base = TrainSettings(batch_size=bs, max_steps=a.warmup + steps, val_every=10**9,
                         warmup_steps=10, checkpoint_every=10**9, patience=None)
    variants = [("plain model + SDPA (backend sdpa)", replace(base, backend="sdpa", gpu_path="plain")),
                ("fused training forward (gpu_path fused)", replace(base, gpu_path="fused")),
                *([("fused + CUDA graphs (cuda_graphs)",
                    replace(base, gpu_path="fused", cuda_graphs=True))] if cuda else []),
                ("astromer_fast default kernels", base),
                ("reference PyTorch model (backend torch)",
                 replace(base, backend="torch", gpu_path="plain"))]
    print(f"training loop, {a.device} ({torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; batch {bs}, "
          f"{steps} timed steps; {source}")
    print(f"{'variant':45s} {'windows/s':>10s} {'vs sdpa':>7s}", flush=True)
    rows = []
    for name, s in variants:
        torch.manual_seed(0)
        model = Astromer(AstromerConfig(n_blocks=a.blocks))
        marks = []

        def on_step(progress):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), progress.windows))

        try:
            train(model, data, None, None, settings=s, device=a.device, log=None,
                  on_step=on_step)
            (t0, w0), (t1, w1) = marks[a.warmup - 1], marks[-1]
            row = dict(variant=name, windows_per_s=(w1 - w0) / (t1 - t0))
        except Exception as e:  # noqa: BLE001 - a failing variant is a row, not the end
            row = dict(variant=name, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        ref = rows[0].get("windows_per_s")
        if "error" in row:
            print(f"{name:45s} FAILED: {row['error']}", flush=True)
        else:
            row["ratio_vs_sdpa"] = row["windows_per_s"] / ref if ref else None
            ratio = row["ratio_vs_sdpa"] if ref else float("nan")
            print(f"{name:45s} {row['windows_per_s']:10.1f} {ratio:7.2f}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(dict(device=a.device, batch_size=bs, steps=steps,
                                                    source=source, rows=rows), indent=1))


if __name__ == "__main__":
    main()
