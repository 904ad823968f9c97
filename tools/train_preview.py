"""Train the packaged preview model on the real curves of ../shared/data (CPU, time-boxed).

Every Parquet file of the shared data, the pretraining sets under pretrain/ included, except the
EROS-1 `test` split, which stays unseen for evaluation.
"""
import argparse
import sys
from pathlib import Path

from astromer_fast.training import PretrainSettings, pretrain

p = argparse.ArgumentParser()
p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
p.add_argument("--out", required=True)
p.add_argument("--minutes", type=float, default=45)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--val-every", type=int, default=50)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--init", default=None, help="continue from a save_pretrained directory")
a = p.parse_args()
files = sorted(Path(a.data).glob("*.parquet")) + sorted(Path(a.data).glob("pretrain/*.parquet"))
print("files:", *[str(f) for f in files], sep="\n  ")
sys.stdout.flush()
init = None
if a.init:
    from astromer_fast import from_pretrained

    init = from_pretrained(a.init)
pretrain(files, a.out, model=init,
         settings=PretrainSettings(max_minutes=a.minutes, batch_size=a.batch_size, lr=a.lr,
                                   val_every=a.val_every, threads=2),
         log=lambda s: print(s, flush=True))

# Model card beside the weights: what it was trained on, how long, where, and how well.
import csv
import json
import platform

import torch

rows = list(csv.DictReader(open(Path(a.out) / "metrics.csv")))
best = min(rows, key=lambda r: float(r["val_loss"]))
last = rows[-1]
doc = json.loads((Path(a.out) / "config.json").read_text())
card = f"""# astromer2-preview

A **preview** Astromer 2 (default configuration, 3,953,410 parameters) pretrained with
`astromer_fast`'s own masked-reconstruction loop (`tools/train_preview.py`), **on a 2-core CPU**
({platform.processor() or platform.machine()}, torch {torch.__version__}), for a
{a.minutes:g}-minute wall-clock budget shared with other jobs: {last['windows']} windows seen
({last['step']} steps of {a.batch_size}{', continued from ' + a.init if a.init else ''}), far less than the published model's training. It exists so
that `astromer_fast.embed` works out of the box; a GPU-trained default replaces it later.

| | |
|---|---|
| data | every Parquet file of the project's real-data kit (EROS-1 train split, MACHO, ZTF ALeRCE, ZTF SN Ia, CRTS MANTRA non-transients, Pantheon+ SNe Ia, SLSNe, ZTF BTS, CSS periodic); the EROS-1 `test` split was left out |
| preprocessing | non-finite/duplicate cleaning, official cleaning (0 < err < 1, 1st..99th magnitude percentiles), curves with >= 5 observations; one random 200-observation window per curve per epoch |
| task | 50% probed = 20% same + 20% of the rest random + masked (SPEC.md section 4), official weighted RMSE |
| optimiser | Adam(lr {a.lr:g}, betas 0.9/0.98, eps 1e-9), batch {a.batch_size}, gradient clipping 1.0 |
| kept checkpoint | step {best['step']} (lowest validation loss) |
| validation (2% of curves held out, fixed random windows and masks) | loss {float(best['val_loss']):.4f}, probed RMSE {float(best['val_rmse']):.4f}, probed R² {float(best['val_r2']):.4f} |

The full learning curve is in `metrics.csv`. Treat embeddings from this model as a smoke test of
the pipeline, not as science-grade features.
"""
(Path(a.out) / "README.md").write_text(card)
print(card)
