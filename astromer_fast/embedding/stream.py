"""The host side of the embedding pipeline: read record batches, decode, clean and window them on
a worker thread, and hand prepared chunks to the model through a bounded queue.

Memory is bounded by (queue depth + 2) chunks of ``read_batch_rows`` curves, whatever the input
size: nothing accumulates across chunks (outputs are written chunk by chunk).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astromer_fast.data import basic_clean, make_windows
from astromer_fast.data.fast_host import host_path, prepare_cpp
from astromer_fast.data.layouts import Layout, decode_batch, iter_grouped
from astromer_fast.embedding.device import Timers, pin
from astromer_fast.embedding.inputs import open_parquet

# Rows per record batch of a long table (one row per observation).
LONG_BATCH_ROWS = 1 << 19


@dataclass
class Chunk:
    """One batch of curves, decoded, cleaned and windowed, ready for the device.

    ``ids``/``bands``: one entry per curve (input order). ``n_obs``: valid observations per
    curve after cleaning; ``n_in``: observations as read. ``windows_per_curve``. ``reasons``:
    (curve index, reason) of every curve left out. ``tensors``: the windows sorted by decreasing
    valid count (t, m, valid, curve, n_valid; pinned on CUDA); ``start``/``order``: each sorted
    window's start in its curve and its position in curve order."""

    ids: pa.Array
    bands: pa.Array
    n_obs: np.ndarray
    n_in: np.ndarray
    windows_per_curve: np.ndarray
    reasons: list
    tensors: dict
    n_valid_sorted: np.ndarray
    start: np.ndarray
    order: np.ndarray
    n_rows: int
    n_filtered: int = 0

    @property
    def n_curves(self) -> int:
        return len(self.n_obs)

    @property
    def n_windows(self) -> int:
        return len(self.n_valid_sorted)


def reject_reason(report, problems, i, n_left, min_obs) -> str:
    if i in problems:
        return problems[i]
    n_in = int(report.n_in[i])
    if n_in == 0:
        return "empty light curve (0 observations)"
    why = f"{n_left} valid observation(s) left, fewer than min_obs={min_obs}"
    dropped = report.describe(i)
    return f"{why} ({dropped})" if dropped else why


def prepare(batch, layout: Layout, **kw) -> Chunk:
    """Decode, clean, window and sort one batch: in C++ (``fast_host.prepare_cpp``), or with
    numpy (``prepare_python``, the reference) when ``$ASTROMER_FAST_HOST`` is "python". Both
    give the same chunk, bit for bit."""
    if host_path() == "python":
        return prepare_python(batch, layout, **kw)
    return prepare_cpp(batch, layout, **kw)


def prepare_python(batch, layout: Layout, *, window: int, window_mode: str, min_obs: int,
                   cuda: bool = False, bands=None, timers: Timers | None = None) -> Chunk:
    """Decode (vectorised), clean (``basic_clean``), window (``make_windows``) and sort one
    batch. The only Python loop is over rejected curves, to word their reasons."""
    tm = timers if timers is not None else Timers()
    t0 = time.perf_counter()
    dec = decode_batch(batch, layout)
    n_filtered = 0
    if bands is not None:
        keep = pc.fill_null(pc.is_in(dec.bands, value_set=pa.array(list(bands), pa.string())),
                            False).to_numpy(zero_copy_only=False)
        if not keep.all():
            idx = np.flatnonzero(keep)
            n_filtered = len(keep) - len(idx)
            remap = {int(j): i for i, j in enumerate(idx)}
            dec.problems = {remap[k]: v for k, v in dec.problems.items() if k in remap}
            dec.ids, dec.bands = dec.ids.take(pa.array(idx)), dec.bands.take(pa.array(idx))
            dec.curves = dec.curves.take(idx)
    t1 = time.perf_counter()
    curves, report = basic_clean(dec.curves)
    t2 = time.perf_counter()
    w = make_windows(curves, window=window, mode=window_mode, min_obs=min_obs)
    n = len(curves)
    per_curve = np.bincount(w.curve, minlength=n)
    order = np.argsort(-w.n_valid, kind="stable")
    tensors = {"t": pin(w.t[order], cuda), "m": pin(w.m[order], cuda),
               "valid": pin(w.valid[order], cuda), "curve": pin(w.curve[order], cuda),
               "n_valid": pin(w.n_valid[order], cuda)}
    lengths = curves.lengths
    reasons = [(int(i), reject_reason(report, dec.problems, int(i), int(lengths[i]), min_obs))
               for i in np.flatnonzero(per_curve == 0)]
    t3 = time.perf_counter()
    tm.add("decode", t1 - t0)
    tm.add("clean", t2 - t1)
    tm.add("window", t3 - t2)
    return Chunk(dec.ids, dec.bands, lengths, report.n_in, per_curve, reasons, tensors,
                 w.n_valid[order], w.start[order], order, dec.n_rows, n_filtered)


