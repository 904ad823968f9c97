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
a = p.parse_args()
files = sorted(Path(a.data).glob("*.parquet")) + sorted(Path(a.data).glob("pretrain/*.parquet"))
print("files:", *[str(f) for f in files], sep="\n  ")
sys.stdout.flush()
pretrain(files, a.out, settings=PretrainSettings(max_minutes=a.minutes, batch_size=a.batch_size,
                                                 val_every=a.val_every, threads=2),
         log=lambda s: print(s, flush=True))
