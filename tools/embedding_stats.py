"""Mean, per-channel spread and whitening matrix of a model's embeddings on its own pretraining
curves, per layer, stored with the model so that ``embed(..., standardize=True)`` /
``astromer-fast embed --standardize`` can whiten them (``astromer_fast.embedding.standardize``).

    python tools/embedding_stats.py astromer_fast/weights/models/astromer2-base \\
        --data ../shared/data --curves 4000

The sample: ``--curves`` rows drawn uniformly at random from every Parquet file of the data kit
the packaged model was pretrained on (``DATA/*.parquet`` and ``DATA/pretrain/*.parquet``), the
EROS-1 ``test`` split left out (it is the held-out evaluation set). Curves go through ``embed``
itself (its cleaning, overlapping windows), so the statistics describe what users get: in fp32
for the statistics, and again in bf16, whose difference from fp32 is the rounding noise that the
whitening must not amplify.
Writes ``MODEL/embedding_stats.safetensors`` and prints what it wrote. ``--cache FILE.npz`` keeps
the sample's layer means, and reuses them when the file exists (same model, curves and seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import astromer_fast
from astromer_fast.embedding.standardize import save_stats, stats_from_layers
from astromer_fast.weights import load_model

REPO = Path(__file__).resolve().parents[1]


def sample_pretraining_rows(data: Path, n: int, seed: int, files=None) -> tuple[pa.Table, dict]:
    """``n`` rows drawn uniformly from the kit's files (or ``files``; test split excluded), with
    the count taken from each file."""
    if files is None:
        files = sorted(data.glob("*.parquet")) + sorted(data.glob("pretrain/*.parquet"))
    tables = []
    for f in files:
        t = pq.read_table(f)
        if "split" in t.column_names:
            t = t.filter(pc.fill_null(pc.not_equal(t["split"], "test"), True))
        tables.append(t.select(["id", "band", "lightcurve"]).append_column(
            "file", pa.array([f.name] * t.num_rows)))
    everything = pa.concat_tables(tables)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(everything.num_rows, min(n, everything.num_rows), replace=False))
    sample = everything.take(pa.array(pick))
    per_file = {k: int(v) for k, v in zip(*np.unique(sample["file"].to_numpy(
        zero_copy_only=False), return_counts=True))}
    # Ids are not unique across files: make them so (embed keeps one row per (id, band)).
    ids = pc.binary_join_element_wise(sample["file"], sample["id"], "/")
    return (pa.table({"id": ids, "band": sample["band"], "lightcurve": sample["lightcurve"]}),
            {"rows_available": everything.num_rows, "per_file": per_file})


def _layer_means(table, model, precision):
    res = astromer_fast.embed(table, model=model, layers=True, precision=precision,
                              progress=False)
    flat = res["layers"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    return res["id"].to_pylist(), np.asarray(flat).reshape(
        res.num_rows, model.config.n_blocks + 1, model.config.d_model)


def sample_layers(model, data, curves: int, seed: int = 0, files=None, cache=None):
    """(fp32 layer means (N, n_blocks + 1, D) of the sample, bf16 ones of the same curves, what
    was drawn); from ``cache`` when it holds the same model's sample of the same size and seed."""
    sha = model.pretrained_info.get("sha256")
    key = json.dumps({"weights_sha256": sha, "curves": curves, "seed": seed})
    if cache and Path(cache).is_file():
        z = np.load(cache, allow_pickle=False)
        if str(z["key"]) == key:
            return z["layers"], z["layers_bf16"], json.loads(str(z["drawn"]))
    table, drawn = sample_pretraining_rows(Path(data), curves, seed, files)
    ids, layers = _layer_means(table, model, "fp32")
    ids_bf16, layers_bf16 = _layer_means(table, model, "bf16")
    if ids_bf16 != ids:
        raise RuntimeError("fp32 and bf16 embedded different curves of the sample (a curve "
                           "rejected in one precision only); report this")
    if cache:
        np.savez(cache, layers=layers, layers_bf16=layers_bf16, key=key,
                 drawn=json.dumps(drawn))
    return layers, layers_bf16, drawn


def write_stats(folder, data, curves: int, seed: int = 0, files=None, cache=None) -> dict:
    """Embed a sample of the pretraining curves with the model in ``folder`` and store the
    statistics there; returns what was done."""
    folder = Path(folder)
    model = load_model(str(folder))
    t0 = time.process_time()
    layers, layers_bf16, drawn = sample_layers(model, data, curves, seed, files, cache)
    meta = {"computed_from": "uniform random sample of the pretraining data kit's curves "
            "(EROS-1 test split excluded), embedded by astromer_fast.embed in fp32, and in bf16 "
            "for the rounding noise (overlapping windows, official cleaning)",
            "curves": len(layers), "drawn": drawn, "seed": seed,
            "weights_sha256": model.pretrained_info.get("sha256"),
            "astromer_fast": astromer_fast.__version__}
    stats = stats_from_layers(layers, meta,
                              noise=layers_bf16.astype(np.float64) - layers)
    path = save_stats(stats, folder)
    return {"wrote": str(path), "curves": len(layers), "format": stats.metadata["format"],
            "whitening": stats.metadata["whitening"],
            "cpu_s": round(time.process_time() - t0, 1), **drawn}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder (save_pretrained) to write the statistics into")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--curves", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help=".npz to keep the sample's layer means in")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(write_stats(a.model, a.data, a.curves, a.seed, cache=a.cache), indent=1))


if __name__ == "__main__":
    main()