@dataclass
class Job:
    """One input: a Parquet path or an in-memory table (``name`` labels it in messages)."""

    name: str
    path: object = None
    table: pa.Table | None = None


class InputFileError(ValueError):
    """An input could not be read or does not hold light curves; the message names it."""


def open_job(job: Job, columns):
    """(layout, batch iterator factory) for a job, its columns found with ``columns`` (a
    ``Columns``); raises InputFileError."""
    try:
        if job.table is not None:
            schema = job.table.schema
            layout = columns.detect(schema, job.name)
            return layout, lambda rows: iter(job.table.select(layout.columns())
                                             .to_batches(max_chunksize=rows))
        pf = open_parquet(job.path)
        schema = pf.schema_arrow
        layout = columns.detect(schema, job.name)
        return layout, lambda rows: pf.iter_batches(batch_size=rows, columns=layout.columns())
    except InputFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is reported against the file
        msg = str(e) if str(e).startswith(job.name) else f"{job.name}: {e}"
        raise InputFileError(msg) from e


# Row groups up to this many rows (or 4 read batches) are read whole by a preparing thread;
# files with bigger ones are read batch by batch on the producer thread, so memory stays bounded
# by a few batches whatever the file's row groups.
ROW_GROUP_ROWS = 65536


def _row_groups(job: Job, rows: int):
    """(footer, number of row groups) when the job's row groups are read by the preparing
    threads, else None. Chunks are then cut at row-group boundaries whatever the number of
    threads, so the outputs do not depend on it."""
    if job.path is None:
        return None
    metadata = open_parquet(job.path).metadata
    n = metadata.num_row_groups
    if any(metadata.row_group(i).num_rows > max(ROW_GROUP_ROWS, 4 * rows) for i in range(n)):
        return None
    return metadata, n


