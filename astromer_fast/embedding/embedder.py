"""Astromer embeddings for light curves held in numpy arrays: arrays in, arrays out.

    from astromer_fast import Embedder

    emb = Embedder()                      # the packaged model, loaded once
    vector = emb(t, m, err)               # one curve -> numpy (256,)
    matrix = emb.many([(t1, m1), (t2, m2, e2)])   # N curves -> numpy (N, 256), batched
    emb.to_parquet("curves.parquet", "embeddings/")   # files -> files (``embed``)

An ``Embedder`` is not a second pipeline: it hands its curves to the same per-batch step as
:func:`astromer_fast.embed` (``BatchEmbedder``: ``basic_clean``, ``make_windows``, the model,
the pooling and the per-curve average), so a curve gives the same vector through either door.
A curve that cannot be embedded (fewer than ``min_obs`` valid observations after cleaning) is
an error naming its reason, or, with ``many(..., on_reject="nan" | "zero")``, a row the caller
asked to be filled so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from astromer_fast.data import Curves
from astromer_fast.embedding.batch import BatchEmbedder
from astromer_fast.embedding.columns import (COLUMN_KEYWORDS, Columns, check_columns,
                                             columns_from)
from astromer_fast.embedding.embed import embed
from astromer_fast.embedding.options import positive_int

ON_REJECT = ("raise", "nan", "zero")
# The table many() builds from its arrays: row numbers as ids, one nested column, no band.
ARRAYS_TABLE = Columns(id="id", band="", lightcurve="lightcurve", layout="nested")


def _one_curve(t, m, err, where: str):
    """Checked 1-D arrays of one curve: (t float64, m float32, err float32 | None)."""
    arrays = []
    for name, a, dtype in (("t", t, np.float64), ("m", m, np.float32), ("err", err, np.float32)):
        if a is None:
            arrays.append(None)
            continue
        try:
            a = np.asarray(a, dtype=dtype)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} must be an array of numbers") from None
        if a.ndim != 1:
            raise ValueError(f"{where}: {name} must be one-dimensional, got shape {a.shape}")
        arrays.append(a)
    t, m, err = arrays
    if t is None or m is None:
        raise ValueError(f"{where}: t and m are required")
    if len(m) != len(t) or (err is not None and len(err) != len(t)):
        lens = f"t {len(t)}, m {len(m)}" + ("" if err is None else f", err {len(err)}")
        raise ValueError(f"{where}: t, m and err must have the same length ({lens})")
    return t, m, err


def as_curves(curves) -> Curves:
    """``Curves`` as they are, or a sequence of ``(t, m)`` / ``(t, m, err)`` arrays -> ``Curves``
    (uncleaned; cleaning is the embedding's own). All curves give an error or none do."""
    if isinstance(curves, Curves):
        return curves
    if isinstance(curves, (pa.Table, pa.RecordBatch)) or hasattr(curves, "iloc"):
        raise ValueError("many() takes (t, m[, err]) arrays per curve; for a table use "
                         "astromer_fast.embed(table), which gives one row per (id, band)")
    parts = []
    for i, item in enumerate(curves):
        if isinstance(item, np.ndarray) or not hasattr(item, "__len__") or len(item) not in (2, 3):
            raise ValueError(f"curve {i}: each light curve must be a tuple (t, m) or (t, m, err)")
        parts.append(_one_curve(*item, None, where=f"curve {i}") if len(item) == 2
                     else _one_curve(*item, where=f"curve {i}"))
    with_err = {p[2] is not None for p in parts}
    if len(with_err) > 1:
        raise ValueError("some curves have an err array and some do not: give all or none")
    if not parts:
        return Curves(np.zeros(0), np.zeros(0, np.float32), None, np.zeros(1, np.int64))
    return Curves.from_arrays([p[0] for p in parts], [p[1] for p in parts],
                              [p[2] for p in parts] if with_err == {True} else None)


def describe_rejects(rejected: dict, shown: int = 5) -> str:
    """A message naming the first ``shown`` rejected curves and why."""
    listed = "; ".join(f"curve {i}: {why}" for i, why in list(rejected.items())[:shown])
    more = f" (and {len(rejected) - shown} more)" if len(rejected) > shown else ""
    return f"{len(rejected)} light curve(s) cannot be embedded: {listed}{more}"


class Embedder:
    """Astromer embeddings of light curves given as arrays, with the cleaning, windows and
    pooling of :func:`astromer_fast.embed` (see its docstring for the rules).

    ``model``: a packaged model name, a ``save_pretrained`` directory, a released TensorFlow
    checkpoint or an ``Astromer`` (``None``: the packaged default), loaded once.
    ``precision``: "fp32", "bf16" or None (``$ASTROMER_FAST_PRECISION``, else the device's
    default; ``.precision`` says which is used). ``device``: "cpu", "cuda", "cuda:N" or None
    (CUDA when available). ``window_mode``: "overlap" (official) or "nonoverlap".
    ``columns``: a :class:`Columns`, used by :meth:`to_parquet`. ``layers=True``: each curve
    gives the (n_blocks + 1, D) per-layer means instead of the last block's (D,) mean.
    ``chunk_curves``: curves prepared at a time by :meth:`many` (bounds its memory)."""

    def __init__(self, model=None, *, precision: str | None = None, device=None,
                 window_mode: str = "overlap", columns: Columns | None = None,
                 min_obs: int = 5, batch_size: int = 256, layers: bool = False,
                 chunk_curves: int = 4096):
        self.columns = columns_from(columns)
        self.chunk_curves = positive_int("chunk_curves", chunk_curves)
        self._batch = BatchEmbedder(model, columns=self.columns, device=device,
                                    batch_size=batch_size, window_mode=window_mode,
                                    min_obs=min_obs, layers=layers, precision=precision)
        self._embed_kw = dict(batch_size=batch_size, window_mode=window_mode, min_obs=min_obs,
                              layers=layers, precision=precision)
        self.model = self._batch.net
        self.device = self._batch.device
        self.precision = self._batch.encoder.precision
        self.window_mode, self.min_obs, self.layers = window_mode, min_obs, layers
        cfg = self.model.config
        self.shape = (cfg.n_blocks + 1, cfg.d_model) if layers else (cfg.d_model,)

    def __repr__(self):
        return (f"Embedder(model={self.model.config.name!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, window_mode={self.window_mode!r})")

    def __call__(self, t, m, err=None) -> np.ndarray:
        """One light curve (times in days, magnitudes, optional errors) -> float32 ``shape``
        ((256,) for the packaged model). Raises ``ValueError`` with the reason when the curve
        cannot be embedded."""
        return self.many([(t, m) if err is None else (t, m, err)])[0]

    def many(self, curves, *, on_reject: str = "raise") -> np.ndarray:
        """Light curves -> float32 (N,) + ``shape``, row i for curve i, batched on the device.

        ``curves``: a sequence of ``(t, m)`` or ``(t, m, err)`` arrays, or
        ``astromer_fast.data.Curves``. ``on_reject``: "raise" (``ValueError`` listing the curves
        that cannot be embedded and why), or give such a curve a row of "nan" / "zero"."""
        if on_reject not in ON_REJECT:
            raise ValueError(f"on_reject must be one of {ON_REJECT}, got {on_reject!r}")
        out, rejected = self.embed_rows(curves)
        if rejected and on_reject == "raise":
            raise ValueError(f"{describe_rejects(rejected)}. Drop them, or pass "
                             f"on_reject='nan' / 'zero'")
        out[list(rejected)] = np.nan if on_reject == "nan" else 0.0
        return out

    def embed_rows(self, curves) -> tuple[np.ndarray, dict]:
        """(float32 (N,) + ``shape`` with zero rows for rejected curves, {curve index: why it
        was rejected}): the work of :meth:`many`, for callers that word their own errors."""
        curves = as_curves(curves)
        n = len(curves)
        out = np.zeros((n,) + self.shape, np.float32)
        rejected = {}
        schema = self._batch.schema()
        column = "layers" if self.layers else "embedding"
        for lo in range(0, n, self.chunk_curves):
            part = curves.take(np.arange(lo, min(n, lo + self.chunk_curves)))
            # Row numbers as ids: the output rows are put back in place by them.
            table = pa.table({"id": pa.array(np.arange(len(part)).astype(str)),
                              "lightcurve": part.to_arrow()})
            layout = ARRAYS_TABLE.detect(table.schema, "arrays")
            chunk = self._batch.prepare(table, layout)
            rows, rejects, (row_curve, reject_curve) = self._batch.embed_chunk(
                chunk, schema, with_index=True)
            values = rows.column(column).combine_chunks().flatten()
            if self.layers:
                values = values.flatten()
            out[lo + row_curve] = values.to_numpy().reshape((len(row_curve),) + self.shape)
            reasons = rejects.column("reason").to_pylist()
            rejected.update({lo + int(i): why for i, why in zip(reject_curve, reasons)})
        return out, rejected

    def to_parquet(self, source, output, **options):
        """Embed Parquet files into ``output`` (a folder) with :func:`astromer_fast.embed` and
        this embedder's model and settings; ``options``: more of ``embed``'s keywords
        (``resume``, ``progress``, ``bands``, ``per_window``...; ``columns`` or an old column
        keyword such as ``id_col`` replaces what this embedder's ``columns`` say).
        Returns its ``EmbedSummary``."""
        if output is None:
            raise ValueError("to_parquet needs an output folder; for a table in memory call "
                             "astromer_fast.embed(source)")
        columns = options.pop("columns", None)
        old = {k: options.pop(k) for k in list(options) if k in COLUMN_KEYWORDS}
        if old:
            if columns is not None:
                columns_from(columns, **old)  # both given: refused, naming them
            check_columns(old)
            columns = dataclasses.replace(self.columns, **{COLUMN_KEYWORDS[k]: v
                                                           for k, v in old.items()})
        return embed(source, output, model=self.model, device=self.device,
                     columns=self.columns if columns is None else columns,
                     **{**self._embed_kw, **options})
