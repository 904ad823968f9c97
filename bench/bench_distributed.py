"""Embedding throughput on Ray and Dask beside the single process, in the same run, at equal
resources: what the engines cost, and what a second worker buys on this machine.

    python bench/bench_distributed.py                         # 2048 EROS-1 curves, CPU
    python bench/bench_distributed.py --curves 0 --json out.json   # the whole file

Input: the first ``--curves`` rows of ../shared/data/eros1.parquet (real EROS-1 curves, about
120 observations each), or generated curves of that size when it is absent. Model: the packaged
``astromer2-base`` (Astromer 2 shape: 6 blocks, 256 channels), loaded by name on every worker.

Rows (each the wall time of one Parquet -> Parquet run, outputs written; best of ``--repeats``):
* ``local, k thread(s)``: ``astromer_fast.embed`` in this process with ``torch`` on k threads.
* ``ray, n actor(s)``: ``distributed.ray.embed_files``, 1 CPU (one torch thread) per actor, on a
  local Ray cluster started once (its start-up reported apart). Every call starts its actors
  (a Python process importing torch and loading the model): ``start`` is that part, ``steady``
  the rate without it.
* ``dask, n worker(s)``: ``distributed.dask.embed_files`` on a LocalCluster of n one-thread
  workers (started apart); the model stays cached in the workers after the warm-up round.
``vs local`` compares with the local run on as many threads as the engine has workers. Every
engine's output files are checked to be identical to the local ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import astromer_fast
from astromer_fast.weights import load_model

MODEL = "astromer2-base"


def make_input(path: Path, n: int):
    here = Path(__file__).resolve().parents[1]
    env = os.environ.get("ASTROMER_FAST_SHARED_DATA")
    src = Path(env) if env else here.parent / "shared" / "data"
    src = src / "eros1.parquet"
    if src.is_file():
        t = pq.read_table(src)
        t = t.slice(0, n) if n else t
        what = f"{t.num_rows} EROS-1 curves ({src})"
    else:
        rng = np.random.default_rng(0)
        n = n or 7282
        lengths = rng.integers(80, 160, n)
        typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                                  ("magerr", pa.float32())]))
        lc = [[{"time": float(a), "mag": float(b), "magerr": 0.05}
               for a, b in zip(np.sort(rng.uniform(0, 1000, k)), rng.normal(17, .2, k))]
              for k in lengths]
        t = pa.table({"id": [f"g{i}" for i in range(n)], "band": ["r"] * n,
                      "lightcurve": pa.array(lc, typ)})
        what = f"{n} generated curves (80-160 observations; {src} is absent)"
    pq.write_table(t, path, row_group_size=4096)
    return t.num_rows, what


def same_outputs(a: Path, b: Path) -> bool:
    return all(pq.read_table(a / n).equals(pq.read_table(b / n))
               for n in ("in.parquet", "in.rejects.parquet"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curves", type=int, default=2048, help="0: the whole file")
    p.add_argument("--read-rows", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["ray", "dask"])
    p.add_argument("--json", default="bench_distributed.json")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    data = tmp / "in.parquet"
    n, what = make_input(data, args.curves)
    kw = dict(model=MODEL, read_batch_rows=args.read_rows, batch_size=args.batch_size,
              progress=False)
    print(f"input: {what}; model {MODEL}; {os.cpu_count()} CPU(s); "
          f"torch {torch.__version__}; read rows {args.read_rows}")
    ref = tmp / "ref"
    astromer_fast.embed(data, ref, **kw)  # the output every engine must reproduce

    # Every configuration once per round, rounds repeated: a load that drifts during the run
    # (a shared machine) then weighs on all of them alike; the best round is kept.
    configs = {}
    net = load_model(MODEL, device="cpu")  # local runs: the model load is outside the timing

    def local(k):
        def run(out):
            torch.set_num_threads(k)
            t0 = time.perf_counter()
            astromer_fast.embed(data, out, **{**kw, "model": net})
            return time.perf_counter() - t0, 0.0, k
        return run

    for k in sorted(set(args.workers)):
        configs[("local", k)] = local(k)
    setup = {}
    closers = []
    if "ray" not in args.skip:
        import ray

        from astromer_fast.distributed.ray import embed_files as ray_embed

        t0 = time.perf_counter()
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        setup["ray.init"] = time.perf_counter() - t0
        closers.append(ray.shutdown)

        def on_ray(k):
            def run(out):
                s = ray_embed(data, out, actors=k, num_cpus_per_actor=1, **kw)
                return s.seconds, s.timings.get("start actors", 0.0), len(s.workers)
            return run

        for k in args.workers:
            configs[("ray", k)] = on_ray(k)
    if "dask" not in args.skip:
        from distributed import Client, LocalCluster

        from astromer_fast.distributed.dask import embed_files as dask_embed

        def on_dask(k):
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                                   dashboard_address=":0")
            client = Client(cluster)
            setup[f"dask LocalCluster({k})"] = time.perf_counter() - t0
            closers.extend([cluster.close, client.close])
            def run(out):
                s = dask_embed(data, out, client=client, **kw)
                return s.seconds, 0.0, len(s.workers)
            return run

        for k in args.workers:
            configs[("dask", k)] = on_dask(k)
    for name, sec in setup.items():
        print(f"{name}: {sec:.1f} s (not in the rates)")

    results = {c: [] for c in configs}
    for r in range(args.repeats + 1):  # round 0 warms up (kernels, Dask workers' model cache)
        times = []
        for c, run in configs.items():
            out = tmp / f"{c[0]}{c[1]}"
            shutil.rmtree(out, ignore_errors=True)
            sec, start, used = run(out)
            assert same_outputs(out, ref), f"{c} output differs from the local one"
            times.append(f"{c[0]} {c[1]}: {sec:.1f} s")
            if r:
                results[c].append((sec, start, used))
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(times), flush=True)
    for close in reversed(closers):
        close()

    rows = []
    local_rate = {}
    for (engine, k), runs in results.items():
        sec, start, used = min(runs)
        rate = n / sec
        if engine == "local":
            local_rate[k] = rate
        res = {"engine": engine, "workers": k, "seconds": sec, "curves_per_s": rate,
               "start_s": start, "workers_used": used, "all_seconds": [x[0] for x in runs],
               "resources": {"local": f"{k} thread(s)", "ray": f"{k} actor(s) x 1 CPU",
                             "dask": f"{k} worker(s) x 1 thread"}[engine]}
        if engine == "ray":
            res["steady_curves_per_s"] = n / (sec - start)
        if engine == "dask":
            res["start_s"] = 0.0
        rows.append(res)

    print()
    head = (f"{'engine':<7}{'resources':<26}{'curves/s':>10}{'vs local':>10}{'wall s':>9}"
            f"{'start s':>9}{'steady/s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = r["curves_per_s"] / local_rate[r["workers"]]
        r["vs_local_same_threads"] = vs
        steady = r.get("steady_curves_per_s")
        print(f"{r['engine']:<7}{r['resources']:<26}{r['curves_per_s']:>10.1f}{vs:>10.2f}"
              f"{r['seconds']:>9.2f}{r['start_s']:>9.2f}"
              f"{(f'{steady:.1f}' if steady else ''):>10}")
    print("\nstart s: Ray starts its actors (process, torch, model) in every call, inside the "
          "wall time; steady/s is its rate without that. Dask workers keep the model between "
          "calls (loaded in the warm-up round). Cluster start-ups are apart, above.")
    print(f"load average at the end: {os.getloadavg()}")
    result = {"input": what, "curves": n, "model": MODEL, "read_rows": args.read_rows,
              "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "machine": platform.platform(), "processor": platform.processor(),
              "python": sys.version.split()[0], "torch": torch.__version__,
              "setup_s": setup, "loadavg_end": os.getloadavg(), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
