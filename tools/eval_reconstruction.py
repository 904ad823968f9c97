"""Masked-reconstruction RMSE and R² of a model on held-out curves (probed subset, SPEC section 4
masking, fixed seed), beside an untrained model of the same configuration as the floor.

    python tools/eval_reconstruction.py MODEL DATA.parquet [--split test] [--band r]
"""
import argparse
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from astromer_fast import Astromer
from astromer_fast.data import make_windows
from astromer_fast.training.pretrain import PretrainSettings, evaluate, prepare_curves
from astromer_fast.weights import load_model

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("data")
p.add_argument("--split", default=None)
p.add_argument("--band", default=None)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()

table = pq.read_table(a.data)
if a.split:
    table = table.filter(pc.equal(table["split"], a.split))
if a.band:
    table = table.filter(pc.equal(table["band"], a.band))
curves = prepare_curves(table)
w = make_windows(curves, mode="random", rng=np.random.default_rng(a.seed))
model = load_model(a.model)
torch.manual_seed(0)
untrained = Astromer(model.config)
s = PretrainSettings()
out = {"data": a.data, "split": a.split, "band": a.band, "curves": len(curves),
       "windows": len(w.n_valid),
       "model": evaluate(model, w, s, torch.device("cpu")),
       "untrained": evaluate(untrained, w, s, torch.device("cpu"))}
print(json.dumps(out, indent=1))
