"""Embed light curves from Parquet (or an Arrow table) into one Astromer vector per curve.

This is the first, single-process version of the survey pipeline: nested ``list<struct<time, mag,
magerr>>`` input (the layout of the shared data and of nested-pandas/LSDB), streamed record batch by
record batch, vectorised cleaning and windowing, model on the chosen device, one Parquet of
embeddings per input file plus a rejects file that names every curve left out and why.
"""

from __future__ import annotations

import glob as _glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("band", pa.string()), ("reason", pa.string())])


@dataclass
class EmbedSummary:
    files: list = field(default_factory=list)  # (input, output, rejects) per file
    curves_in: int = 0
    embedded: int = 0
    rejected: int = 0
    seconds: float = 0.0

    def __str__(self):
        rate = self.curves_in / self.seconds if self.seconds else float("nan")
        return (f"{self.curves_in} curves in, {self.embedded} embedded, {self.rejected} rejected "
                f"({len(self.files)} file(s), {self.seconds:.1f} s, {rate:.1f} curves/s)")


def expand_inputs(source) -> list[Path]:
    """A path, a glob, a directory (its *.parquet) or a list of those -> sorted list of files."""
    items = source if isinstance(source, (list, tuple)) else [source]
    files: list[Path] = []
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            matched = sorted(Path(p) for p in _glob.glob(s, recursive=True))
            if not matched:
                raise FileNotFoundError(f"{s}: the pattern matches no file")
            files += matched
        elif Path(s).is_dir():
            matched = sorted(Path(s).glob("*.parquet"))
            if not matched:
                raise FileNotFoundError(f"{s}: the directory holds no *.parquet file")
            files += matched
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise FileNotFoundError(f"{s}: no such file or directory")
    return files


def _check_schema(schema: pa.Schema, where: str, cols):
    missing = [c for c in (cols.id, cols.lightcurve) if c not in schema.names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {schema.names}. Name the "
                         f"columns with id_col= / lightcurve_col=")
    lc = schema.field(cols.lightcurve).type
    if not (pa.types.is_list(lc) or pa.types.is_large_list(lc)) or not pa.types.is_struct(
            lc.value_type):
        raise ValueError(f"{where}: column {cols.lightcurve!r} must be list<struct<{cols.time}, "
                         f"{cols.mag}, ...>>, found {lc}")
    fields = {f.name for f in lc.value_type}
    absent = [c for c in (cols.time, cols.mag) if c not in fields]
    if absent:
        raise ValueError(f"{where}: the light-curve struct lacks {absent}; it has {sorted(fields)}")


@dataclass
class Columns:
    id: str = "id"
    band: str | None = "band"
    lightcurve: str = "lightcurve"
    time: str = "time"
    mag: str = "mag"
    err: str | None = "magerr"


