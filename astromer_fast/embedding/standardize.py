"""Standardised embeddings: the model's embeddings whitened (or centred and scaled per channel) by
statistics of its own pretraining data, stored beside its weights.

Why: a freshly pretrained Astromer's raw embeddings share one large common direction (the packaged
model's are at median pairwise cosine 0.9998 over EROS-1, 98% of the variance on one axis), so
cosine similarity and nearest-neighbour search on them rank curves by noise. Scaling each channel
on its own is not enough: that direction is shared by most channels and survives. Whitening with
the full covariance removes it. The statistics are measured on pretraining curves, never on the
user's data: the same curve always gets the same vector.

Two methods (``METHODS``):

- ``"whiten"`` (the default): ``y = W (x - mean)`` with ``W = V diag(g) V^T``, ``V`` and
  ``lambda`` the eigenvectors and eigenvalues of the covariance. ``g = 1 / sqrt(lambda)`` would be
  ZCA whitening, which of all whitening matrices keeps ``y`` closest to ``x - mean`` (channels
  keep their meaning). But most of this model's directions are tiny (in the last layer only 35 of
  256 eigenvalues exceed the variance that bf16 rounding adds), and ZCA would blow that rounding
  up to the size of the real directions. So each direction gets the Wiener gain
  ``g = sqrt(lambda) / (lambda + nu)``, ``nu`` the variance rounding adds along it (measured:
  the bf16 minus fp32 embeddings of the same curves): the least-squares estimate of the whitened
  noise-free vector. Where ``lambda >> nu`` it is ZCA; where rounding dominates the direction
  fades out instead of being amplified; the gain never exceeds ``1 / (2 sqrt(nu))``.
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
            if self.method == "whiten":  # per layer l: x[:, l] @ W[l].T, as one batched GEMM
                w = self.layers_whiten.astype(np.float64).transpose(0, 2, 1)
                x = np.matmul(x.transpose(1, 0, 2), w).transpose(1, 0, 2)
            else:
                x = x / self.layers_scale
            layers = x.astype(np.float32)
        return emb, layers


def rounding_floor(x: np.ndarray) -> float:
    """Variance that float32 arithmetic adds along any direction of the rows of ``x`` (N, D),
    taken as that of one length-D dot product: D roundings of ``2^-24`` relative size adding up
    as a random walk. The ``nu`` of directions where no noise was measured."""
    x = np.asarray(x, np.float64)
    return float(np.mean(x ** 2) * x.shape[1] * 2.0 ** -48)


def whitening_matrix(cov: np.ndarray, noise_cov: np.ndarray | None = None,
                     floor: float = 0.0) -> tuple[np.ndarray, dict]:
    """(``W``, what it did) for covariance ``cov`` (D, D) of vectors carrying noise of covariance
    ``noise_cov`` (None: no noise beyond ``floor``): ``V diag(sqrt(lambda) / (lambda + nu)) V^T``
    with ``nu`` the noise variance along each eigenvector, at least ``floor``. With no noise it is
    ZCA, ``V diag(1 / sqrt(lambda)) V^T``."""
    lam, v = np.linalg.eigh(np.asarray(cov, np.float64))
    lam = np.maximum(lam, 0.0)
    nu = (np.zeros(len(lam)) if noise_cov is None
          else np.einsum("di,de,ei->i", v, np.asarray(noise_cov, np.float64), v))
    nu = np.maximum(nu, floor)
    if not (lam + nu > 0).all():
        raise ValueError("a direction has neither variance nor noise (give a positive floor)")
    gain = np.sqrt(lam) / (lam + nu)
    return (v * gain) @ v.T, {"directions_above_noise": int(np.sum(lam > nu)),
                              "noise_to_top_eigenvalue": float(np.mean(nu) / lam[-1])}


def stats_from_layers(layers: np.ndarray, metadata: dict | None = None,
                      noise: np.ndarray | None = None) -> EmbeddingStats:
    """Statistics of per-curve layer means ``layers`` (N, n_blocks + 1, D), per layer: mean,
    per-channel spread and the whitening matrix of ``whitening_matrix``. ``noise`` (same shape):
    the rounding error of the same curves embedded at reduced precision (bf16 minus fp32), whose
    covariance sets ``nu``; without it, ``nu`` is float32 rounding alone."""
    layers = np.asarray(layers, dtype=np.float64)
    if layers.ndim != 3 or len(layers) < 2:
        raise ValueError(f"need (N >= 2, n_layers, D) layer means, got shape {layers.shape}")
    if not np.isfinite(layers).all():
        raise ValueError("layer means hold non-finite values; clean the curves first")
    if noise is not None:
        noise = np.asarray(noise, dtype=np.float64)
        if noise.shape != layers.shape or not np.isfinite(noise).all():
            raise ValueError(f"noise must be finite and shaped like the layers {layers.shape}, "
                             f"got {noise.shape}")
    mean = layers.mean(axis=0)
    scale = layers.std(axis=0)
    floor = _MIN_RELATIVE_SCALE * max(float(scale.max()), 1e-30)
    scale = np.maximum(scale, floor)
    whiten, done = [], []
    for i in range(layers.shape[1]):
        x = layers[:, i] - mean[i]
        if not x.any():
            raise ValueError(f"layer {i} is the same for every curve: nothing to whiten")
        noise_cov = None
        if noise is not None:
            e = noise[:, i] - noise[:, i].mean(axis=0)
            noise_cov = e.T @ e / len(e)
        w, info = whitening_matrix(x.T @ x / len(x), noise_cov, rounding_floor(layers[:, i]))
        whiten.append(w)
        done.append(info)
    meta = dict(metadata or {}, n=len(layers), format=STATS_FORMAT, whitening={
        "method": "ZCA with a Wiener gain sqrt(lambda) / (lambda + nu) per eigenvector",
        "nu": "variance of the given reduced-precision rounding error along it"
        if noise is not None else "float32 rounding alone",
        "directions_above_noise": [d["directions_above_noise"] for d in done],
        "noise_to_top_eigenvalue": [float(f"{d['noise_to_top_eigenvalue']:.3g}") for d in done]})
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
