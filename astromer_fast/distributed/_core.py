"""What the Ray and Dask integrations share, with neither engine imported: the plan of work
units over Parquet files, the worker-side runner (the single-process ``BatchEmbedder`` on each
unit's record batches), the driver that writes one output per input exactly as ``embed`` does,
and the in-band form (embeddings and rejects in one table) used by Ray Data and Dask frames.

Why the results equal a single process bit for bit: a unit is a run of the record batches that
``embed`` itself would read (``ParquetFile.iter_batches(batch_size=read_batch_rows)``, a grid of
``read_batch_rows`` rows over the whole file), so every batch holds the same curves and goes
through the same decode, clean, window, model and pooling code. Long tables (one row per
observation) are never split: a unit is then the whole file, read as ``embed`` reads it.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astromer_fast.embedding.device import Timers
from astromer_fast.embedding.batch import REJECTS_SCHEMA, BatchEmbedder
from astromer_fast.embedding.columns import COLUMN_KEYWORDS, Columns, columns_from
from astromer_fast.embedding.embed import EmbedSummary, expand_inputs
from astromer_fast.embedding.inputs import check_long_table_grouped, open_parquet
from astromer_fast.embedding.outputs import (SETTINGS_KEY, OutputFolderLock, output_paths,
                                             plan_outputs, remove_leftover_temps,
                                             why_not_reusable)
from astromer_fast.embedding.stream import LONG_BATCH_ROWS, InputFileError, Job, open_job
from astromer_fast.embedding.writer import OutputFile
from astromer_fast.data.layouts import iter_grouped

# BatchEmbedder's keywords; everything a worker needs to rebuild the same embedder.
EMBEDDER_OPTIONS = ("model", "device", "batch_size", "window_mode", "min_obs", "columns",
                    "bands", "layers", "per_window", "precision", "standardize")


def split_options(kw: dict) -> tuple[dict, dict]:
    """(BatchEmbedder keywords, the rest); the old column keywords (``id_col``...) of ``embed``
    are taken too, folded into ``columns``."""
    emb = {k: v for k, v in kw.items() if k in EMBEDDER_OPTIONS}
    old = {k: v for k, v in kw.items() if k in COLUMN_KEYWORDS}
    emb["columns"] = columns_from(emb.get("columns"), **old)
    return emb, {k: v for k, v in kw.items() if k not in EMBEDDER_OPTIONS + tuple(old)}


# ---------------------------------------------------------------------------------------------
# One table holding embeddings and rejects, for engines whose map step returns one table
# ---------------------------------------------------------------------------------------------

def combined_schema(schema: pa.Schema) -> pa.Schema:
    """The output schema plus ``reason`` (null for an embedded curve). A rejected curve's row has
    null ``embedding`` (and ``layers``); its ``n_obs`` (per-window: ``n_valid``) holds the
    observations as read, as in the rejects file, and ``n_windows`` 0."""
    return schema.append(pa.field("reason", pa.string()))


def combine(table: pa.Table, rejects: pa.Table, index, schema: pa.Schema) -> pa.Table:
    """Embeddings and rejects of one chunk in one table, rows in the chunk's curve order."""
    row_curve, ridx = index
    out = combined_schema(schema)
    n_rej = rejects.num_rows
    cols = {}
    for f in schema:
        if f.name in ("id", "band"):
            cols[f.name] = pa.concat_arrays([table[f.name].combine_chunks(),
                                             rejects[f.name].combine_chunks()])
        elif f.name in ("n_obs", "n_valid"):
            cols[f.name] = pa.concat_arrays([table[f.name].combine_chunks(),
                                             rejects["n_obs"].combine_chunks()])
        elif f.name == "n_windows":
            cols[f.name] = pa.concat_arrays([table[f.name].combine_chunks(),
                                             pa.array(np.zeros(n_rej, np.int32))])
        else:
            cols[f.name] = pa.concat_arrays([table[f.name].combine_chunks(),
                                             pa.nulls(n_rej, f.type)])
    cols["reason"] = pa.concat_arrays([pa.nulls(table.num_rows, pa.string()),
                                       rejects["reason"].combine_chunks()])
    both = pa.table(cols, schema=out)
    # Stable: the windows of one curve keep their order; a curve is either embedded or rejected.
    order = np.argsort(np.concatenate([row_curve, ridx]), kind="stable")
    return both.take(pa.array(order))


