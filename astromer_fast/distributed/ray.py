"""Embedding on Ray: a Ray Data callable class, and a file-to-file driver on a pool of actors.

Ray Data (your pipeline, your batches)::

    import ray
    from ray.data import ActorPoolStrategy
    from astromer_fast.distributed.ray import RayEmbedder

    ds = ray.data.read_parquet("s3://bucket/curves/")
    emb = ds.map_batches(RayEmbedder, fn_constructor_kwargs={"model": "astromer2-base"},
                         batch_format="pyarrow", batch_size=4096, num_gpus=1,
                         compute=ActorPoolStrategy(size=4))
    emb.write_parquet("s3://bucket/emb/")

Each actor loads the model once (on its GPU when it was given one: Ray sets
``CUDA_VISIBLE_DEVICES``), and runs the single-process ``BatchEmbedder`` (decode, clean, window,
model, pooling) on every batch. Rows of rejected curves stay in the output with a ``reason``
(``split_rejects`` separates them).

Files to files (what ``astromer-fast embed --engine ray`` runs)::

    embed_files("curves/*.parquet", "emb/", address="auto", actors=8, num_gpus_per_actor=1)

writes ``emb/<stem>.parquet`` and ``<stem>.rejects.parquet`` per input, identical to ``embed``:
same schema and metadata, same batches (hence the same vectors bit for bit on the same
hardware), rows in input order. Actors are restarted when they die (``max_restarts``) and their
unit of work retried (``max_task_retries``): the output stays complete.
"""

from __future__ import annotations

import time
from itertools import islice

import pyarrow as pa

try:
    import ray
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("astromer_fast.distributed.ray needs Ray: pip install "
                      "'astromer-fast[ray]' (or pip install 'ray[data]')") from e

from astromer_fast.distributed._core import (DistributedSummary, TaskRunner, combine,
                                              combined_schema, drive, plan, prepare_outputs,
                                              split_options, split_rejects)
from astromer_fast.embedding.batch import BatchEmbedder

__all__ = ["RayEmbedder", "embed_files", "split_rejects"]


class RayEmbedder:
    """A Ray Data ``map_batches`` callable class (each actor of the pool holds one; not
    ``astromer_fast.Embedder``, which takes numpy arrays): ``pyarrow.Table`` of light curves
    (one row per object or per (object, band), any layout but the long one) -> one row per
    curve, in input order: the columns of ``embed``'s output plus ``reason`` (null when
    embedded; for a rejected curve ``embedding`` is null and ``n_obs`` the observations as
    read). Keywords as ``embed`` (``model``, ``device``, ``batch_size``, ``window_mode``,
    ``min_obs``, ``columns`` or the ``*_col`` options, ``bands``, ``layers``, ``per_window``).
    A Ray Data batch is embedded as one chunk, as ``embed`` embeds one record batch: give
    ``batch_size=read_batch_rows`` to ``map_batches``."""

    def __init__(self, model=None, **options):
        emb_kw, rest = split_options({"model": model, **options})
        if rest:
            raise TypeError(f"RayEmbedder got unexpected options {sorted(rest)}")
        self.be = BatchEmbedder(**emb_kw)
        self._layouts = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        layout = self._layouts.get(batch.schema)
        if layout is None:
            layout = self._layouts[batch.schema] = self.be.detect(batch.schema, "Ray Data batch")
        if layout.kind == "long":
            raise ValueError("a long table (one row per observation) cannot be embedded batch "
                             "by batch (an object may straddle two batches); use embed_files")
        schema = self.be.schema(layout)
        if batch.num_rows == 0:
            return combined_schema(schema).empty_table()
        chunk = self.be.prepare(batch, layout)
        return combine(*self.be.embed_chunk(chunk, schema, with_index=True), schema)


class _Worker:
    """The actor behind ``embed_files``: a TaskRunner (model loaded once per actor)."""

    def __init__(self, options, read_batch_rows, long_batch_rows, crash_once=None,
                 num_threads=None):
        self.runner = TaskRunner(options, read_batch_rows, long_batch_rows, crash_once,
                                 num_threads)

    def run(self, task):
        return self.runner.run(task)

    def ready(self):
        return self.runner.name


