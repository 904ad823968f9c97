"""Embed light curves from Parquet (or an Arrow table) into one Astromer vector per curve.

The survey pipeline::

    Parquet row groups --(worker thread: read, decode, clean, window, sort)--> bounded queue
        --(main thread: model on the device, pooling and per-curve average on the device)-->
        ParquetWriter on a temporary file --(flush and rename when complete)--> <stem>.parquet

This module is the driver only: the per-batch step (model, pooling, output tables) is
``batch.BatchEmbedder``, the one ``Embedder`` and the engines use; the host side is ``stream``;
the files are written by ``writer.OutputFile``, the one the engines' driver uses too.

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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from astromer_fast.embedding.batch import (  # noqa: F401 - names this module exported
    CLEANING_RULES,
    REJECTS_SCHEMA,
    BatchEmbedder,
    output_schema,
    weights_sha256,
)
from astromer_fast.embedding.columns import Columns, columns_from
from astromer_fast.embedding.inputs import check_long_table_grouped, open_parquet
from astromer_fast.embedding.options import (check_embedder_options, check_run_options,
                                             resolve_device)
from astromer_fast.embedding.outputs import (SETTINGS_KEY, OutputFolderLock, plan_outputs,
                                             remove_leftover_temps, why_not_reusable)
from astromer_fast.embedding.stream import (LONG_BATCH_ROWS, ChunkReady, FileDone, FileFailed,
                                            FileStarted, InputFileError, Job, Producer, open_job)
from astromer_fast.embedding.writer import OutputFile


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

    def record(self, name: str, out: OutputFile):
        """Count an input whose outputs are complete (written, or kept in memory)."""
        self.curves_in += out.curves + out.filtered
        self.embedded += out.curves - out.rejected_curves
        self.rejected += out.rejected_curves
        self.filtered += out.filtered
        self.files.append((name, "<table>", None) if out.dest is None
                          else (name, str(out.dest), str(out.rdest)))

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


def embed(source, output=None, *, model=None, columns: Columns | None = None,
          batch_size: int = 256, device=None, window_mode: str = "overlap", min_obs: int = 5,
          bands=None, layers: bool = False, per_window: bool = False,
          read_batch_rows: int = 4096, long_batch_rows: int | None = None,
          resume: bool = False, continue_on_error: bool = False, progress: bool = True,
          return_rejects: bool = False, prefetch: int = 2, precision: str | None = None,
          standardize: bool | str = False, **column_keywords):
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
    ``columns``: a :class:`Columns` naming the id, time, mag, err, band or light-curve columns
    or forcing a layout (``err=""`` / ``band=""``: use none); ``None``: found by
    ``astromer_fast.data.layouts.detect_layout`` (layout and common names detected). The older
    keywords ``id_col``, ``time_col``, ``mag_col``, ``err_col``, ``band_col``,
    ``lightcurve_col`` and ``layout`` are still taken and mean the same (not with ``columns``).
    ``bands``: keep only these bands.
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
    columns = columns_from(columns, **column_keywords)
    embedder_kw = dict(batch_size=batch_size, window_mode=window_mode, min_obs=min_obs,
                       bands=bands, layers=layers, per_window=per_window, precision=precision,
                       standardize=standardize)
    check_embedder_options(**embedder_kw)
    resolve_device(device)
    if output is not None and (not isinstance(output, (str, os.PathLike))
                               or not os.fspath(output).strip()):
        raise ValueError(f"output must be a folder path (or None: return a table), got "
                         f"{output!r}")

    if isinstance(source, (pa.Table, pa.RecordBatch)):
        if output is not None:
            raise ValueError("output= is for Parquet inputs (one output per input file); an "
                             "Arrow table in gives a table back: call embed(table) and write "
                             "the result, or write the table to Parquet and embed that file")
        table = pa.Table.from_batches([source]) if isinstance(source, pa.RecordBatch) else source
        jobs, plans, out_dir = [Job("input table", table=table)], {}, None
    else:
        files = expand_inputs(source)
        jobs = [Job(str(p), path=p) for p in files]
        plans, out_dir = {}, None
        if output is not None:
            out_dir = Path(output)
            plans = dict(zip((job.name for job in jobs), plan_outputs(files, out_dir)))
            out_dir.mkdir(parents=True, exist_ok=True)

    lock = OutputFolderLock(out_dir).acquire() if out_dir is not None else None
    try:
        be = BatchEmbedder(model, columns=columns, device=device, **embedder_kw)
        summary = EmbedSummary()
        jobs = _jobs_to_run(jobs, be, plans, resume, continue_on_error, progress, summary)
        bar = tqdm(total=_count_curves(jobs, columns) if progress else None, unit=" curves",
                   disable=not progress, desc="embedding", dynamic_ncols=True, smoothing=0.1)
        with bar:
            producer = Producer(jobs, columns, be.prep_kw, read_batch_rows, long_batch_rows,
                                depth=prefetch).start()
            try:
                kept, meta = _embed_jobs(producer, be, plans, summary, bar,
                                         continue_on_error=continue_on_error, progress=progress)
            finally:
                producer.close()
    finally:
        if lock is not None:
            lock.release()
    summary.seconds = time.perf_counter() - start_time
    summary.timings = {**producer.timers, **be.timers, "total": summary.seconds}
    if progress:
        print(summary)
    if out_dir is not None:
        return summary
    table, rejects = _tables_kept(kept, be, meta)
    return (table, rejects) if return_rejects else table


def _tables_kept(kept: list, be: BatchEmbedder, meta: dict | None):
    """(embeddings, rejects) of the inputs embedded into memory, one table each, with the
    metadata of the first input (``meta``; None: no input was read)."""
    schema = be.schema() if meta is None else output_schema(be.d, be.n_layers, be.per_window, meta)
    tables = [t for out in kept for t in out.tables]
    table = pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables]) \
        if tables else schema.empty_table()
    rejects = [r for out in kept for r in out.rejects]
    return (table.replace_schema_metadata(schema.metadata),
            pa.concat_tables(rejects) if rejects else REJECTS_SCHEMA.empty_table())


def _embed_jobs(producer, be: BatchEmbedder, plans: dict, summary: EmbedSummary, bar, *,
                continue_on_error: bool, progress: bool):
    """The main thread's loop: each chunk the producer prepared goes through the model into its
    input's ``OutputFile``; an input's files are committed when its last chunk is in. Returns
    (the ``OutputFile`` of every input done, in order; the metadata of the first input
    started)."""
    kept, first_meta = [], None
    out = None
    try:
        for event in producer:
            if isinstance(event, FileStarted):
                dest, rdest = plans.get(event.job.name, (None, None))
                schema = be.schema(event.layout)
                first_meta = schema.metadata if first_meta is None else first_meta
                out = OutputFile(dest, rdest, schema, source=event.job.path)
            elif isinstance(event, ChunkReady):
                chunk = event.chunk
                table, rejects = be.embed_chunk(chunk, out.schema)
                t0 = time.perf_counter()
                out.write(table, rejects, chunk.n_curves, chunk.n_filtered)
                be.timers.add("write", time.perf_counter() - t0)
                bar.update(chunk.n_curves + chunk.n_filtered)
            elif isinstance(event, FileDone):
                t0 = time.perf_counter()
                out.commit()
                be.timers.add("write", time.perf_counter() - t0)
                summary.record(event.job.name, out)
                kept.append(out)
                out = None
            elif isinstance(event, FileFailed):
                if out is not None:
                    out.abort()
                    out = None
                if not continue_on_error:
                    raise event.error
                summary.files.append((event.job.name, None, f"error: {event.error}"))
                if progress:
                    bar.write(f"FAILED {event.error}")
    except BaseException:
        if out is not None:
            out.abort()
        raise
    return kept, first_meta


def _check_input(job: Job, columns: Columns):
    """The layout of a job's input, after the checks that need no work on the curves: it opens,
    and a long table holds each object's rows together. Raises InputFileError naming it."""
    try:
        if job.table is not None:
            src, schema = job.table, job.table.schema
        else:
            src = open_parquet(job.path)
            schema = src.schema_arrow
        layout = columns.detect(schema, job.name)
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
            _check_input(job, be.columns)
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


def _count_curves(jobs, columns: Columns):
    """Total curves for the progress bar when every input has one row per curve (else None)."""
    total = 0
    for job in jobs:
        try:
            layout, _ = open_job(job, columns)
        except InputFileError:
            continue
        if layout.kind == "long" or layout.band_per_obs:
            return None
        total += job.table.num_rows if job.table is not None else \
            pq.ParquetFile(job.path).metadata.num_rows
    return total
