"""Standardised embeddings: the model's embeddings whitened (or centred and scaled per channel) by
statistics of its own pretraining data, stored beside its weights.

Why: a freshly pretrained Astromer's raw embeddings share one large common direction (the packaged
model's are at median pairwise cosine 0.9998 over EROS-1, 98% of the variance on one axis), so
cosine similarity and nearest-neighbour search on them rank curves by noise. Scaling each channel
on its own is not enough: that direction is shared by most channels and survives. Whitening with
the full covariance removes it. The statistics are measured on pretraining curves, never on the
user's data: the same curve always gets the same vector.

Two methods (``METHODS``):

- ``"whiten"`` (the default): ZCA whitening, ``y = W (x - mean)`` with
  ``W = V diag(1 / sqrt(lambda)) V^T`` from the eigendecomposition of the covariance. Of all
  whitening matrices ZCA keeps ``y`` closest to ``x - mean``, so channels keep their meaning. The
  covariance is the Ledoit-Wolf estimate (shrunk towards a multiple of the identity by the amount
  that minimises its expected error): directions of near-zero variance, such as the one a
  LayerNorm pins, get the floor of the shrinkage instead of being blown up from rounding noise.
- ``"channels"``: every channel centred and divided by its spread.

The statistics live in ``<model folder>/embedding_stats.safetensors`` (format ``STATS_FORMAT``,
recorded in its metadata): ``layers_mean`` and ``layers_scale``, (n_blocks + 1, D), and
``layers_whiten``, (n_blocks + 1, D, D), float32, one row per layer mean (input embedding, then
each block); the ``embedding`` column is the last block's mean, so it uses the last row. Files of
format 1 (per-channel only, no ``format`` key) still serve ``"channels"``; asking them to whiten
is an error naming the fix. ``tools/embedding_stats.py`` computes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

STATS_NAME = "embedding_stats.safetensors"
STATS_FORMAT = 2
METHODS = ("whiten", "channels")
DEFAULT_METHOD = "whiten"
# A channel whose spread is below this (relative to the largest) would be blown up from noise: it
# is divided by this floor instead.
_MIN_RELATIVE_SCALE = 1e-6


class NoEmbeddingStatsError(ValueError):
    """The model has no stored statistics to standardise its embeddings with."""


def standardize_method(value) -> str | None:
    """The method ``standardize=value`` asks for: None (raw), "whiten" or "channels"."""
    if value is False or value is None:
        return None
    if value is True:
        return DEFAULT_METHOD
    if isinstance(value, str) and value in METHODS:
        return value
    raise ValueError(f"standardize must be True (= {DEFAULT_METHOD!r}), False, or one of "
                     f"{METHODS}, got {value!r}")


@dataclass
class EmbeddingStats:
    layers_mean: np.ndarray             # (n_blocks + 1, D)
    layers_scale: np.ndarray            # (n_blocks + 1, D), > 0
    metadata: dict
    layers_whiten: np.ndarray | None = None  # (n_blocks + 1, D, D), symmetric; None: format 1
    method: str = field(default=DEFAULT_METHOD)

    def using(self, method: str) -> "EmbeddingStats":
        """These statistics applied with ``method`` ("whiten" or "channels")."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "whiten" and self.layers_whiten is None:
            raise NoEmbeddingStatsError(
                "standardize: these statistics hold no whitening matrix (format 1, per-channel "
                "only); recompute them with tools/embedding_stats.py, or use "
                "standardize='channels'")
        return replace(self, method=method)

    def describe(self) -> dict:
        """What the output metadata records: the method, where the statistics come from, and
        the hash of the arrays that method applies."""
        parts = [self.layers_mean, self.layers_whiten if self.method == "whiten"
                 else self.layers_scale]
        h = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
        return {"method": self.method, "stats_format": self.metadata.get("format", 1),
                "stats_sha256": h.hexdigest(),
                "computed_from": self.metadata.get("computed_from"),
                "curves": self.metadata.get("curves")}

    def apply(self, emb: np.ndarray | None, layers: np.ndarray | None):
        """``(embedding, layers)`` standardised (float32); ``None`` passes through."""
        # float64: whitening multiplies the small deviations from the mean, so rounding in the
        # subtraction must stay far below them.
        if emb is not None:
            x = np.asarray(emb, np.float64) - self.layers_mean[-1]
            x = (x @ self.layers_whiten[-1].T.astype(np.float64) if self.method == "whiten"
                 else x / self.layers_scale[-1])
            emb = x.astype(np.float32)
        if layers is not None:
            x = np.asarray(layers, np.float64) - self.layers_mean
            x = (np.einsum("nld,led->nle", x, self.layers_whiten.astype(np.float64))
                 if self.method == "whiten" else x / self.layers_scale)
            layers = x.astype(np.float32)
        return emb, layers


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance, shrinkage) of the rows of ``x`` (N, D): the Ledoit-Wolf (2004) estimate,
    ``(1 - s) S + s mu I`` with ``S`` the sample covariance (divided by N), ``mu`` its mean
    eigenvalue and ``s`` in [0, 1] the shrinkage that minimises the expected squared error."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    x = x - x.mean(axis=0)
    s = x.T @ x / n
    mu = np.trace(s) / d
    # delta: how far S is from the target; beta: how noisy S is (sum of the variances of its
    # entries, from the spread of the per-row outer products x_k x_k^T around S).
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    x2 = x ** 2
    beta = ((x2.T @ x2).sum() / n - (s ** 2).sum()) / (d * n)
    shrinkage = 0.0 if delta <= 0 else float(min(beta, delta) / delta)
    return (1 - shrinkage) * s + shrinkage * mu * np.eye(d), shrinkage


