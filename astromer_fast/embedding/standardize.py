"""Standardised embeddings: each channel centred and scaled by statistics of the model's own
pretraining data, stored beside its weights.

Why: a freshly pretrained Astromer's raw embeddings share one large common direction (the packaged
model's are at median pairwise cosine 0.9998 over EROS-1, 98% of the variance on one axis), so
cosine similarity and nearest-neighbour search on them rank curves by noise. Removing the mean and
dividing by the spread of every channel, as measured on the pretraining curves, spreads them out
without looking at the user's data: the same curve always gets the same vector.

The statistics live in ``<model folder>/embedding_stats.safetensors``: ``layers_mean`` and
``layers_scale``, (n_blocks + 1, d_model) float32, one row per layer mean (input embedding, then
each block); the ``embedding`` column is the last block's mean, so it uses the last row.
``tools/embedding_stats.py`` computes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STATS_NAME = "embedding_stats.safetensors"
# A channel whose spread is below this (relative to the largest) would be blown up from noise: it
# is divided by this floor instead.
_MIN_RELATIVE_SCALE = 1e-6


class NoEmbeddingStatsError(ValueError):
    """The model has no stored statistics to standardise its embeddings with."""


@dataclass
class EmbeddingStats:
    layers_mean: np.ndarray    # (n_blocks + 1, D)
    layers_scale: np.ndarray   # (n_blocks + 1, D), > 0
    metadata: dict

    def describe(self) -> dict:
        """What the output metadata records: where the statistics come from, and their hash."""
        import hashlib

        h = hashlib.sha256(self.layers_mean.tobytes() + self.layers_scale.tobytes()).hexdigest()
        return {"stats_sha256": h, "computed_from": self.metadata.get("computed_from"),
                "curves": self.metadata.get("curves")}

    def apply(self, emb: np.ndarray | None, layers: np.ndarray | None):
        """``(embedding, layers)`` standardised (float32); ``None`` passes through."""
        if emb is not None:
            emb = ((emb - self.layers_mean[-1]) / self.layers_scale[-1]).astype(np.float32)
        if layers is not None:
            layers = ((layers - self.layers_mean) / self.layers_scale).astype(np.float32)
        return emb, layers


def stats_from_layers(layers: np.ndarray, metadata: dict | None = None) -> EmbeddingStats:
    """Statistics of per-curve layer means ``layers`` (N, n_blocks + 1, D)."""
    layers = np.asarray(layers, dtype=np.float64)
    if layers.ndim != 3 or len(layers) < 2:
        raise ValueError(f"need (N >= 2, n_layers, D) layer means, got shape {layers.shape}")
    if not np.isfinite(layers).all():
        raise ValueError("layer means hold non-finite values; clean the curves first")
    mean = layers.mean(axis=0)
    scale = layers.std(axis=0)
    floor = _MIN_RELATIVE_SCALE * max(float(scale.max()), 1e-30)
    scale = np.maximum(scale, floor)
    return EmbeddingStats(mean.astype(np.float32), scale.astype(np.float32),
                          dict(metadata or {}, n=len(layers)))


def save_stats(stats: EmbeddingStats, directory) -> Path:
    from safetensors.numpy import save_file

    path = Path(directory) / STATS_NAME
    save_file({"layers_mean": stats.layers_mean, "layers_scale": stats.layers_scale}, str(path),
              metadata={"astromer_fast": json.dumps(stats.metadata)})
    return path


def stats_path(model) -> Path | None:
    """Where the statistics of ``model`` would be: beside the weights it was loaded from."""
    info = getattr(model, "pretrained_info", None) or {}
    return Path(info["path"]) / STATS_NAME if info.get("path") else None


def load_stats(model) -> EmbeddingStats:
    """The statistics stored with ``model``; ``NoEmbeddingStatsError`` saying why when there
    are none or they do not fit the model."""
    from safetensors import safe_open

    path = stats_path(model)
    name = getattr(model.config, "name", "this model")
    if path is None:
        raise NoEmbeddingStatsError(
            f"standardize: {name} was not loaded from a model folder, so it has no stored "
            f"embedding statistics; load it with from_pretrained(folder) where the folder holds "
            f"{STATS_NAME} (tools/embedding_stats.py writes it), or embed without standardize")
    if not path.is_file():
        raise NoEmbeddingStatsError(
            f"standardize: {path.parent} has no {STATS_NAME}: this model has no embedding "
            f"statistics (tools/embedding_stats.py computes them from its pretraining data); "
            f"embed without standardize, or standardise with statistics of your own")
    try:
        with safe_open(str(path), framework="numpy") as f:
            mean, scale = f.get_tensor("layers_mean"), f.get_tensor("layers_scale")
            meta = json.loads((f.metadata() or {}).get("astromer_fast", "{}"))
    except Exception as e:  # noqa: BLE001 - any damage means the file cannot be used
        raise NoEmbeddingStatsError(f"standardize: {path}: unreadable ({e})") from None
    made_for = meta.get("weights_sha256")
    have = (getattr(model, "pretrained_info", None) or {}).get("sha256")
    if made_for and have and made_for != have:
        raise NoEmbeddingStatsError(
            f"standardize: {path} was computed for other weights (sha256 {made_for[:12]}..., "
            f"these are {have[:12]}...); recompute it with tools/embedding_stats.py")
    want = (model.config.n_blocks + 1, model.config.d_model)
    if mean.shape != want or scale.shape != want:
        raise NoEmbeddingStatsError(f"standardize: {path} holds statistics of shape "
                                    f"{mean.shape}, the model needs {want}")
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise NoEmbeddingStatsError(f"standardize: {path} holds non-finite or non-positive "
                                    f"values")
    return EmbeddingStats(mean.astype(np.float32), scale.astype(np.float32), meta)


def pairwise_cosine_summary(x: np.ndarray, max_rows: int = 4000, seed: int = 0) -> dict:
    """Median and percentiles of the cosine between every pair of rows of ``x`` (a random
    ``max_rows`` of them when there are more), and the share of variance on the first principal
    axis: how usable the vectors are for cosine search."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    c = (u @ u.T)[np.triu_indices(len(u), 1)]
    sv = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    q = np.percentile(c, [1, 5, 25, 50, 75, 95, 99])
    return {"rows": len(x), "pairs": len(c), "median": float(q[3]),
            "p01": float(q[0]), "p05": float(q[1]), "p25": float(q[2]), "p75": float(q[4]),
            "p95": float(q[5]), "p99": float(q[6]),
            "first_axis_variance": float(sv[0] / sv.sum()) if sv.sum() > 0 else 0.0}