class Embedder:
    """Turns record batches of curves into embedding rows and reject rows, with one model."""

    def __init__(self, model, *, device, batch_size=256, window=None, window_mode="overlap",
                 min_obs=5, cols=Columns()):
        self.model, self.device, self.batch_size = model, torch.device(device), batch_size
        self.window = window or model.config.window
        self.window_mode, self.min_obs, self.cols = window_mode, min_obs, cols

    @torch.no_grad()
    def window_embeddings(self, w) -> np.ndarray:
        """(N, D) float32 embeddings of prepared windows, batch by batch. Each batch is cut to its
        longest window: padded keys carry zero attention weight, so trimming them is exact and
        spares short curves the cost of 200 slots."""
        d = self.model.config.d_model
        out = np.empty((len(w.n_valid), d), np.float32)
        use_bf16 = self.device.type == "cuda"
        for s in range(0, len(out), self.batch_size):
            sl = slice(s, s + self.batch_size)
            width = max(int(w.n_valid[sl].max()), 1)
            t = torch.from_numpy(np.ascontiguousarray(w.t[sl, :width])).to(self.device)
            m = torch.from_numpy(np.ascontiguousarray(w.m[sl, :width])).to(self.device)
            valid = torch.from_numpy(np.ascontiguousarray(w.valid[sl, :width])).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                x = self.model.encode(t, m, ~valid).last
            from astromer_fast.model import masked_mean

            out[sl] = masked_mean(x.float(), valid).cpu().numpy()
        return out

    def process(self, batch: pa.RecordBatch | pa.Table):
        from astromer_fast.data import Curves, basic_clean, make_windows

        c = self.cols
        n = batch.num_rows
        ids = batch.column(c.id).cast(pa.string())
        bands = (batch.column(c.band).cast(pa.string()) if c.band and c.band in batch.schema.names
                 else pa.nulls(n, pa.string()))
        err = c.err if c.err in {f.name for f in batch.schema.field(c.lightcurve).type.value_type} \
            else None
        curves = Curves.from_arrow(batch.column(c.lightcurve), time=c.time, mag=c.mag, err=err)
        curves, report = basic_clean(curves)
        lengths = curves.lengths
        w = make_windows(curves, window=self.window, mode=self.window_mode, min_obs=self.min_obs)
        emb_w = self.window_embeddings(w)
        # Per-curve embedding: window embeddings averaged with their valid counts as weights.
        weights = w.n_valid.astype(np.float64)
        sums = np.zeros((n, emb_w.shape[1]), np.float64)
        np.add.at(sums, w.curve, emb_w * weights[:, None])
        total = np.bincount(w.curve, weights=weights, minlength=n)
        n_windows = np.bincount(w.curve, minlength=n)
        ok = n_windows > 0
        emb = (sums[ok] / total[ok, None]).astype(np.float32)
        if not np.isfinite(emb).all():  # never let a NaN reach the output
            raise FloatingPointError("non-finite embedding produced; please report this input")
        keep = np.flatnonzero(ok)
        d = emb.shape[1]
        table = pa.table({
            "id": ids.take(keep),
            "band": bands.take(keep),
            "n_obs": pa.array(lengths[keep].astype(np.int32)),
            "n_windows": pa.array(n_windows[keep].astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
        })
        bad = np.flatnonzero(~ok)
        reasons = [_reject_reason(report, i, int(lengths[i]), self.min_obs) for i in bad]
        rejects = pa.table({"id": ids.take(bad), "band": bands.take(bad),
                            "reason": pa.array(reasons, pa.string())}, schema=REJECTS_SCHEMA)
        return table, rejects


def _reject_reason(report, i, n_left, min_obs) -> str:
    dropped = report.describe(i) if hasattr(report, "describe") else ""
    why = f"{n_left} valid observation(s) left, fewer than min_obs={min_obs}"
    return f"{why} ({dropped})" if dropped else why


def embed(source, output=None, *, model=None, batch_size: int = 256, device=None,
          window_mode: str = "overlap", min_obs: int = 5, id_col="id", band_col="band",
          lightcurve_col="lightcurve", time_col="time", mag_col="mag", err_col="magerr",
          read_batch_rows: int = 8192, continue_on_error: bool = False, progress: bool = True,
          return_rejects: bool = False):
    """Embed light curves: one 256-float vector per (object, band).

    ``source``: a Parquet path, glob, directory or list of them, or a ``pyarrow.Table``.
    ``output=None``: return a ``pyarrow.Table`` (with ``return_rejects=True``, a pair
    ``(embeddings, rejects)``). ``output=DIR``: write ``<stem>.parquet`` and
    ``<stem>.rejects.parquet`` per input file into DIR and return an :class:`EmbedSummary`.
    ``model``: a packaged model name, a ``save_pretrained`` directory, a released TensorFlow
    checkpoint, or an ``Astromer``; ``None`` uses the packaged default.
    ``window_mode``: "overlap" (the official rule: last window clamped to the curve's end) or
    "nonoverlap" (last window padded).
    """
    from tqdm.auto import tqdm

    from astromer_fast.weights import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_model(model, device=device)
    cols = Columns(id_col, band_col, lightcurve_col, time_col, mag_col, err_col)
    embedder = Embedder(net, device=device, batch_size=batch_size, window_mode=window_mode,
                        min_obs=min_obs, cols=cols)
    meta = _metadata(net, window_mode, min_obs)
    start = time.perf_counter()

    if isinstance(source, (pa.Table, pa.RecordBatch)):
        _check_schema(source.schema, "input table", cols)
        table, rejects = embedder.process(source)
        table = table.replace_schema_metadata(meta)
        return (table, rejects) if return_rejects else table

    files = expand_inputs(source)
    summary = EmbedSummary()
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    tables, all_rejects = [], []
    bar = tqdm(total=None, unit=" curves", disable=not progress, desc="embedding")
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            _check_schema(pf.schema_arrow, str(path), cols)
            parts, rej_parts = [], []
            for rb in pf.iter_batches(batch_size=read_batch_rows):
                t, r = embedder.process(rb)
                parts.append(t)
                rej_parts.append(r)
                summary.curves_in += rb.num_rows
                summary.embedded += t.num_rows
                summary.rejected += r.num_rows
                bar.update(rb.num_rows)
        except (OSError, ValueError, pa.ArrowException) as e:
            msg = f"{path}: {e}"
            if not continue_on_error:
                bar.close()
                raise type(e)(msg) from e
            summary.files.append((str(path), None, f"error: {e}"))
            continue
        table = pa.concat_tables(parts).replace_schema_metadata(meta) if parts else None
        rejects = pa.concat_tables(rej_parts) if rej_parts else REJECTS_SCHEMA.empty_table()
        if out_dir is None:
            tables.append(table)
            all_rejects.append(rejects)
            continue
        dest = out_dir / f"{path.stem}.parquet"
        rdest = out_dir / f"{path.stem}.rejects.parquet"
        if table is None:
            table = _empty_embeddings(net.config.d_model).replace_schema_metadata(meta)
        _write_atomic(table, dest)
        _write_atomic(rejects, rdest)
        summary.files.append((str(path), str(dest), str(rdest)))
    bar.close()
    summary.seconds = time.perf_counter() - start
    if progress:
        print(summary)
    if out_dir is not None:
        return summary
    table = pa.concat_tables([t for t in tables if t is not None]) if any(
        t is not None for t in tables) else _empty_embeddings(net.config.d_model)
    table = table.replace_schema_metadata(meta)
    rejects = pa.concat_tables(all_rejects) if all_rejects else REJECTS_SCHEMA.empty_table()
    return (table, rejects) if return_rejects else table


def _empty_embeddings(d: int) -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "band": pa.array([], pa.string()),
                     "n_obs": pa.array([], pa.int32()), "n_windows": pa.array([], pa.int32()),
                     "embedding": pa.array([], pa.list_(pa.float32(), d))})


def _metadata(model, window_mode, min_obs) -> dict:
    from astromer_fast import __version__

    info = getattr(model, "pretrained_info", {}) or {}
    return {b"astromer_fast": json.dumps({
        "version": __version__,
        "model": model.config.name,
        "model_path": info.get("path"),
        "weights_sha256": info.get("sha256"),
        "config": model.config.to_dict(),
        "preprocessing": {"window": model.config.window, "window_mode": window_mode,
                          "min_obs": min_obs, "centring": "per-window mean of valid t (float64) "
                          "and m", "pooling": "mean over valid observations; curve = windows "
                          "averaged weighted by valid counts"},
    }).encode()}


def _write_atomic(table: pa.Table, dest: Path):
    tmp = dest.with_name(dest.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(dest)
