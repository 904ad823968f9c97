"""Embed light curves from Parquet (or an Arrow table) into one Astromer vector per curve.

The survey pipeline::

    Parquet row groups --(worker thread: read, decode, clean, window, sort)--> bounded queue
        --(main thread: model on the device, pooling and per-curve average on the device)-->
        ParquetWriter on a temporary file --(flush and rename when complete)--> <stem>.parquet

What a run promises about its output folder (nothing replaced but our own outputs, one run at
a time, complete files only, resume equal to a full run) is kept by ``outputs``; inputs are read
with their page checksums verified, and long tables checked to be grouped by object before any
work (``inputs``); every option is checked before any work (``options``).

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
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astromer_fast.data.layouts import detect_layout
from astromer_fast.data.preprocess import MAG_LIMIT, TIME_LIMIT
from astromer_fast.embedding.device import Timers, WindowEncoder
from astromer_fast.embedding.inputs import (PAGE_CHECKSUMS, check_long_table_grouped,
                                            open_parquet)
from astromer_fast.embedding.options import (check_embedder_options, check_run_options,
                                             resolve_device)
from astromer_fast.embedding.outputs import (CAN_RECORD_COUNTS, COUNTS_KEY, INPUT_KEY,
                                             SETTINGS_KEY, OutputFolderLock, commit,
                                             input_identity, plan_outputs, remove_leftover_temps,
                                             temp_path, why_not_reusable)
from astromer_fast.embedding.standardize import load_stats, standardize_method
from astromer_fast.embedding.outputs import output_paths  # noqa: F401 - the engines import it here
from astromer_fast.embedding.stream import LONG_BATCH_ROWS, InputFileError, Job, Producer, \
    open_job, prepare

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("band", pa.string()), ("n_obs", pa.int32()),
                            ("reason", pa.string())])
CLEANING_RULES = ("drop non-finite time/mag/err (null = NaN), "
                  f"|time| > {TIME_LIMIT:.0e} days, |mag| > {MAG_LIMIT:.0e}, err <= 0 and "
                  "repeated times (keep the first); sort by time; reject curves with fewer than "
                  "min_obs observations left, and rows whose parallel lists differ in length")


@dataclass
class EmbedSummary:
    files: list = field(default_factory=list)  # (input, output, rejects) per file; output None
    curves_in: int = 0                          # on error, rejects then holds "error: ..."
    embedded: int = 0
    rejected: int = 0
    filtered: int = 0  # curves of bands not asked for (bands=)
    skipped: list = field(default_factory=list)  # inputs whose output existed (resume)
    redone: list = field(default_factory=list)  # (input, why its existing output was not kept)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:
        return [(src, why) for src, dst, why in self.files if dst is None]

    def __str__(self):
        rate = self.curves_in / self.seconds if self.seconds else float("nan")
        extra = f", {self.filtered} of other bands" if self.filtered else ""
        extra += f", {len(self.skipped)} file(s) already done" if self.skipped else ""
        extra += f", {len(self.redone)} file(s) redone" if self.redone else ""
        extra += f", {len(self.failed)} file(s) FAILED" if self.failed else ""
        return (f"{self.curves_in} curves in, {self.embedded} embedded, {self.rejected} rejected"
                f"{extra} ({len(self.files)} file(s), {self.seconds:.1f} s, {rate:.1f} curves/s)")


def expand_inputs(source) -> list[Path]:
    """A path, a glob, a directory (its *.parquet) or a list of those -> list of files (each
    glob and directory sorted; list order kept; a file named twice is read once). A path that
    exists is taken as it is, even if it holds glob characters such as ``[``."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ValueError("no input given")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"an input must be a path, a glob or a directory, got {item!r}")
        s = os.fspath(item)
        if not s.strip():
            raise ValueError("an input path is empty")
        if Path(s).is_dir():
            matched = sorted(Path(s).glob("*.parquet"))
            if not matched:
                raise FileNotFoundError(f"{s}: the directory holds no *.parquet file")
            files += matched
        elif Path(s).is_file():
            files.append(Path(s))
        elif any(c in s for c in "*?["):
            matched = sorted(Path(p) for p in _glob.glob(s, recursive=True) if Path(p).is_file())
            if not matched:
                raise FileNotFoundError(f"{s}: the pattern matches no file")
            files += matched
        else:
            raise FileNotFoundError(f"{s}: no such file or directory")
    seen, unique = set(), []
    for p in files:
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            unique.append(p)
    return unique


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


class _WriterThread:
    """Writes an output's tables on a thread of its own, in order, so that compression and I/O
    overlap the model. At most ``depth`` tables wait (memory stays bounded); an error in the
    writer is raised by the next ``put`` or by ``finish``."""

    def __init__(self, write, depth: int = 2):
        self.write, self.error = write, None
        self.q = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="astromer-write", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def _raise(self):
        if self.error is not None:
            raise self.error

    def put(self, table, rejects):
        self._raise()
        self.q.put((table, rejects))

    def finish(self, raise_error: bool = True):
        self.q.put(None)
        self.thread.join()
        if raise_error:
            self._raise()


class _Sink:
    """Writes one input's outputs incrementally: ParquetWriter on temporary files of names unique
    to this writer, with page checksums; ``commit`` records the row counts in both footers,
    flushes both files and renames them into place, rejects first (so an existing final output
    means both are complete). ``source``: the input file, recorded in the outputs' metadata so
    that resume can tell whether it changed."""

    def __init__(self, dest: Path | None, rdest: Path | None, schema: pa.Schema, source=None):
        self.dest, self.rdest, self.schema = dest, rdest, schema
        self.tables, self.rejects = [], []
        self.writer = self.rwriter = None
        self.thread = None  # writes (compression, I/O) off the model's thread
        self.rows = self.rejected = 0
        if dest is not None:
            meta = dict(schema.metadata or {})
            if source is not None:
                meta[INPUT_KEY] = json.dumps(input_identity(source)).encode()
            self.schema = schema.with_metadata(meta)
            self.tmp, self.rtmp = temp_path(dest), temp_path(rdest)
            checksums = {"write_page_checksum": True} if PAGE_CHECKSUMS else {}
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", **checksums)
            self.rwriter = pq.ParquetWriter(self.rtmp, REJECTS_SCHEMA.with_metadata(meta),
                                            compression="zstd", **checksums)

    def write(self, table: pa.Table, rejects: pa.Table):
        if self.writer is None:
            self.tables.append(table)
            self.rejects.append(rejects)
            return
        if self.thread is None:
            self.thread = _WriterThread(self._write_now)
        self.thread.put(table, rejects)

    def _write_now(self, table: pa.Table, rejects: pa.Table):
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows
        if rejects.num_rows:
            self.rwriter.write_table(rejects)
            self.rejected += rejects.num_rows

    def commit(self):
        if self.writer is None:
            return
        if self.thread is not None:
            self.thread.finish()  # every table written (or the writer's error raised)
        if CAN_RECORD_COUNTS:
            counts = {COUNTS_KEY: json.dumps({"rows": self.rows, "rejects": self.rejected})}
            self.writer.add_key_value_metadata(counts)
            self.rwriter.add_key_value_metadata(counts)
        self.writer.close()
        self.rwriter.close()
        commit([(self.rtmp, self.rdest), (self.tmp, self.dest)])

    def abort(self):
        if self.thread is not None:
            self.thread.finish(raise_error=False)
        for w in (self.writer, self.rwriter):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - cleaning up after an error already reported
                    pass
        if self.dest is not None:
            self.tmp.unlink(missing_ok=True)
            self.rtmp.unlink(missing_ok=True)


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
    """The per-batch step of :func:`embed`, for engines that bring their own batches
    (``astromer_fast.distributed``): one model loaded once, then record batches (or tables) ->
    decode, clean, window (``stream.prepare``) -> model and pooling (``WindowEncoder``) -> the
    output and rejects tables exactly as ``embed`` writes them. Keywords as ``embed``."""

    def __init__(self, model=None, *, device=None, batch_size: int = 256,
                 window_mode: str = "overlap", min_obs: int = 5, id_col=None, band_col=None,
                 lightcurve_col=None, time_col=None, mag_col=None, err_col=None, layout=None,
                 bands=None, layers: bool = False, per_window: bool = False,
                 timers: Timers | None = None, precision: str | None = None,
                 standardize: bool | str = False):
        from astromer_fast.weights import load_model

        self.bands = check_embedder_options(
            batch_size=batch_size, window_mode=window_mode, min_obs=min_obs, id_col=id_col,
            band_col=band_col, lightcurve_col=lightcurve_col, time_col=time_col, mag_col=mag_col,
            err_col=err_col, layout=layout, bands=bands, layers=layers, per_window=per_window,
            precision=precision, standardize=standardize)
        self.device = resolve_device(device)
        self.net = load_model(model, device=self.device)
        self.net.eval()
        # Loaded before any work: a model without statistics fails here, naming why.
        method = standardize_method(standardize)
        self.stats = load_stats(self.net, method) if method else None
        self.per_window = per_window
        self.d = self.net.config.d_model
        self.n_layers = self.net.config.n_blocks + 1 if layers else None
        self.layout_kw = dict(id_col=id_col, time_col=time_col, mag_col=mag_col, err_col=err_col,
                              band_col=band_col, lightcurve_col=lightcurve_col, layout=layout)
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
        if self.stats is not None:
            curve_emb, curve_layers, win_emb, win_layers = res
            res = (*self.stats.apply(curve_emb, curve_layers), *self.stats.apply(win_emb,
                                                                                 win_layers))
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
          return_rejects: bool = False, prefetch: int = 2, precision: str | None = None,
          standardize: bool | str = False):
    """Embed light curves: one vector (``model.config.d_model`` = 256 floats) per (object, band).

    ``source``: a Parquet path, glob, directory or list of them, or a ``pyarrow.Table``.
    ``output=None``: return a ``pyarrow.Table`` (with ``return_rejects=True``, a pair
    ``(embeddings, rejects)``); meant for small inputs. ``output=DIR`` (Parquet inputs only):
    write ``<stem>.parquet`` and ``<stem>.rejects.parquet`` per input file into DIR, chunk by
    chunk with bounded memory, atomically (temporary file, flushed, then renamed), and return an
    :class:`EmbedSummary`. Before any work the run refuses an output that would replace one of
    its inputs, or a file that two inputs would both write, or a Parquet file there that
    astromer-fast did not write, and takes DIR's lock (``OutputLockedError`` when another run
    holds it; see ``astromer_fast.embedding.outputs``).

    ``model``: a packaged model name, a ``save_pretrained`` directory, a released TensorFlow
    checkpoint, or an ``Astromer``; ``None`` uses the packaged default.
    Columns: found by ``astromer_fast.data.layouts.detect_layout`` (layout and common names
    detected); ``id_col``, ``time_col``, ``mag_col``, ``err_col``, ``band_col``,
    ``lightcurve_col`` override (``err_col=""`` / ``band_col=""``: use none), ``layout`` forces
    one of "nested", "struct_of_lists", "lists", "long". ``bands``: keep only these bands.
    A long table must hold each object's rows together; its id column is read once before any
    work to check that (an object whose rows come back later is an error naming it).
    ``window_mode``: "overlap" (official: last window clamped to the curve's end) or "nonoverlap".
    ``layers=True`` adds a ``layers`` column: the (n_blocks + 1, D) per-layer means (input
    embedding and every block), the input of the paper's gamma-weighted embedding.
    ``per_window=True``: one row per window (``id, band, window, start, n_valid, embedding``).
    ``resume=True``: an input whose outputs exist is skipped when they are complete and were
    made from the same input with the same options and weights; otherwise it is embedded again
    and the reason is reported (``EmbedSummary.redone``). The result equals an uninterrupted run.
    ``continue_on_error=True``: an unreadable input is reported (summary, CLI exit status 1) and
    the others are embedded; otherwise it raises ``ValueError`` naming the file.
    ``precision``: "fp32", "bf16" or None/"auto" (``$ASTROMER_FAST_PRECISION``, else on the CPU
    bf16 where it has native bfloat16 arithmetic, else fp32; on CUDA bf16 autocast). The mode used
    is recorded in the output's metadata; ``bench/RESULTS.md`` gives each mode's accuracy.
    ``standardize=True`` (= "whiten"): ``embedding`` (and every layer of ``layers``) centred and
    whitened (ZCA, directions below bf16 rounding noise faded out) by the mean and whitening
    matrix stored with the model, measured on its pretraining curves;
    ``standardize="channels"``: every channel centred and scaled by its spread only
    (``astromer_fast.embedding.standardize``). Use whitened vectors for cosine similarity and
    nearest-neighbour search. A model without stored statistics is an error before any work.
    Every option is checked before any work; a bad one raises ``ValueError`` naming it.
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    check_run_options(read_batch_rows=read_batch_rows, long_batch_rows=long_batch_rows,
                      prefetch=prefetch, resume=resume, continue_on_error=continue_on_error,
                      progress=progress, return_rejects=return_rejects)
    embedder_kw = dict(batch_size=batch_size, window_mode=window_mode, min_obs=min_obs,
                       id_col=id_col, band_col=band_col, lightcurve_col=lightcurve_col,
                       time_col=time_col, mag_col=mag_col, err_col=err_col, layout=layout,
                       bands=bands, layers=layers, per_window=per_window, precision=precision,
                       standardize=standardize)
    check_embedder_options(**embedder_kw)
    resolve_device(device)
    if output is not None and (not isinstance(output, (str, os.PathLike))
                               or not os.fspath(output).strip()):
        raise ValueError(f"output must be a folder path (or None: return a table), got "
                         f"{output!r}")

    in_memory = isinstance(source, (pa.Table, pa.RecordBatch))
    out_dir = None
    plans = {}
    if in_memory:
        if output is not None:
            raise ValueError("output= is for Parquet inputs (one output per input file); an "
                             "Arrow table in gives a table back: call embed(table) and write "
                             "the result, or write the table to Parquet and embed that file")
        table = pa.Table.from_batches([source]) if isinstance(source, pa.RecordBatch) else source
        jobs = [Job("input table", table=table)]
    else:
        files = expand_inputs(source)
        jobs = [Job(str(p), path=p) for p in files]
        if output is not None:
            out_dir = Path(output)
            plans = dict(zip((job.name for job in jobs), plan_outputs(files, out_dir)))
            out_dir.mkdir(parents=True, exist_ok=True)
    lock = OutputFolderLock(out_dir).acquire() if out_dir is not None else None
    try:
        be = BatchEmbedder(model, device=device, **embedder_kw)
        summary = EmbedSummary()
        jobs = _jobs_to_run(jobs, be, plans, resume, continue_on_error, progress, summary)
        return _run(jobs, be, plans, out_dir is not None, summary, start_time, read_batch_rows,
                    long_batch_rows, prefetch, continue_on_error, progress, return_rejects, tqdm)
    finally:
        if lock is not None:
            lock.release()


def _check_input(job: Job, layout_kw: dict):
    """The layout of a job's input, after the checks that need no work on the curves: it opens,
    and a long table holds each object's rows together. Raises InputFileError naming it."""
    try:
        if job.table is not None:
            src, schema = job.table, job.table.schema
        else:
            src = open_parquet(job.path)
            schema = src.schema_arrow
        layout = detect_layout(schema, job.name, **layout_kw)
        if layout.kind == "long":
            check_long_table_grouped(src, layout.id, job.name, LONG_BATCH_ROWS)
        return layout
    except InputFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is reported against the file
        msg = str(e) if str(e).startswith(job.name) else f"{job.name}: {e}"
        raise InputFileError(msg) from e