def _cluster_defaults(actors, num_gpus_per_actor, num_cpus_per_actor):
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if gpus >= 1 else 0
    if actors is None:
        if num_gpus_per_actor:
            actors = int(gpus // num_gpus_per_actor)
        else:
            actors = int(cpus // max(num_cpus_per_actor, 1e-9))
        actors = max(1, actors)
    # Actors that do not fit would wait for resources forever: say so instead.
    if (num_gpus_per_actor and actors * num_gpus_per_actor > gpus + 1e-9) or \
            (num_cpus_per_actor and actors * num_cpus_per_actor > cpus + 1e-9):
        raise ValueError(f"{actors} actor(s) of {num_cpus_per_actor:g} CPU and "
                         f"{num_gpus_per_actor:g} GPU do not fit the Ray cluster ({cpus:g} CPU, "
                         f"{gpus:g} GPU): ask for fewer actors or less per actor")
    return actors, num_gpus_per_actor


def embed_files(source, output, *, address: str | None = None, actors: int | None = None,
                num_gpus_per_actor: float | None = None, num_cpus_per_actor: float = 1,
                max_restarts: int = 3, max_task_retries: int = 3,
                read_batch_rows: int = 4096, long_batch_rows: int | None = None,
                batches_per_task: int | None = None, resume: bool = False,
                continue_on_error: bool = False, progress: bool = True,
                _crash_once_marker: str | None = None, **options) -> DistributedSummary:
    """``embed(source, output, ...)`` on a pool of Ray actors; the same output files.

    ``address``: the cluster to join (``"auto"``: the one ``ray start`` runs here; ``None``:
    ``RAY_ADDRESS`` or a new local cluster; ignored when Ray is already initialised).
    ``actors``: how many (default: one per GPU, or one per CPU without GPUs);
    ``num_gpus_per_actor`` (default 1 when the cluster has GPUs, else 0) and
    ``num_cpus_per_actor`` (Ray gives the actor as many torch threads). ``max_restarts`` /
    ``max_task_retries``: a dead actor is restarted and its unit rerun. Units hold
    ``batches_per_task`` record batches of ``read_batch_rows`` curves (default: about four units
    per actor, at most 16 batches). Other keywords as ``embed`` (``model``, ``device``, ...).
    """
    emb_kw, rest = split_options(options)
    if rest:
        raise TypeError(f"embed_files got unexpected options {sorted(rest)}")
    t_start = time.perf_counter()
    todo, skipped, out_dir = prepare_outputs(source, output, resume, emb_kw)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=progress)
    actors, num_gpus = _cluster_defaults(actors, num_gpus_per_actor, num_cpus_per_actor)
    summary = DistributedSummary(engine=f"ray ({actors} actor(s), {num_gpus} GPU each)")
    summary.skipped = skipped
    if not todo:
        summary.seconds = time.perf_counter() - t_start
        return summary
    tasks = plan(todo, read_batch_rows, batches_per_task, actors, emb_kw["columns"])
    worker_cls = ray.remote(_Worker).options(
        num_cpus=num_cpus_per_actor, num_gpus=num_gpus, max_restarts=max_restarts,
        max_task_retries=max_task_retries)
    # The model travels once per actor (constructor), not once per unit.
    # torch threads = the CPUs Ray reserved for the actor, whatever OMP_NUM_THREADS says.
    threads = max(1, int(num_cpus_per_actor))
    t0 = time.perf_counter()
    pool = [worker_cls.remote(emb_kw, read_batch_rows, long_batch_rows, _crash_once_marker,
                              threads) for _ in range(min(actors, len(tasks)))]
    try:
        ray.get([a.ready.remote() for a in pool])
        summary.timings["start actors"] = time.perf_counter() - t0
        drive(tasks, _ordered(pool, tasks), out_dir, summary,
              continue_on_error=continue_on_error, progress=progress)
    finally:
        for a in pool:
            ray.kill(a)
    summary.seconds = time.perf_counter() - t_start
    summary.timings["total"] = summary.seconds
    if progress:
        print(summary)
    return summary


def _ordered(pool, tasks):
    """Results in task order, at most two units per actor in flight or waiting to be written,
    so memory stays bounded whatever the input size."""
    from ray.util import ActorPool

    ap = ActorPool(pool)
    it = iter(tasks)
    for t in islice(it, 2 * len(pool)):
        ap.submit(lambda a, task: a.run.remote(task), t)
    while ap.has_next():
        res = ap.get_next()
        nxt = next(it, None)
        if nxt is not None:
            ap.submit(lambda a, task: a.run.remote(task), nxt)
        yield res
