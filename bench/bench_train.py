"""Training-loop throughput: ``astromer_fast.training.train`` with the default kernels beside the
same loop on the reference PyTorch model, same data, same machine, one run.

    python bench/bench_train.py                      # CPU: real curves if ../shared/data exists
    python bench/bench_train.py --device cuda --batch-size 512 --steps 300

Both variants run the whole loop (windows, device-side masks, forward, loss, backward, clipping,
Adam) for ``--steps`` steps after ``--warmup`` untimed ones; windows/s counts trained windows.
The reference variant forces ``backend="torch"`` for every op (on CUDA its attention is PyTorch's
SDPA with the key mask: the fast reference). Data: the shared kit's curves when present (as the
default model was trained), else generated survey-like curves.
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
    variants = [("astromer_fast default kernels", base),
                ("reference PyTorch model (backend torch)", replace(base, backend="torch"))]
    print(f"training loop, {a.device} ({torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; batch {bs}, "
          f"{steps} timed steps; {source}")
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
            rows.append(dict(variant=name, windows_per_s=(w1 - w0) / (t1 - t0)))
        except Exception as e:  # noqa: BLE001 - a failing variant is a row, not the end
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {e}"))
    ref = rows[1].get("windows_per_s")
    print(f"{'variant':45s} {'windows/s':>10s} {'ratio':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:45s} FAILED: {r['error']}")
        else:
            ratio = r["windows_per_s"] / ref if ref else float("nan")
            print(f"{r['variant']:45s} {r['windows_per_s']:10.1f} {ratio:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=a.device, batch_size=bs, steps=steps,
                                                source=source, rows=rows), indent=1))


if __name__ == "__main__":
    main()