class _Done:
    """An already computed result with the interface of a future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@dataclass
class FileStarted:
    job: Job
    layout: Layout


@dataclass
class ChunkReady:
    job: Job
    chunk: Chunk


@dataclass
class FileDone:
    job: Job


@dataclass
class FileFailed:
    job: Job
    error: InputFileError


_ALL_DONE = object()


class Producer:
    """The worker thread. Iterating gives, for each job, ``FileStarted``, then ``ChunkReady``
    for each chunk in input order, then ``FileDone`` or ``FileFailed``. The queue is bounded, so
    the worker runs at most ``depth`` chunks ahead of the model. ``columns``: a ``Columns``."""

    def __init__(self, jobs, columns, prep_kw, read_batch_rows, long_batch_rows=None,
                 depth: int = 2, workers: int | None = None):
        self.jobs, self.columns, self.prep_kw = jobs, columns, prep_kw
        if workers is None:
            # On a GPU the host is the bottleneck (more host work than model time on one thread;
            # bench/RESULTS.md); on the CPU the model needs the cores.
            env = os.environ.get("ASTROMER_FAST_DECODE_WORKERS")
            workers = int(env) if env else (min(4, max(1, (os.cpu_count() or 2) - 2))
                                             if prep_kw.get("cuda") else 1)
        self.workers = max(1, int(workers))
        self.rows = read_batch_rows
        self.long_rows = long_batch_rows or max(LONG_BATCH_ROWS, read_batch_rows)
        self.q = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.timers = Timers()
        self.thread = threading.Thread(target=self._run, name="astromer-decode", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="astromer-prepare") \
            if self.workers > 1 else None
        try:
            self._run_jobs()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)

    def _run_jobs(self):
        for job in self.jobs:
            if self.stop.is_set():
                return
            try:
                layout, batches = open_job(job, self.columns)
                if not self._put(FileStarted(job, layout)):
                    return
                groups = None if layout.kind == "long" else _row_groups(job, self.rows)
                if groups is not None:
                    if not self._run_row_groups(job, layout, *groups):
                        return
                    if not self._put(FileDone(job)):
                        return
                    continue
                if layout.kind == "long":
                    it = iter_grouped(batches(self.long_rows), layout.id, job.name)
                else:
                    it = batches(self.rows)
                # Batches are read in order on this thread and prepared by ``workers`` threads
                # (numpy, Arrow and the C++ host pass release the GIL); chunks are handed on in
                # input order.
                pending = deque()
                while True:
                    t0 = time.perf_counter()
                    try:
                        rb = next(it)
                    except StopIteration:
                        break
                    self.timers.add("read", time.perf_counter() - t0)
                    if self.pool is None:
                        pending.append(_Done(prepare(rb, layout, timers=self.timers,
                                                     **self.prep_kw)))
                    else:
                        pending.append(self.pool.submit(prepare, rb, layout,
                                                        timers=self.timers, **self.prep_kw))
                    while len(pending) >= self.workers:
                        if not self._put(ChunkReady(job, pending.popleft().result())):
                            return
                while pending:
                    if not self._put(ChunkReady(job, pending.popleft().result())):
                        return
                item = FileDone(job)
            except Exception as e:  # noqa: BLE001 - reported against the file by the consumer
                msg = str(e) if str(e).startswith(job.name) else f"{job.name}: {e}"
                item = FileFailed(job, InputFileError(msg))
                item.error.__cause__ = e
            if not self._put(item):
                return
        self._put(_ALL_DONE)

    def _read_and_prepare(self, job, layout, metadata, group):
        """The chunks of one row group, read and prepared on a preparing thread."""
        t0 = time.perf_counter()
        pf = open_parquet(job.path, metadata)  # a handle per thread: readers are not shared
        batches = list(pf.iter_batches(batch_size=self.rows, row_groups=[group],
                                       columns=layout.columns(), use_threads=False))
        self.timers.add("read", time.perf_counter() - t0)
        return [prepare(rb, layout, timers=self.timers, **self.prep_kw) for rb in batches]

    def _run_row_groups(self, job, layout, metadata, n_groups) -> bool:
        """Row groups read and prepared by ``workers`` threads at once, chunks handed on in
        input order; at most ``workers`` row groups are in flight. False when stopped."""
        pending = deque()
        for group in range(n_groups + 1):
            if group < n_groups:
                if self.pool is None:
                    pending.append(_Done(self._read_and_prepare(job, layout, metadata, group)))
                else:
                    pending.append(self.pool.submit(self._read_and_prepare, job, layout,
                                                    metadata, group))
            while pending and (len(pending) >= self.workers or group == n_groups):
                for chunk in pending.popleft().result():
                    if not self._put(ChunkReady(job, chunk)):
                        return False
        return True

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            item = self.q.get()
            self.timers.add("wait (model idle)", time.perf_counter() - t0)
            if item is _ALL_DONE:
                return
            yield item

    def close(self):
        self.stop.set()
        try:  # unblock a worker waiting on a full queue
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=10)
