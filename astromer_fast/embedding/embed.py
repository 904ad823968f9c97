"""Embed light curves from Parquet (or an Arrow table) into one Astromer vector per curve.

The survey pipeline::

    Parquet row groups --(worker thread: read, decode, clean, window, sort)--> bounded queue
        --(main thread: model on the device, pooling and per-curve average on the device)-->
        ParquetWriter on <stem>.parquet.tmp --(rename when complete)--> <stem>.parquet

Inputs: a Parquet file, glob, directory or a list of them, or a ``pyarrow.Table``; any layout of
``astromer_fast.data.layouts`` (nested list<struct>, struct of lists, parallel lists, long table),
detected from the schema. Memory is bounded by a few chunks of ``read_batch_rows`` curves.

Cleaning and reject rules (every curve that is not embedded is written to the rejects file with
its reason; nothing disappears silently):

1. ``basic_clean``: drop observations whose time, magnitude or error is NaN/inf (a null value is
   NaN), whose time or magnitude is beyond ``TIME_LIMIT`` / ``MAG_LIMIT`` (not measurements, and
   they would overflow float32), whose error is <= 0, and repeated times (the first in input
   order is kept); sort each curve by time. Errors are optional: without an error column only
   time/mag are checked.
2. A curve left with fewer than ``min_obs`` (default 5, as the official pipeline) observations is
   rejected: empty curves, curves emptied by step 1, short curves. Rows whose parallel lists have
   different lengths are rejected as such.
3. Windows: ``window_mode="overlap"`` (default, the official rule: 200-observation windows at 0,
   200, ..., the last clamped to the curve's end) or ``"nonoverlap"`` (last window padded);
   each window centred on its valid observations (time in float64 first).
4. Embedding: mean of the last block over the valid observations of each window; the curve's
   embedding is the mean of its windows weighted by their valid counts. A non-finite result
   (never seen; it would be a bug) rejects the curve rather than writing a NaN.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from astromer_fast.embedding.device import Timers, WindowEncoder
from astromer_fast.data.layouts import detect_layout
from astromer_fast.data.preprocess import MAG_LIMIT, TIME_LIMIT
from astromer_fast.embedding.stream import InputFileError, Job, Producer, open_job, prepare

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("band", pa.string()), ("n_obs", pa.int32()),
                            ("reason", pa.string())])
CLEANING_RULES = ("drop non-finite time/mag/err (null = NaN), "
                  f"|time| > {TIME_LIMIT:.0e} days, |mag| > {MAG_LIMIT:.0e}, err <= 0 and repeated times (keep the first); sort by time; reject curves with "
                  "fewer than min_obs observations left, and rows whose parallel lists differ in "
                  "length")


@dataclass
class EmbedSummary:
    files: list = field(default_factory=list)  # (input, output, rejects) per file; output None
    curves_in: int = 0                          # on error, rejects then holds "error: ..."
    embedded: int = 0
    rejected: int = 0
    filtered: int = 0  # curves of bands not asked for (bands=)
    skipped: list = field(default_factory=list)  # inputs whose output existed (resume)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:
        return [(src, why) for src, dst, why in self.files if dst is None]

    def __str__(self):
        rate = self.curves_in / self.seconds if self.seconds else float("nan")
        extra = f", {self.filtered} of other bands" if self.filtered else ""
        extra += f", {len(self.skipped)} file(s) already done" if self.skipped else ""
        extra += f", {len(self.failed)} file(s) FAILED" if self.failed else ""
        return (f"{self.curves_in} curves in, {self.embedded} embedded, {self.rejected} rejected"
                f"{extra} ({len(self.files)} file(s), {self.seconds:.1f} s, {rate:.1f} curves/s)")


def expand_inputs(source) -> list[Path]:
    """A path, a glob, a directory (its *.parquet) or a list of those -> list of files (each
    glob and directory sorted; list order kept)."""
    items = source if isinstance(source, (list, tuple)) else [source]
    files: list[Path] = []
    for item in items:
        s = str(item)
        if any(c in s for c in "*?["):
            matched = sorted(Path(p) for p in _glob.glob(s, recursive=True) if Path(p).is_file())
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


def output_paths(path: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{path.stem}.parquet", out_dir / f"{path.stem}.rejects.parquet"


def _tmp(p: Path) -> Path:
    return p.with_name(p.name + ".tmp")


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


class _Sink:
    """Writes one input's outputs incrementally: ParquetWriter on temp files, renamed into place
    by ``commit`` (rejects first, so an existing final output means both are complete)."""

    def __init__(self, dest: Path | None, rdest: Path | None, schema: pa.Schema):
        self.dest, self.rdest, self.schema = dest, rdest, schema
        self.tables, self.rejects = [], []
        self.writer = self.rwriter = None
        if dest is not None:
            for p in (_tmp(dest), _tmp(rdest)):
                p.unlink(missing_ok=True)
            self.writer = pq.ParquetWriter(_tmp(dest), schema, compression="zstd")
            self.rwriter = pq.ParquetWriter(_tmp(rdest), REJECTS_SCHEMA, compression="zstd")

    def write(self, table: pa.Table, rejects: pa.Table):
        if self.writer is None:
            self.tables.append(table)
            self.rejects.append(rejects)
            return
        if table.num_rows:
            self.writer.write_table(table)
        if rejects.num_rows:
            self.rwriter.write_table(rejects)

    def commit(self):
        if self.writer is None:
            return
        self.writer.close()
        self.rwriter.close()
        _tmp(self.rdest).replace(self.rdest)
        _tmp(self.dest).replace(self.dest)

    def abort(self):
        for w in (self.writer, self.rwriter):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - cleaning up after an error already reported
                    pass
        if self.dest is not None:
            _tmp(self.dest).unlink(missing_ok=True)
            _tmp(self.rdest).unlink(missing_ok=True)


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
              bands=None, sha=None) -> dict:
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
    """The per-batch step of :func:`embed`, for engines that bring their own batches
    (``astromer_fast.distributed``): one model loaded once, then record batches (or tables) ->
    decode, clean, window (``stream.prepare``) -> model and pooling (``WindowEncoder``) -> the
    output and rejects tables exactly as ``embed`` writes them. Keywords as ``embed``."""

    def __init__(self, model=None, *, device=None, batch_size: int = 256,
                 window_mode: str = "overlap", min_obs: int = 5, id_col=None, band_col=None,
                 lightcurve_col=None, time_col=None, mag_col=None, err_col=None, layout=None,
                 bands=None, layers: bool = False, per_window: bool = False,
                 timers: Timers | None = None):
        from astromer_fast.weights import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = load_model(model, device=self.device)
        self.net.eval()
        self.per_window = per_window
        self.d = self.net.config.d_model
        self.n_layers = self.net.config.n_blocks + 1 if layers else None
        self.bands = None if bands is None else ([bands] if isinstance(bands, str)
                                                 else list(bands))
        self.layout_kw = dict(id_col=id_col, time_col=time_col, mag_col=mag_col, err_col=err_col,
                              band_col=band_col, lightcurve_col=lightcurve_col, layout=layout)
        self.prep_kw = dict(window=self.net.config.window, window_mode=window_mode,
                            min_obs=min_obs, cuda=self.device.type == "cuda", bands=self.bands)
        self.meta_kw = dict(window_mode=window_mode, min_obs=min_obs, layers=layers,
                            per_window=per_window, bands=self.bands, sha=weights_sha256(self.net))
        self.timers = timers if timers is not None else Timers()
        self.encoder = WindowEncoder(self.net, self.device, batch_size=batch_size, layers=layers,
                                     timers=self.timers)

    def detect(self, schema: pa.Schema, where: str = "input"):
        return detect_layout(schema, where, **self.layout_kw)

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
        t0 = time.perf_counter()
        cols, rejects, index = _chunk_tables(chunk, res, self.d, self.n_layers, self.per_window)
        table = pa.table(cols, schema=schema)
        self.timers.add("write", time.perf_counter() - t0)
        return (table, rejects, index) if with_index else (table, rejects)


def embed(source, output=None, *, model=None, batch_size: int = 256, device=None,
          window_mode: str = "overlap", min_obs: int = 5, id_col=None, band_col=None,
          lightcurve_col=None, time_col=None, mag_col=None, err_col=None, layout=None,
          bands=None, layers: bool = False, per_window: bool = False,
          read_batch_rows: int = 4096, long_batch_rows: int | None = None,
          resume: bool = False, continue_on_error: bool = False, progress: bool = True,
          return_rejects: bool = False, prefetch: int = 2):
    """Embed light curves: one vector (``model.config.d_model`` = 256 floats) per (object, band).

    ``source``: a Parquet path, glob, directory or list of them, or a ``pyarrow.Table``.
    ``output=None``: return a ``pyarrow.Table`` (with ``return_rejects=True``, a pair
    ``(embeddings, rejects)``); meant for small inputs. ``output=DIR``: write ``<stem>.parquet``
    and ``<stem>.rejects.parquet`` per input file into DIR, chunk by chunk with bounded memory,
    atomically (temp file + rename), and return an :class:`EmbedSummary`.

    ``model``: a packaged model name, a ``save_pretrained`` directory, a released TensorFlow
    checkpoint, or an ``Astromer``; ``None`` uses the packaged default.
    Columns: found by ``astromer_fast.data.layouts.detect_layout`` (layout and common names
    detected); ``id_col``, ``time_col``, ``mag_col``, ``err_col``, ``band_col``,
    ``lightcurve_col`` override (``err_col=""`` / ``band_col=""``: use none), ``layout`` forces
    one of "nested", "struct_of_lists", "lists", "long". ``bands``: keep only these bands.
    ``window_mode``: "overlap" (official: last window clamped to the curve's end) or "nonoverlap".
    ``layers=True`` adds a ``layers`` column: the (n_blocks + 1, D) per-layer means (input
    embedding and every block), the input of the paper's gamma-weighted embedding.
    ``per_window=True``: one row per window (``id, band, window, start, n_valid, embedding``).
    ``resume=True``: inputs whose final output exists are skipped (leftover temp files are
    discarded and redone); the result equals an uninterrupted run.
    ``continue_on_error=True``: an unreadable input is reported (summary, CLI exit status 1) and
    the others are embedded; otherwise it raises ``ValueError`` naming the file.
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    be = BatchEmbedder(model, device=device, batch_size=batch_size, window_mode=window_mode,
                       min_obs=min_obs, id_col=id_col, band_col=band_col,
                       lightcurve_col=lightcurve_col, time_col=time_col, mag_col=mag_col,
                       err_col=err_col, layout=layout, bands=bands, layers=layers,
                       per_window=per_window)
    d, n_layers, layout_kw, prep_kw, timers = be.d, be.n_layers, be.layout_kw, be.prep_kw, be.timers
    summary = EmbedSummary()

    in_memory = isinstance(source, (pa.Table, pa.RecordBatch))
    if in_memory:
        table = pa.Table.from_batches([source]) if isinstance(source, pa.RecordBatch) else source
        jobs = [Job("input table", table=table)]
        out_dir = None
    else:
        files = expand_inputs(source)
        out_dir = Path(output) if output is not None else None
        jobs = [Job(str(p), path=p) for p in files]
        if out_dir is not None:
            stems = {}
            for p in files:
                if p.stem in stems and stems[p.stem] != p:
                    raise ValueError(f"{p} and {stems[p.stem]} would both write "
                                     f"{p.stem}.parquet; give them different names")
                stems[p.stem] = p
            out_dir.mkdir(parents=True, exist_ok=True)
            todo = []
            for job in jobs:
                dest, rdest = output_paths(job.path, out_dir)
                if resume and dest.is_file() and rdest.is_file():
                    summary.skipped.append(job.name)
                else:
                    todo.append(job)
            jobs = todo

    total = _count_curves(jobs, layout_kw) if progress else None
    bar = tqdm(total=total, unit=" curves", disable=not progress, desc="embedding",
               dynamic_ncols=True, smoothing=0.1)
    producer = Producer(jobs, layout_kw, prep_kw, read_batch_rows, long_batch_rows,
                        depth=prefetch).start()
    collected, collected_rej, metas = [], [], []
    sink = None
    try:
        for item in producer:
            kind, job = item[0], item[1]
            if kind == "start":
                meta = be.metadata(item[2])
                metas.append(meta)
                dest = rdest = None
                if out_dir is not None:
                    dest, rdest = output_paths(job.path, out_dir)
                sink = _Sink(dest, rdest, output_schema(d, n_layers, per_window, meta))
                file_counts = [0, 0, 0, 0]
            elif kind == "chunk":
                chunk = item[2]
                tbl, rejects = be.embed_chunk(chunk, sink.schema)
                t0 = time.perf_counter()
                sink.write(tbl, rejects)
                timers.add("write", time.perf_counter() - t0)
                n_emb = chunk.n_curves - rejects.num_rows
                file_counts[0] += chunk.n_curves
                file_counts[1] += n_emb
                file_counts[2] += rejects.num_rows
                file_counts[3] += chunk.n_filtered
                bar.update(chunk.n_curves + chunk.n_filtered)
            elif kind == "end":
                t0 = time.perf_counter()
                sink.commit()
                timers.add("write", time.perf_counter() - t0)
                summary.curves_in += file_counts[0] + file_counts[3]
                summary.embedded += file_counts[1]
                summary.rejected += file_counts[2]
                summary.filtered += file_counts[3]
                if out_dir is None:
                    collected += sink.tables
                    collected_rej += sink.rejects
                    summary.files.append((job.name, "<table>", None))
                else:
                    summary.files.append((job.name, str(sink.dest), str(sink.rdest)))
                sink = None
            elif kind == "error":
                if sink is not None:
                    sink.abort()
                    sink = None
                err = item[2]
                if not continue_on_error:
                    raise err
                summary.files.append((job.name, None, f"error: {err}"))
                bar.write(f"FAILED {err}") if progress else None
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        producer.close()
        bar.close()
    summary.seconds = time.perf_counter() - start_time
    summary.timings = {**producer.timers, **timers, "total": summary.seconds}
    if progress:
        print(summary)
    if out_dir is not None:
        return summary
    meta = metas[0] if metas else be.metadata()
    schema = output_schema(d, n_layers, per_window, meta)
    table = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in collected]) \
        if collected else schema.empty_table()
    table = table.replace_schema_metadata(meta)
    rejects = pa.concat_tables(collected_rej) if collected_rej else REJECTS_SCHEMA.empty_table()
    return (table, rejects) if return_rejects else table


def _count_curves(jobs, layout_kw):
    """Total curves for the progress bar when every input has one row per curve (else None)."""
    total = 0
    for job in jobs:
        try:
            layout, _ = open_job(job, layout_kw)
        except InputFileError:
            continue
        if layout.kind == "long" or layout.band_per_obs:
            return None
        total += job.table.num_rows if job.table is not None else \
            pq.ParquetFile(job.path).metadata.num_rows
    return total
