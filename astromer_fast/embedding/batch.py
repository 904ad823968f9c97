"""The per-batch step every way of embedding shares: a prepared chunk of curves (decoded,
cleaned, windowed: ``stream.prepare``) -> the model and pooling (``WindowEncoder``) -> the
embeddings and rejects tables, with the output schema and metadata that record how they were made.

``embed`` (files and tables), ``Embedder`` (numpy arrays), the Ray and Dask engines and the sklearn
wrapper all go through ``BatchEmbedder.prepare`` and ``BatchEmbedder.embed_chunk``, so a curve
gives the same vector whichever door it came in by.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa

from astromer_fast.data.preprocess import MAG_LIMIT, TIME_LIMIT
from astromer_fast.embedding.columns import Columns
from astromer_fast.embedding.device import Timers, WindowEncoder
from astromer_fast.embedding.options import check_embedder_options, resolve_device
from astromer_fast.embedding.standardize import load_stats, standardize_method
from astromer_fast.embedding.stream import prepare
from astromer_fast.model.fused_cpu import precision_asked

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("band", pa.string()), ("n_obs", pa.int32()),
                            ("reason", pa.string())])
CLEANING_RULES = ("drop non-finite time/mag/err (null = NaN), "
                  f"|time| > {TIME_LIMIT:.0e} days, |mag| > {MAG_LIMIT:.0e}, err <= 0 and "
                  "repeated times (keep the first); sort by time; reject curves with fewer than "
                  "min_obs observations left, and rows whose parallel lists differ in length")


def output_schema(d: int, n_layers: int | None, per_window: bool, meta: dict) -> pa.Schema:
    fields = [("id", pa.string()), ("band", pa.string())]
    if per_window:
        fields += [("window", pa.int32()), ("start", pa.int32()), ("n_valid", pa.int32())]
    else:
        fields += [("n_obs", pa.int32()), ("n_windows", pa.int32())]
    fields.append(("embedding", pa.list_(pa.float32(), d)))
    if n_layers:
        fields.append(("layers", pa.list_(pa.list_(pa.float32(), d), n_layers)))
    return pa.schema(fields, metadata=meta)


def _fixed(a: np.ndarray, d: int):
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), d)


def _layers_array(a: np.ndarray, d: int, n_layers: int):
    inner = _fixed(a.reshape(-1, d), d)
    return pa.FixedSizeListArray.from_arrays(inner, n_layers)


def weights_sha256(model) -> tuple[str, str]:
    """(sha256 hex, what was hashed) identifying a model's weights: its safetensors file when it
    was loaded from one, else its state dict (float32, keys sorted)."""
    info = getattr(model, "pretrained_info", None) or {}
    if info.get("sha256"):
        return info["sha256"], "file"
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest(), "state_dict (float32, keys sorted)"


def _metadata(model, *, window_mode, min_obs, layout=None, layers=False, per_window=False,
              bands=None, sha=None, precision=None, standardized=None) -> dict:
    from astromer_fast import __version__

    info = getattr(model, "pretrained_info", {}) or {}
    sha, sha_of = sha or weights_sha256(model)
    return {b"astromer_fast": json.dumps({
        "version": __version__,
        "model": model.config.name,
        "model_path": info.get("path"),
        "weights_sha256": sha,
        "weights_sha256_of": sha_of,
        "config": model.config.to_dict(),
        "layout": None if layout is None else layout.describe(),
        "output": {"per_window": per_window, "layers": layers, "bands": bands},
        "precision": precision,
        # Present only when standardised, so outputs of earlier versions stay comparable.
        **({"standardized": standardized} if standardized is not None else {}),
        "preprocessing": {"window": model.config.window, "window_mode": window_mode,
                          "min_obs": min_obs, "cleaning": CLEANING_RULES,
                          "centring": "per-window mean of valid t (float64) and m",
                          "pooling": "mean over valid observations (fp32); curve = windows "
                          "averaged weighted by valid counts",
                          "n_obs": "observations after cleaning"},
    }).encode()}


def _chunk_tables(chunk, res, d, n_layers, per_window):
    """(embeddings columns, rejects table, (curve index of each embeddings row, of each rejects
    row)) of one chunk, curves in input order."""
    curve_emb, curve_layers, win_emb, win_layers = res
    ok = chunk.windows_per_curve > 0
    finite = np.isfinite(curve_emb).all(axis=1)
    if curve_layers is not None:
        finite &= np.isfinite(curve_layers).reshape(len(finite), -1).all(axis=1)
    reasons = list(chunk.reasons)
    bad = np.flatnonzero(ok & ~finite)
    if len(bad):  # never write a NaN: reject (and say so) instead
        reasons += [(int(i), "non-finite embedding (please report this curve)") for i in bad]
        reasons.sort()
        ok &= finite
    if per_window:
        # Windows back into curve order (sorted order -> original window order).
        inv = np.argsort(chunk.order, kind="stable")
        curve_of = chunk.tensors["curve"].numpy()[inv]
        keep_w = np.flatnonzero(ok[curve_of])
        src = inv[keep_w]
        first = np.concatenate([[0], np.cumsum(chunk.windows_per_curve)[:-1]])
        row_curve = curve_of[keep_w]
        cols = {"id": chunk.ids.take(pa.array(row_curve)),
                "band": chunk.bands.take(pa.array(row_curve)),
                "window": pa.array((keep_w - first[row_curve]).astype(np.int32)),
                "start": pa.array(chunk.start[src].astype(np.int32)),
                "n_valid": pa.array(chunk.n_valid_sorted[src].astype(np.int32)),
                "embedding": _fixed(win_emb[src], d)}
        if n_layers:
            cols["layers"] = _layers_array(win_layers[src], d, n_layers)
    else:
        keep = np.flatnonzero(ok)
        row_curve = keep
        cols = {"id": chunk.ids.take(pa.array(keep)), "band": chunk.bands.take(pa.array(keep)),
                "n_obs": pa.array(chunk.n_obs[keep].astype(np.int32)),
                "n_windows": pa.array(chunk.windows_per_curve[keep].astype(np.int32)),
                "embedding": _fixed(curve_emb[keep], d)}
        if n_layers:
            cols["layers"] = _layers_array(curve_layers[keep], d, n_layers)
    ridx = np.array([i for i, _ in reasons], dtype=np.int64)
    rejects = pa.table({"id": chunk.ids.take(pa.array(ridx, pa.int64())),
                        "band": chunk.bands.take(pa.array(ridx, pa.int64())),
                        "n_obs": pa.array(chunk.n_in[ridx].astype(np.int32)),
                        "reason": pa.array([r for _, r in reasons], pa.string())},
                       schema=REJECTS_SCHEMA)
    return cols, rejects, (row_curve, ridx)


class BatchEmbedder:
    """The per-batch step of :func:`embed`, for every caller that brings its own batches
    (``Embedder``, ``astromer_fast.distributed``): one model loaded once, then record batches
    (or tables) -> decode, clean, window (``prepare``) -> model and pooling (``embed_chunk``) ->
    the output and rejects tables exactly as ``embed`` writes them. ``columns``: a ``Columns``
    (None: detected); other keywords as ``embed``."""

    def __init__(self, model=None, *, columns: Columns | None = None, device=None,
                 batch_size: int = 256, window_mode: str = "overlap", min_obs: int = 5,
                 bands=None, layers: bool = False, per_window: bool = False,
                 timers: Timers | None = None, precision: str | None = None,
                 standardize: bool | str = False):
        from astromer_fast.weights import load_model

        if columns is None:
            columns = Columns()
        if not isinstance(columns, Columns):
            raise ValueError(f"columns must be an astromer_fast.Columns, got {columns!r}")
        self.columns = columns
        self.bands = check_embedder_options(
            batch_size=batch_size, window_mode=window_mode, min_obs=min_obs, bands=bands,
            layers=layers, per_window=per_window, precision=precision, standardize=standardize)
        self.device = resolve_device(device)
        self.net = load_model(model, device=self.device)
        self.net.eval()
        # Loaded before any work: a model without statistics fails here, naming why.
        method = standardize_method(standardize)
        self.stats = load_stats(self.net, method) if method else None
        if method == "whiten" and not precision_asked(precision):
            # Whitening scales up the weak directions, where bf16 rounding is large against the
            # signal: one curve's whitened fp32 and bf16 vectors differ far more than its raw ones
            # (bench/RESULTS.md). Unless a precision is asked for, whitened outputs are float32,
            # so that they agree across machines whatever their native precision.
            precision = "fp32"
        self.per_window = per_window
        self.d = self.net.config.d_model
        self.n_layers = self.net.config.n_blocks + 1 if layers else None
        self.prep_kw = dict(window=self.net.config.window, window_mode=window_mode,
                            min_obs=min_obs, cuda=self.device.type == "cuda", bands=self.bands)
        self.timers = timers if timers is not None else Timers()
        self.encoder = WindowEncoder(self.net, self.device, batch_size=batch_size, layers=layers,
                                     timers=self.timers, precision=precision)
        self.meta_kw = dict(window_mode=window_mode, min_obs=min_obs, layers=layers,
                            per_window=per_window, bands=self.bands, sha=weights_sha256(self.net),
                            precision=self.encoder.precision,
                            standardized=None if self.stats is None else self.stats.describe())

    def detect(self, schema: pa.Schema, where: str = "input"):
        return self.columns.detect(schema, where)

    def metadata(self, layout=None) -> dict:
        return _metadata(self.net, layout=layout, **self.meta_kw)

    def schema(self, layout=None) -> pa.Schema:
        return output_schema(self.d, self.n_layers, self.per_window, self.metadata(layout))

    def prepare(self, batch, layout, timers: Timers | None = None):
        return prepare(batch, layout, timers=self.timers if timers is None else timers,
                       **self.prep_kw)

    def embed_chunk(self, chunk, schema: pa.Schema, with_index: bool = False):
        """(embeddings, rejects) tables of a prepared chunk; with ``with_index``, also the chunk
        curve index of every row of each, to interleave them back into input order."""
        res = self.encoder.run(chunk, per_window=self.per_window)
        if self.stats is not None:
            curve_emb, curve_layers, win_emb, win_layers = res
            res = (*self.stats.apply(curve_emb, curve_layers), *self.stats.apply(win_emb,
                                                                                 win_layers))
        t0 = time.perf_counter()
        cols, rejects, index = _chunk_tables(chunk, res, self.d, self.n_layers, self.per_window)
        table = pa.table(cols, schema=schema)
        self.timers.add("write", time.perf_counter() - t0)
        return (table, rejects, index) if with_index else (table, rejects)
