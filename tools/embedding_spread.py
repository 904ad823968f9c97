"""How usable a model's embeddings are for cosine search: the spread of pairwise cosines, raw,
standardised per channel (``standardize="channels"``) and whitened (``standardize="whiten"``, the
default of ``standardize=True``), over every curve of a Parquet file; and, when the file has
``label`` and ``split`` columns (EROS-1), the accuracy of cosine nearest neighbours on each, so
that spreading the vectors is seen not to spread noise.

    python tools/embedding_spread.py ../shared/data/eros1.parquet [--model astromer2-base] \\
        [--cache /tmp/eros1_emb.npz]

Prints JSON: median and percentiles of the pairwise cosine (all pairs of a random 4,000 curves
when there are more) and the share of variance on the first principal axis, for each; then the
kNN check: every curve of the ``test`` split labelled by a majority vote of its ``k`` most
cosine-similar ``train`` curves of the same band (ties: the most similar neighbour's label),
accuracy and macro F1 per band; with scikit-learn installed, also a linear probe (logistic
regression on standardised inputs, train split -> test split), to see whether whitening lost
information a classifier could use.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import astromer_fast
from astromer_fast.embedding.standardize import load_stats, pairwise_cosine_summary
from astromer_fast.weights import load_model


def raw_embeddings(data, model, precision, cache):
    """(ids, bands, embeddings, CPU seconds) of every curve of ``data``; read from ``cache`` when
    it holds the same file embedded by the same weights in the same precision, else written."""
    key = json.dumps({"data": str(Path(data).resolve()), "precision": precision,
                      "weights_sha256": model.pretrained_info.get("sha256")})
    if cache and Path(cache).is_file():
        z = np.load(cache, allow_pickle=False)
        if "key" in z and str(z["key"]) == key:
            return z["id"], z["band"], z["embedding"], 0.0
    t0 = time.process_time()
    res = astromer_fast.embed(data, model=model, precision=precision, progress=False)
    emb = np.asarray(res["embedding"].combine_chunks().flatten().to_numpy(
        zero_copy_only=False)).reshape(res.num_rows, -1)
    ids = np.asarray(res["id"].to_pylist(), dtype=str)
    bands = np.asarray(res["band"].to_pylist(), dtype=str)
    if cache:
        np.savez(cache, id=ids, band=bands, embedding=emb, key=key)
    return ids, bands, emb, time.process_time() - t0


def knn_predict(train, train_y, test, k):
    """Majority label of the ``k`` most cosine-similar training rows of every test row; a tie
    goes to the label of the most similar neighbour among the tied."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)

    sim = unit(test) @ unit(train).T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out = []
    for row in train_y[nearest]:
        labels, counts = np.unique(row, return_counts=True)
        best = set(labels[counts == counts.max()])
        out.append(next(lab for lab in row if lab in best))
    return np.asarray(out)


def linear_probe(train, train_y, test):
    """Labels of ``test`` by a logistic regression on standardised inputs; None without
    scikit-learn."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return clf.fit(train, train_y).predict(test)


def macro_f1(y, p):
    f1 = []
    for c in np.unique(y):
        tp = np.sum((p == c) & (y == c))
        prec = tp / max(np.sum(p == c), 1)
        rec = tp / max(np.sum(y == c), 1)
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return float(np.mean(f1))


def knn_check(data, ids, bands, vectors: dict, k: int):
    """Accuracy and macro F1 of cosine kNN (train split -> test split, per band) for each set of
    ``vectors``; None when ``data`` has no label and split columns."""
    schema = pq.read_schema(data)
    if not {"label", "split"} <= set(schema.names):
        return None
    t = pq.read_table(data, columns=["id", "band", "label", "split"]).to_pydict()
    info = {(i, b): (lab, s) for i, b, lab, s in zip(t["id"], t["band"], t["label"], t["split"])}
    lab = np.asarray([info.get((i, b), (None, None))[0] or "" for i, b in zip(ids, bands)])
    split = np.asarray([info.get((i, b), (None, None))[1] or "" for i, b in zip(ids, bands)])
    out = {"k": k, "neighbours": "train split, same band", "queries": "test split"}
    for band in sorted(set(bands)):
        tr = (bands == band) & (split == "train") & (lab != "")
        te = (bands == band) & (split == "test") & (lab != "")
        if not tr.any() or not te.any():
            continue
        classes, counts = np.unique(lab[tr], return_counts=True)
        res = {"train": int(tr.sum()), "test": int(te.sum()),
               "majority_class_accuracy": float(np.mean(lab[te] == classes[counts.argmax()]))}
        for name, x in vectors.items():
            p = knn_predict(x[tr], lab[tr], x[te], k)
            res[name] = {"accuracy": round(float(np.mean(p == lab[te])), 4),
                         "macro_f1": round(macro_f1(lab[te], p), 4)}
            probe = linear_probe(x[tr], lab[tr], x[te])
            if probe is not None:
                res[name]["linear_probe_macro_f1"] = round(macro_f1(lab[te], probe), 4)
        out[band] = res
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--max-rows", type=int, default=4000)
    p.add_argument("--k", type=int, default=10, help="neighbours of the kNN check")
    p.add_argument("--cache", default=None,
                   help=".npz to keep the raw embeddings in (reused when it exists)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    ids, bands, emb, cpu_s = raw_embeddings(a.data, model, a.precision, a.cache)
    stats = load_stats(model, "whiten")
    vectors = {"raw": emb, "channels": stats.using("channels").apply(emb, None)[0],
               "whiten": stats.apply(emb, None)[0]}
    print(json.dumps({"data": a.data, "model": a.model or "astromer2-base", "curves": len(emb),
                      "precision": a.precision, "embed_cpu_s": round(cpu_s, 1),
                      "stats": stats.describe() | {"whitening": stats.metadata.get("whitening")},
                      **{name: pairwise_cosine_summary(x, a.max_rows)
                         for name, x in vectors.items()},
                      "knn": knn_check(a.data, ids, bands, vectors, a.k)}, indent=1))


if __name__ == "__main__":
    main()