def zca_matrix(cov: np.ndarray) -> np.ndarray:
    """``V diag(1 / sqrt(lambda)) V^T`` of a symmetric positive definite ``cov``."""
    lam, v = np.linalg.eigh(np.asarray(cov, np.float64))
    if lam[0] <= 0:
        raise ValueError(f"covariance is not positive definite (smallest eigenvalue {lam[0]:.3g})"
                         f"; shrink it first")
    return (v / np.sqrt(lam)) @ v.T


def stats_from_layers(layers: np.ndarray, metadata: dict | None = None) -> EmbeddingStats:
    """Statistics of per-curve layer means ``layers`` (N, n_blocks + 1, D): mean, per-channel
    spread and a ZCA matrix of the Ledoit-Wolf covariance, per layer."""
    layers = np.asarray(layers, dtype=np.float64)
    if layers.ndim != 3 or len(layers) < 2:
        raise ValueError(f"need (N >= 2, n_layers, D) layer means, got shape {layers.shape}")
    if not np.isfinite(layers).all():
        raise ValueError("layer means hold non-finite values; clean the curves first")
    mean = layers.mean(axis=0)
    scale = layers.std(axis=0)
    floor = _MIN_RELATIVE_SCALE * max(float(scale.max()), 1e-30)
    scale = np.maximum(scale, floor)
    whiten, shrinkage = [], []
    for i in range(layers.shape[1]):
        x = layers[:, i]
        if not x.std(axis=0).any():
            raise ValueError(f"layer {i} is the same for every curve: nothing to whiten")
        cov, s = ledoit_wolf(x)
        whiten.append(zca_matrix(cov))
        shrinkage.append(round(s, 6))
    meta = dict(metadata or {}, n=len(layers), format=STATS_FORMAT,
                whitening={"method": "ZCA", "covariance": "Ledoit-Wolf", "shrinkage": shrinkage})
    return EmbeddingStats(mean.astype(np.float32), scale.astype(np.float32), meta,
                          np.stack(whiten).astype(np.float32))


def save_stats(stats: EmbeddingStats, directory) -> Path:
    from safetensors.numpy import save_file

    path = Path(directory) / STATS_NAME
    tensors = {"layers_mean": stats.layers_mean, "layers_scale": stats.layers_scale}
    if stats.layers_whiten is not None:
        tensors["layers_whiten"] = np.ascontiguousarray(stats.layers_whiten)
    save_file(tensors, str(path), metadata={"astromer_fast": json.dumps(stats.metadata)})
    return path


def stats_path(model) -> Path | None:
    """Where the statistics of ``model`` would be: beside the weights it was loaded from."""
    info = getattr(model, "pretrained_info", None) or {}
    return Path(info["path"]) / STATS_NAME if info.get("path") else None


def load_stats(model, method: str = DEFAULT_METHOD) -> EmbeddingStats:
    """The statistics stored with ``model``, to apply with ``method``; ``NoEmbeddingStatsError``
    saying why when there are none or they do not fit the model or the method."""
    from safetensors import safe_open

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
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
            meta = json.loads((f.metadata() or {}).get("astromer_fast", "{}"))
            mean, scale = f.get_tensor("layers_mean"), f.get_tensor("layers_scale")
            whiten = f.get_tensor("layers_whiten") if "layers_whiten" in f.keys() else None
    except Exception as e:  # noqa: BLE001 - any damage means the file cannot be used
        raise NoEmbeddingStatsError(f"standardize: {path}: unreadable ({e})") from None
    fmt = meta.get("format", 1)
    if fmt not in (1, STATS_FORMAT):
        raise NoEmbeddingStatsError(
            f"standardize: {path} is in statistics format {fmt!r}; this astromer_fast reads "
            f"formats 1 and {STATS_FORMAT}: upgrade it, or recompute the file with "
            f"tools/embedding_stats.py")
    if fmt == STATS_FORMAT and whiten is None:
        raise NoEmbeddingStatsError(f"standardize: {path} says format {fmt} but holds no "
                                    f"layers_whiten; recompute it with tools/embedding_stats.py")
    made_for = meta.get("weights_sha256")
    have = (getattr(model, "pretrained_info", None) or {}).get("sha256")
    if made_for and have and made_for != have:
        raise NoEmbeddingStatsError(
            f"standardize: {path} was computed for other weights (sha256 {made_for[:12]}..., "
            f"these are {have[:12]}...); recompute it with tools/embedding_stats.py")
    want = (model.config.n_blocks + 1, model.config.d_model)
    if (mean.shape != want or scale.shape != want
            or (whiten is not None and whiten.shape != (*want, want[1]))):
        got = mean.shape if whiten is None else (mean.shape, whiten.shape)
        raise NoEmbeddingStatsError(f"standardize: {path} holds statistics of shape {got}, the "
                                    f"model needs {want}")
    arrays = [mean, scale] + ([] if whiten is None else [whiten])
    if not (all(np.isfinite(a).all() for a in arrays) and (scale > 0).all()):
        raise NoEmbeddingStatsError(f"standardize: {path} holds non-finite or non-positive "
                                    f"values")
    stats = EmbeddingStats(mean.astype(np.float32), scale.astype(np.float32), meta,
                           None if whiten is None else whiten.astype(np.float32))
    try:
        return stats.using(method)
    except NoEmbeddingStatsError as e:
        raise NoEmbeddingStatsError(f"{e} ({path})") from None


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
