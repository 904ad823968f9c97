"""Embedding on Dask: a ``map_partitions`` function for (nested-)pandas partitions and LSDB
catalogues, and a file-to-file driver on a ``distributed`` cluster.

Frames (one row per object or per (object, band); any layout but the long one)::

    import dask.dataframe as dd
    from astromer_fast.distributed.dask import embed_dataframe

    ddf = dd.read_parquet("curves/", dtype_backend="pyarrow")
    emb = embed_dataframe(ddf, model="astromer2-base")   # ddf.map_partitions(embed_partition)

LSDB (the output is again a catalogue: same partitions, same ``_healpix_29`` index, ra/dec kept)::

    import lsdb
    from astromer_fast import Columns
    from astromer_fast.distributed.dask import embed_catalog

    cat = lsdb.read_hats("ztf_lc/")
    emb = embed_catalog(cat, model="astromer2-base", columns=Columns(lightcurve="lc"))
    emb.to_hats("ztf_emb/")

Every output row is one curve, in input order, indexed like the input row it came from: the
columns of ``embed``'s output, ``reason`` (null when embedded; a rejected curve has a null
``embedding`` and ``n_obs`` the observations as read), and the input columns named in ``carry``.
The model is loaded once per worker process and kept (``embed_partition`` caches it by options).

Files to files (the same output files as ``embed``, units retried on another worker when one
dies)::

    from dask.distributed import Client
    from astromer_fast.distributed.dask import embed_files
    embed_files("curves/*.parquet", "emb/", client=Client("tcp://scheduler:8786"))
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    import dask.dataframe  # noqa: F401 - fail early, with the install line, without the extra
    import pandas as pd
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("astromer_fast.distributed.dask needs Dask: pip install "
                      "'astromer-fast[dask]' (or pip install 'dask[distributed]')") from e

from astromer_fast.data.layouts import _as_string
from astromer_fast.distributed._core import (DistributedSummary, TaskRunner, combined_schema,
                                              drive, embed_table, plan, prepare_outputs,
                                              split_options, split_rejects, _crash_once)
from astromer_fast.embedding.batch import BatchEmbedder, weights_sha256

__all__ = ["embed_partition", "partition_meta", "embed_dataframe", "embed_catalog",
           "embed_files", "split_rejects"]

_LOCK = threading.Lock()
_CACHE: dict = {}  # kind -> (options key, object): per process, the last options seen


def _key(options: dict, extra=()):
    model = options.get("model")
    if model is not None and not isinstance(model, (str, bytes)) and \
            not hasattr(model, "__fspath__"):
        model = ("weights", weights_sha256(model)[0])  # an Astromer arrives unpickled per task
    items = tuple(sorted((k, repr(v)) for k, v in options.items() if k != "model"))
    return (repr(model), items) + tuple(extra)


def _worker_threads():
    """The thread count Dask gave this worker (torch then uses as many), or None outside one."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except Exception:  # noqa: BLE001 - not in a distributed worker
        return None


def _cached(kind, options: dict, make, extra=()):
    key = _key(options, extra)
    with _LOCK:
        hit = _CACHE.get(kind)
        if hit is None or hit[0] != key:  # one model per process, not one per option set seen
            _CACHE.pop(kind, None)
            hit = _CACHE[kind] = (key, make())
        return hit[1]


def _embedder(options: dict, num_threads) -> BatchEmbedder:
    def make():
        threads = num_threads or _worker_threads()
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return BatchEmbedder(**options)

    return _cached("embedder", options, make)


def _empty(schema: pa.Schema, df=None, carry=()) -> pd.DataFrame:
    out = combined_schema(schema).empty_table().to_pandas(types_mapper=pd.ArrowDtype)
    for c in carry:
        out[c] = df[c].iloc[:0].array if df is not None else pd.Series(dtype=object)
    if df is not None:
        out.index = df.index[:0]
    return out


def embed_partition(df: pd.DataFrame, model=None, *, read_batch_rows: int = 4096, carry=(),
                    num_threads: int | None = None, _crash_once_marker: str | None = None,
                    **options) -> pd.DataFrame:
    """One partition (pandas or nested-pandas, one row per object or per (object, band)) -> one
    row per curve (see the module docstring), indexed like the input rows. ``carry``: input
    columns copied to each output row (e.g. ra, dec). ``num_threads``: torch threads (default:
    the Dask worker's thread count). Other keywords as ``embed``. Batches of ``read_batch_rows``
    rows from the partition's start: the same curves per batch as ``embed`` on a file when the
    partition starts at a multiple of ``read_batch_rows`` rows of it."""
    emb_kw, rest = split_options({"model": model, **options})
    if rest:
        raise TypeError(f"embed_partition got unexpected options {sorted(rest)}")
    be = _embedder(emb_kw, num_threads)
    carry = list(carry)
    if len(df) == 0:
        return _empty(be.schema(), df, carry)
    table = pa.Table.from_pandas(df, preserve_index=False)
    layout = be.detect(table.schema, "partition")
    if layout.kind == "long":
        raise ValueError("embed_partition needs one row per object (or per (object, band)); "
                         "for a long table (one row per observation) use embed_files")
    # Curves are traced back to their input row through the id column: row numbers go in, and
    # come out on every output row (embedded or rejected); the ids are put back afterwards.
    i = table.schema.get_field_index(layout.id)
    numbered = table.set_column(i, layout.id, pa.array(np.arange(len(df), dtype=np.int64)))
    out = embed_table(be, numbered, read_batch_rows, layout, "partition")
    _crash_once(_crash_once_marker)  # tests: the worker dies after the work, before returning
    rows = pc.cast(out["id"], pa.int64()).to_numpy(zero_copy_only=False)
    out = out.set_column(0, "id", _as_string(table.column(layout.id)).take(pa.array(rows)))
    frame = out.to_pandas(types_mapper=pd.ArrowDtype)
    for c in carry:
        frame[c] = df[c].array.take(rows)
    frame.index = df.index.take(rows)
    return type(df)(frame) if type(df) is not pd.DataFrame else frame


