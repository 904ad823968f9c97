"""Masked-reconstruction RMSE and R² of a model on held-out curves (probed subset, SPEC section 4
masking, fixed seeds), beside an untrained model of the same configuration as the floor.

    python tools/eval_reconstruction.py MODEL DATA.parquet [--split test] [--band r]
"""
import argparse
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from astromer_fast import Astromer
from astromer_fast.training import TrainSettings, load_training_curves
from astromer_fast.training.data import epoch_windows
from astromer_fast.training.trainer import evaluate
from astromer_fast.weights import load_model

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("data")
p.add_argument("--split", default=None)
p.add_argument("--band", default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()

table = pq.read_table(a.data)
if a.split:
    table = table.filter(pc.equal(table["split"], a.split))
if a.band:
    table = table.filter(pc.equal(table["band"], a.band))
data = load_training_curves(None, table=table, exclude_split=None, curve_filter=None)
w = epoch_windows(data.curves, a.seed)
dev = torch.device(a.device)
model = load_model(a.model).to(dev)
torch.manual_seed(0)
untrained = Astromer(model.config).to(dev)
s = TrainSettings(seed=a.seed)
bf16 = dev.type == "cuda"
out = {"data": a.data, "split": a.split, "band": a.band, "curves": len(data),
       "windows": len(w.n_valid), "model": evaluate(model, w, s, dev, bf16),
       "untrained": evaluate(untrained, w, s, dev, bf16)}
print(json.dumps(out, indent=1))
