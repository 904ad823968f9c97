"""How usable a model's embeddings are for cosine search: the spread of pairwise cosines, raw and
standardised (``embed(..., standardize=True)``), over every curve of a Parquet file.

    python tools/embedding_spread.py ../shared/data/eros1.parquet [--model astromer2-base]

Prints JSON: median and percentiles of the pairwise cosine (all pairs of a random 4,000 curves
when there are more) and the share of variance on the first principal axis, for each.
"""

import argparse
import json
import time

import numpy as np
import torch

import astromer_fast
from astromer_fast.embedding.standardize import load_stats, pairwise_cosine_summary
from astromer_fast.weights import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--max-rows", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    t0 = time.process_time()
    raw = astromer_fast.embed(a.data, model=model, precision=a.precision, progress=False)
    emb = np.asarray(raw["embedding"].combine_chunks().flatten().to_numpy(
        zero_copy_only=False)).reshape(raw.num_rows, -1)
    std, _ = load_stats(model).apply(emb, None)
    print(json.dumps({"data": a.data, "model": a.model or "astromer2-base", "curves": len(emb),
                      "precision": a.precision, "cpu_s": round(time.process_time() - t0, 1),
                      "raw": pairwise_cosine_summary(emb, a.max_rows),
                      "standardized": pairwise_cosine_summary(std, a.max_rows)}, indent=1))


if __name__ == "__main__":
    main()
