"""Per-curve layer stacks from an encoder, through the package's own embedding pipeline
(``astromer_fast.embed``: cleaning, official overlapping windows, length-sorted batches, per-curve
average of window embeddings weighted by valid counts), plus an on-disk cache keyed by model and
preprocessing so a rerun only embeds what it has not seen."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def model_fingerprint(model) -> str:
    """A short, stable identity of a model's weights (the hash embed records in its outputs)."""
    from astromer_fast.embedding.batch import weights_sha256

    return weights_sha256(model)[0][:16]


def embed_curves(model, curves, *, device=None, batch_size: int = 256,
                 window_mode: str = "overlap", min_obs: int = 5, layers: bool = True):
    """Embed ``astromer_fast.data.Curves`` (already cleaned as the caller wants).

    Returns ``(emb, ok)``: ``emb`` float32 of shape (N, n_blocks + 1, D) with ``layers`` (the
    input of the γ-weighted embedding; the last entry is the last block's mean) or (N, D);
    ``ok`` is False for curves ``embed`` rejected (fewer than ``min_obs`` valid observations),
    whose rows are NaN."""
    from astromer_fast.embedding import embed

    n = len(curves)
    k = model.config.n_blocks + 1
    d = model.config.d_model
    shape = (n, k, d) if layers else (n, d)
    out = np.full(shape, np.nan, np.float32)
    ok = np.zeros(n, bool)
    if n == 0:
        return out, ok
    # Row numbers as ids: the output is matched back to the input by them, whatever embed drops.
    table = pa.table({"id": pa.array([str(i) for i in range(n)], pa.string()),
                      "lightcurve": curves.to_arrow()})
    res = embed(table, model=model, device=device, batch_size=batch_size,
                window_mode=window_mode, min_obs=min_obs, layers=layers, band_col="",
                progress=False)
    rows = np.array([int(i) for i in res["id"].to_pylist()], dtype=np.int64)
    col = res["layers" if layers else "embedding"].combine_chunks()
    flat = col.flatten().flatten() if layers else col.flatten()
    vals = flat.to_numpy(zero_copy_only=False).reshape((len(rows),) + shape[1:])
    out[rows] = vals
    ok[rows] = True
    return out, ok


class ArrayCache:
    """Fixed-shape float32 arrays keyed by string, on disk as ``<dir>/<name>.parquet`` (a
    ``key`` column and a flat ``values`` column) with ``<name>.json`` saying what produced them.
    Rows are only ever added; a NaN row records "computed, no result" so it is not retried."""

    def __init__(self, directory, name: str, item_shape: tuple, desc: dict):
        self.dir = Path(directory)
        self.tag = name
        self.path = self.dir / f"{name}.parquet"
        self.desc = desc
        self.item_shape = tuple(int(x) for x in item_shape)
        self.size = int(np.prod(self.item_shape))
        self._keys: list[str] = []
        self._vals = np.zeros((0, *self.item_shape), np.float32)
        if self.path.is_file():
            t = pq.read_table(self.path)
            self._keys = t["key"].to_pylist()
            flat = t["values"].combine_chunks().flatten()
            self._vals = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(
                len(self._keys), *self.item_shape).copy()
        self._index = {key: i for i, key in enumerate(self._keys)}

    def __len__(self):
        return len(self._keys)

    def get(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """(values, found); NaN rows where not cached."""
        out = np.full((len(keys), *self.item_shape), np.nan, np.float32)
        found = np.zeros(len(keys), bool)
        for j, key in enumerate(keys):
            i = self._index.get(key)
            if i is not None:
                out[j] = self._vals[i]
                found[j] = True
        return out, found

    def put(self, keys, values: np.ndarray):
        new = [j for j, key in enumerate(keys) if key not in self._index]
        if not new:
            return
        for j in new:
            self._index[keys[j]] = len(self._keys)
            self._keys.append(keys[j])
        self._vals = np.concatenate([self._vals, np.asarray(values)[new].astype(np.float32)])
        self.save()

    def save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        col = pa.FixedSizeListArray.from_arrays(pa.array(self._vals.reshape(-1)), self.size)
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(pa.table({"key": pa.array(self._keys, pa.string()), "values": col}), tmp)
        tmp.replace(self.path)
        self.path.with_suffix(".json").write_text(json.dumps(self.desc, indent=2) + "\n")


def embedding_cache(directory, model, *, preprocessing: dict, device=None,
                    precision: str | None = None) -> ArrayCache:
    """The cache of one model's per-curve layer stacks under one preprocessing and precision."""
    from astromer_fast.embedding.device import embedding_precision

    fp = model_fingerprint(model)
    desc = {"what": "per-curve layer stacks (n_blocks + 1, d_model)", "model": model.config.name,
            "weights": fp, "preprocessing": preprocessing,
            "precision": embedding_precision(resolve_device(device), precision)}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:10]
    return ArrayCache(directory, f"emb-{model.config.name}-{fp[:8]}-{digest}",
                      (model.config.n_blocks + 1, model.config.d_model), desc)


def cached_layers(model, curves, keys, *, cache: ArrayCache | None, log=None, **embed_kw):
    """Layer stacks for ``curves`` (keys name them), embedding only those not in ``cache``."""
    if cache is None:
        return embed_curves(model, curves, layers=True, **embed_kw)
    vals, found = cache.get(keys)
    todo = np.flatnonzero(~found)
    if len(todo):
        if log:
            log(f"embedding {len(todo)} curve(s) with {cache.tag} "
                f"({int(found.sum())} from the cache)")
        new, _ = embed_curves(model, curves.take(todo), layers=True, **embed_kw)
        vals[todo] = new
        cache.put([keys[i] for i in todo], new)
    ok = np.isfinite(vals).all(axis=(1, 2))
    return vals, ok


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