def split_rejects(combined: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A combined table (``RayEmbedder`` / ``embed_partition`` output) -> (embeddings in the
    single-process output schema, rejects in the rejects-file schema)."""
    if isinstance(combined, pa.RecordBatch):
        combined = pa.Table.from_batches([combined])
    rejected = pc.is_valid(combined["reason"])
    emb = combined.filter(pc.invert(rejected)).drop_columns(["reason"])
    emb_schema = pa.schema([f.with_nullable(True) for f in emb.schema],
                           metadata=combined.schema.metadata)
    emb = emb.cast(emb_schema) if emb.schema != emb_schema else emb
    rej = combined.filter(rejected)
    count = "n_obs" if "n_obs" in rej.column_names else "n_valid"
    rej = pa.table({"id": rej["id"], "band": rej["band"], "n_obs": rej[count],
                    "reason": rej["reason"]}, schema=REJECTS_SCHEMA)
    return emb, rej


def embed_table(be: BatchEmbedder, table: pa.Table, read_batch_rows: int, layout=None,
                where: str = "input") -> pa.Table:
    """A table of one-row-per-curve light curves -> the combined table, cut into batches of
    ``read_batch_rows`` rows as ``embed`` cuts a file (same composition from a grid-aligned
    start)."""
    layout = layout or be.detect(table.schema, where)
    if layout.kind == "long":
        raise ValueError(f"{where}: a long table (one row per observation) cannot be embedded "
                         "batch by batch here, as an object may straddle two batches; embed "
                         "its files with embed_files / embed() instead")
    schema = be.schema(layout)
    parts = []
    for chunk in prepared(be, layout, (table.slice(s, read_batch_rows)
                                       for s in range(0, table.num_rows, read_batch_rows))):
        parts.append(combine(*be.embed_chunk(chunk, schema, with_index=True), schema))
    out = combined_schema(schema)
    return pa.concat_tables(parts) if parts else out.empty_table()


def prepared(be: BatchEmbedder, layout, batches, timers: Timers | None = None):
    """Prepared chunks of ``batches``, the next one decoded on a thread while the model runs on
    the current one (the overlap the single-process producer thread gives)."""
    tm = timers if timers is not None else Timers()
    with ThreadPoolExecutor(1, thread_name_prefix="astromer-decode") as pool:
        ahead = None
        for b in batches:
            nxt = pool.submit(be.prepare, b, layout, tm)
            if ahead is not None:
                yield ahead.result()
            ahead = nxt
        if ahead is not None:
            yield ahead.result()


# ---------------------------------------------------------------------------------------------
# Work units over files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """Part ``part`` of ``n_parts`` of input ``file`` (position in the input list): the record
    batches ``ranges`` (global [start, stop) rows) read from ``row_groups``; ``ranges=None``: the
    whole file, read as ``embed`` reads it (long tables, files whose footer could not be read)."""

    file: int
    path: str
    part: int
    n_parts: int
    ranges: tuple | None
    row_groups: tuple = ()
    first_row: int = 0
    n_rows: int = 0


def batch_grid(n_rows: int, read_batch_rows: int) -> list[tuple[int, int]]:
    """The record batches ``ParquetFile.iter_batches(batch_size=read_batch_rows)`` yields: a grid
    over the whole file, across row groups (checked by the tests against the installed pyarrow)."""
    return [(s, min(s + read_batch_rows, n_rows)) for s in range(0, n_rows, read_batch_rows)]


def plan_file(file: int, path, read_batch_rows: int, batches_per_task: int, columns: Columns):
    """The tasks of one input file, in order."""
    path = str(path)
    try:
        md = pq.ParquetFile(path).metadata
        layout = columns.detect(md.schema.to_arrow_schema(), path)
    except Exception:  # noqa: BLE001 - the worker reads it again and reports it against the file
        return [Task(file, path, 0, 1, None)]
    if layout.kind == "long":
        return [Task(file, path, 0, 1, None, n_rows=md.num_rows)]
    starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    grid = batch_grid(md.num_rows, read_batch_rows)
    groups = [grid[i:i + batches_per_task] for i in range(0, len(grid), batches_per_task)]
    if not groups:  # an empty file still gets its (empty) outputs, as with embed
        return [Task(file, path, 0, 1, (), n_rows=0)]
    tasks = []
    for k, ranges in enumerate(groups):
        a, b = ranges[0][0], ranges[-1][1]
        g0 = int(np.searchsorted(starts, a, side="right")) - 1
        g1 = int(np.searchsorted(starts, b, side="left"))
        tasks.append(Task(file, path, k, len(groups), tuple(ranges), tuple(range(g0, g1)),
                          int(starts[g0]), b - a))
    return tasks


def auto_batches_per_task(total_rows: int, read_batch_rows: int, workers: int) -> int:
    """Units of a few batches: about four per worker for balance, at most 16 batches each so the
    driver's ordered write never waits long behind one unit."""
    per_worker = total_rows / max(1, 4 * workers) / read_batch_rows
    return int(min(16, max(1, np.ceil(per_worker))))


@dataclass
class TaskResult:
    task: Task
    schema: pa.Schema | None = None  # output schema with the file's metadata
    table: pa.Table | None = None
    rejects: pa.Table | None = None
    n_curves: int = 0
    n_filtered: int = 0
    error: str | None = None
    worker: str = ""
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


def _crash_once(marker: str | None):
    """Fault injection for the tests: the first worker to get here dies abruptly (the marker
    file, created atomically, makes it happen once across restarts and workers)."""
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(17)


class TaskRunner:
    """The worker side: one ``BatchEmbedder`` (model loaded once), any number of tasks."""

    def __init__(self, options: dict, read_batch_rows: int = 4096,
                 long_batch_rows: int | None = None, crash_once: str | None = None,
                 num_threads: int | None = None):
        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.be = BatchEmbedder(**options)
        self.columns = self.be.columns
        self.rows = int(read_batch_rows)
        self.long_rows = long_batch_rows or max(LONG_BATCH_ROWS, self.rows)
        self.crash_once = crash_once
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def run(self, task: Task) -> TaskResult:
        t0 = time.perf_counter()
        res = TaskResult(task, worker=self.name)
        self.be.timers.clear()
        try:
            if task.ranges is None:
                layout, batches = open_job(Job(task.path, path=Path(task.path)), self.columns)
                if layout.kind == "long":  # before any work, as embed does
                    check_long_table_grouped(open_parquet(task.path), layout.id, task.path,
                                             LONG_BATCH_ROWS)
                source = (iter_grouped(batches(self.long_rows), layout.id)
                          if layout.kind == "long" else batches(self.rows))
            else:
                pf = open_parquet(task.path)
                layout = self.columns.detect(pf.schema_arrow, task.path)
                data = (pf.read_row_groups(list(task.row_groups), columns=layout.columns())
                        if task.ranges else None)
                source = (data.slice(a - task.first_row, b - a) for a, b in task.ranges)
            res.schema = self.be.schema(layout)
            tables, rejects = [], []
            for chunk in prepared(self.be, layout, source, self.be.timers):
                table, rej = self.be.embed_chunk(chunk, res.schema)
                _crash_once(self.crash_once)  # mid-task: work done, nothing returned yet
                tables.append(table)
                rejects.append(rej)
                res.n_curves += chunk.n_curves
                res.n_filtered += chunk.n_filtered
            res.table = pa.concat_tables(tables) if tables else res.schema.empty_table()
            res.rejects = (pa.concat_tables(rejects) if rejects
                           else REJECTS_SCHEMA.empty_table())
        except Exception as e:  # noqa: BLE001 - reported against the file by the driver
            msg = str(e) if str(e).startswith(task.path) else f"{task.path}: {e}"
            res.error = msg
            res.table = res.rejects = None
        res.seconds = time.perf_counter() - t0
        res.timings = dict(self.be.timers)
        return res


# ---------------------------------------------------------------------------------------------
# The driver: ordered, bounded, one output file per input, as embed writes them
# ---------------------------------------------------------------------------------------------

@dataclass
class DistributedSummary(EmbedSummary):
    engine: str = ""
    workers: dict = field(default_factory=dict)  # worker -> tasks it completed
    tasks: int = 0


def prepare_outputs(source, output, resume: bool, options: dict | None = None):
    """(files to do, files skipped, output dir), with the same checks as ``embed``: no input
    or foreign file replaced, no output written twice; with ``resume``, an existing output is
    kept only when ``embed`` would keep it (``options``: the embedder's, to know the settings;
    the model is loaded on this machine's CPU for that). The folder's lock is taken by
    ``drive``, around all the writing."""
    files = expand_inputs(source)
    out_dir = Path(output)
    plans = plan_outputs(files, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], []
    embedder = None
    for p, (dest, rdest) in zip(files, plans):
        if resume and (dest.exists() or rdest.exists()):
            if embedder is None:
                embedder = BatchEmbedder(**{**(options or {}), "device": "cpu"})
            try:
                layout = embedder.detect(open_parquet(p).schema_arrow, str(p))
                why = why_not_reusable(dest, rdest, embedder.metadata(layout)[SETTINGS_KEY], p)
            except Exception as e:  # noqa: BLE001 - the input is reported when it is embedded
                why = f"its input cannot be read ({e})"
            if why is None:
                skipped.append(str(p))
                continue
            print(f"redoing {dest}: {why}", file=sys.stderr)
        todo.append(p)
    return todo, skipped, out_dir


def plan(files, read_batch_rows: int, batches_per_task: int | None, workers: int,
         columns: Columns) -> list[Task]:
    if batches_per_task is None:
        total = 0
        for p in files:
            try:
                total += pq.ParquetFile(p).metadata.num_rows
            except Exception:  # noqa: BLE001 - reported by the worker
                pass
        batches_per_task = auto_batches_per_task(total, read_batch_rows, workers)
    return [t for i, p in enumerate(files)
            for t in plan_file(i, p, read_batch_rows, batches_per_task, columns)]


def drive(tasks, results, out_dir: Path, summary: DistributedSummary, *,
          continue_on_error: bool = False, progress: bool = True):
    """Write the outputs from ``results`` (an iterator of TaskResult in task order): each file's
    parts in order into a temporary file, renamed when its last part is in, as ``embed``; the
    output folder's lock is held meanwhile."""
    from tqdm.auto import tqdm

    lock = OutputFolderLock(out_dir).acquire()
    total = sum(t.n_rows for t in tasks) if all(t.ranges is not None for t in tasks) else None
    bar = tqdm(total=total, unit=" rows", disable=not progress, desc="embedding",
               dynamic_ncols=True, smoothing=0.1)
    out = None
    failed_file = None
    try:
        for task in tasks:
            for p in output_paths(Path(task.path), out_dir):
                remove_leftover_temps(p)
        for res in results:
            task = res.task
            summary.tasks += 1
            summary.workers[res.worker] = summary.workers.get(res.worker, 0) + 1
            for k, v in res.timings.items():
                summary.timings[k] = summary.timings.get(k, 0.0) + v
            if task.file == failed_file:
                continue
            if task.part == 0 and res.error is None:
                dest, rdest = output_paths(Path(task.path), out_dir)
                out = OutputFile(dest, rdest, res.schema, source=task.path)
            if res.error is not None:
                if out is not None:
                    out.abort()
                    out = None
                failed_file = task.file
                if not continue_on_error:
                    raise InputFileError(res.error)
                summary.files.append((task.path, None, f"error: {res.error}"))
                bar.write(f"FAILED {res.error}") if progress else None
                continue
            out.write(res.table, res.rejects, res.n_curves, res.n_filtered)
            bar.update(task.n_rows)
            if task.part == task.n_parts - 1:
                out.commit()
                summary.record(task.path, out)
                out = None
    except BaseException:
        if out is not None:
            out.abort()
        raise
    finally:
        bar.close()
        lock.release()
    return summary