def partition_meta(model=None, df=None, *, carry=(), **options) -> pd.DataFrame:
    """The empty frame ``embed_partition`` returns for these options (Dask's ``meta=``); ``df``
    (an input frame or its meta) gives the index and the ``carry`` columns their types."""
    emb_kw, _ = split_options({"model": model, **options})
    emb_kw["device"] = "cpu"  # only the shapes are wanted; no GPU on the client
    be = _cached("meta", emb_kw, lambda: BatchEmbedder(**emb_kw))
    return _empty(be.schema(), df, list(carry))


def embed_dataframe(ddf, model=None, *, carry=(), **options):
    """``ddf.map_partitions(embed_partition, ...)`` with its ``meta``: a lazy Dask frame."""
    meta = partition_meta(model, ddf._meta, carry=carry, **options)
    return ddf.map_partitions(embed_partition, model=model, carry=tuple(carry), meta=meta,
                              **options)


def embed_catalog(catalog, model=None, *, carry=None, **options):
    """An LSDB catalogue -> an LSDB catalogue of embeddings with the same partitions and index;
    ``carry`` defaults to the catalogue's ra and dec columns (which LSDB needs)."""
    if carry is None:
        info = catalog.hc_structure.catalog_info
        carry = [c for c in (info.ra_column, info.dec_column) if c]
    meta = partition_meta(model, catalog.meta, carry=carry, **options)
    return catalog.map_partitions(embed_partition, model=model, carry=tuple(carry), meta=meta,
                                  **options)


def _run_task(task, options, read_batch_rows, long_batch_rows, crash_once):
    runner = _cached("runner", options,
                     lambda: TaskRunner(options, read_batch_rows, long_batch_rows, crash_once,
                                        num_threads=_worker_threads()),
                     extra=(read_batch_rows, long_batch_rows, crash_once))
    return runner.run(task)


def embed_files(source, output, *, client=None, address: str | None = None, retries: int = 3,
                read_batch_rows: int = 4096, long_batch_rows: int | None = None,
                batches_per_task: int | None = None, resume: bool = False,
                continue_on_error: bool = False, progress: bool = True,
                _crash_once_marker: str | None = None, **options) -> DistributedSummary:
    """``embed(source, output, ...)`` on a Dask ``distributed`` cluster; the same output files.

    ``client``: a ``distributed.Client`` (default: the current one, else one connected to
    ``address``, else a new local cluster). A unit whose worker dies is rerun elsewhere (the
    scheduler's ``distributed.scheduler.allowed-failures``, default 3); ``retries``: reruns of a
    unit that raised. Other keywords as in ``astromer_fast.distributed.ray.embed_files``."""
    from distributed import Client, get_client

    emb_kw, rest = split_options(options)
    if rest:
        raise TypeError(f"embed_files got unexpected options {sorted(rest)}")
    t_start = time.perf_counter()
    todo, skipped, out_dir = prepare_outputs(source, output, resume, emb_kw)
    own = None
    if client is None:
        try:
            client = get_client() if address is None else None
        except ValueError:
            client = None
        if client is None:
            client = own = Client(address) if address else Client()
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        summary = DistributedSummary(engine=f"dask ({workers} worker(s))")
        summary.skipped = skipped
        if todo:
            tasks = plan(todo, read_batch_rows, batches_per_task, workers, emb_kw["columns"])
            [opts] = client.scatter([emb_kw], broadcast=True)  # the model once per worker
            drive(tasks, _ordered(client, tasks, opts, read_batch_rows, long_batch_rows,
                                  _crash_once_marker, retries, 2 * workers), out_dir, summary,
                  continue_on_error=continue_on_error, progress=progress)
    finally:
        if own is not None:
            own.close()
    summary.seconds = time.perf_counter() - t_start
    summary.timings["total"] = summary.seconds
    if progress:
        print(summary)
    return summary


def _ordered(client, tasks, opts, rows, long_rows, crash_once, retries, window):
    pending = deque()
    it = iter(tasks)

    def submit(t):
        pending.append(client.submit(_run_task, t, opts, rows, long_rows, crash_once,
                                     pure=False, retries=retries))

    for t in it:
        submit(t)
        if len(pending) >= window:
            break
    try:
        while pending:
            res = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                submit(nxt)
            yield res
    finally:
        for f in pending:
            f.cancel()
