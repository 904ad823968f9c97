"""How far each CPU precision's embeddings are from float32's, on real curves.

    python tools/precision_accuracy.py                      # all of ../shared/data/eros1.parquet
    python tools/precision_accuracy.py curves.parquet --model my_model/

Embeds every curve with ``embed`` in fp32 and in bf16 and prints, per precision, the cosine of each
curve's embedding to fp32's: raw, and after standardising every channel with fp32's mean and
standard deviation over the curves (raw Astromer embeddings are nearly collinear, so their raw
cosines say little), after the model's own whitening (what ``embed(..., standardize=True)``
writes), plus the largest absolute difference. Writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import astromer_fast
from astromer_fast.embedding.standardize import load_stats
from astromer_fast.weights import load_model


def embeddings(table):
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv=None):
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eros1.parquet"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="?", default=str(default))
    p.add_argument("--model", default=None)
    p.add_argument("--json", default="precision_accuracy.json")
    args = p.parse_args(argv)
    out = {}
    for precision in ("fp32", "bf16"):
        table = astromer_fast.embed(args.data, model=args.model, device="cpu", progress=False,
                                    precision=precision)
        out[precision] = (table["id"].to_pylist(), table["band"].to_pylist(), embeddings(table))
    ids32, bands32, ref = out["fp32"]
    mu, sd = ref.mean(0), ref.std(0) + 1e-12
    whiten = load_stats(load_model(args.model), "whiten")
    result = {"data": args.data, "curves": len(ref)}
    # How collinear the raw embeddings are: the cosine between different curves' embeddings.
    between = cosines(ref[:-1], ref[1:])
    result["fp32 raw cosine between neighbouring curves (median)"] = float(np.median(between))
    for precision in ("bf16",):
        ids, bands, emb = out[precision]
        assert ids == ids32 and bands == bands32
        raw = cosines(emb, ref)
        std = cosines((emb - mu) / sd, (ref - mu) / sd)
        white = cosines(whiten.apply(emb, None)[0].astype(np.float64),
                        whiten.apply(ref, None)[0].astype(np.float64))
        result[precision] = {
            "raw cosine min": float(raw.min()), "raw cosine median": float(np.median(raw)),
            "curves with raw cosine >= 0.9999": int((raw >= 0.9999).sum()),
            "standardised cosine min": float(std.min()),
            "standardised cosine 1st percentile": float(np.percentile(std, 1)),
            "standardised cosine median": float(np.median(std)),
            "whitened cosine min": float(white.min()),
            "whitened cosine 1st percentile": float(np.percentile(white, 1)),
            "whitened cosine median": float(np.median(white)),
            "max abs difference": float(np.abs(emb - ref).max()),
            "mean abs of fp32 embedding": float(np.abs(ref).mean()),
        }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