def _jobs_to_run(jobs, be, plans, resume, continue_on_error, progress, summary):
    """The jobs left after resume (an output that is complete and made the same way is kept;
    any other is redone, saying why) and after the checks of ``_check_input``. Temporary files
    left by killed runs are removed (the folder's lock is held)."""
    todo = []
    for job in jobs:
        dest, rdest = plans.get(job.name, (None, None))
        if resume and dest is not None and (dest.exists() or rdest.exists()):
            try:
                layout = be.detect(open_parquet(job.path).schema_arrow, job.name)
            except Exception:  # noqa: BLE001 - reported by _check_input below
                layout = None
            if layout is not None:
                why = why_not_reusable(dest, rdest, be.metadata(layout)[SETTINGS_KEY], job.path)
                if why is None:
                    summary.skipped.append(job.name)
                    continue
                summary.redone.append((job.name, why))
                if progress:
                    print(f"redoing {dest}: {why}", file=sys.stderr)
        try:
            _check_input(job, be.layout_kw)
        except InputFileError as e:
            if not continue_on_error:
                raise
            summary.files.append((job.name, None, f"error: {e}"))
            if progress:
                print(f"FAILED {e}")
            continue
        if dest is not None:
            remove_leftover_temps(dest)
            remove_leftover_temps(rdest)
        todo.append(job)
    return todo


def _run(jobs, be, plans, to_folder, summary, start_time, read_batch_rows, long_batch_rows,
         prefetch, continue_on_error, progress, return_rejects, tqdm):
    d, n_layers, per_window, timers = be.d, be.n_layers, be.per_window, be.timers
    total = _count_curves(jobs, be.layout_kw) if progress else None
    bar = tqdm(total=total, unit=" curves", disable=not progress, desc="embedding",
               dynamic_ncols=True, smoothing=0.1)
    producer = Producer(jobs, be.layout_kw, be.prep_kw, read_batch_rows, long_batch_rows,
                        depth=prefetch).start()
    collected, collected_rej, metas = [], [], []
    sink = None
    try:
        for item in producer:
            kind, job = item[0], item[1]
            if kind == "start":
                meta = be.metadata(item[2])
                metas.append(meta)
                dest, rdest = plans.get(job.name, (None, None))
                sink = _Sink(dest, rdest, output_schema(d, n_layers, per_window, meta),
                             source=job.path)
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
                if sink.dest is None:
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
    if to_folder:
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
