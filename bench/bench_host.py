"""The host side of embedding alone (no model), and the whole pipeline, over generated curves:
the numpy reference host path (``ASTROMER_FAST_HOST=python``) beside the C++ one (default).

    python bench/bench_host.py                        # 1,000,000 curves of 20-400 observations
    python bench/bench_host.py --curves 20000 --python-curves 20000

Rows:
* ``host``: the embedding pipeline's producer (``stream.Producer``: Parquet read, decode, clean,
  window, sort, batch buffers) over the whole file with ``--threads`` preparing threads, the
  chunks dropped. Observations/s per core = observations / process CPU time (every thread);
  curves/s on the wall clock; peak RSS of a fresh process that did only that.
* ``pipeline (tiny model)``: ``astromer_fast.embed(file, out_dir)`` with a 1-block, d_model 16,
  1-head model, so that the host side dominates; torch and the preparing threads both at
  ``--threads``.
* ``overhead``: with the packaged model on the CPU (one thread, CPU time), the whole pipeline
  (``embed``, Parquet in and out) over the model alone on the same prepared chunks
  (``WindowEncoder.run``), on ``--overhead-curves`` curves.
Each configuration runs in its own process (peak RSS is per process); the file is generated once
(nested ``list<struct<time, mag, magerr>>``, zstd, row groups of 4096; lengths uniform in
[``--min-len``, ``--max-len``]). The reference path is run on ``--python-curves`` curves (its rate
does not depend on the count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 4096


def generate(path: Path, n_curves: int, lo: int, hi: int, seed: int = 0) -> int:
    """Survey-like curves written row group by row group (bounded memory); returns the number
    of observations."""
    from astromer_fast.data import Curves

    rng = np.random.default_rng(seed)
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    schema = pa.schema([("id", pa.string()), ("band", pa.string()), ("lightcurve", typ)])
    total = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for s in range(0, n_curves, ROW_GROUP):
            k = min(ROW_GROUP, n_curves - s)
            lengths = rng.integers(lo, hi + 1, k)
            n = int(lengths.sum())
            total += n
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            cs = np.cumsum(rng.exponential(3.0, n))  # ~3-day cadence
            t = 58000 + cs - np.repeat(cs[offsets[:-1]], lengths)
            m = rng.normal(18, 0.3, n)
            e = rng.uniform(0.01, 0.15, n)
            w.write_table(pa.table({"id": [f"obj{s + i}" for i in range(k)], "band": ["r"] * k,
                                    "lightcurve": Curves(t, m, e, offsets).to_arrow()},
                                   schema=schema))
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(d: Path):
    import torch

    from astromer_fast import Astromer, AstromerConfig

    torch.manual_seed(0)
    Astromer(AstromerConfig(n_blocks=1, d_model=16, n_heads=1)).save_pretrained(d)
    return d


def run_host(path: Path, threads: int, read_rows: int) -> dict:
    """The producer alone over the file: chunks prepared and dropped."""
    from astromer_fast.data.layouts import detect_layout
    from astromer_fast.embedding.columns import Columns
    from astromer_fast.embedding.stream import ChunkReady, FileFailed, Job, Producer

    layout = detect_layout(pq.ParquetFile(path).schema_arrow, str(path))
    prep_kw = dict(window=200, window_mode="overlap", min_obs=5, cuda=False, bands=None)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    producer = Producer([Job(str(path), path=path)], Columns(), prep_kw, read_rows,
                        depth=max(2, threads), workers=threads).start()
    curves = windows = 0
    try:
        for event in producer:
            if isinstance(event, ChunkReady):
                curves += event.chunk.n_curves
                windows += event.chunk.n_windows
            elif isinstance(event, FileFailed):
                raise event.error
    finally:
        producer.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert layout.kind == "nested"
    return {"wall_s": wall, "cpu_s": cpu, "curves": curves, "windows": windows,
            "stages_s": {k: round(v, 3) for k, v in producer.timers.items()}}


def run_pipeline(path: Path, threads: int, read_rows: int, model) -> dict:
    import astromer_fast

    with tempfile.TemporaryDirectory() as out:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        summary = astromer_fast.embed(path, out, model=model, device="cpu", progress=False,
                                      read_batch_rows=read_rows, precision="fp32")
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "curves": summary.curves_in,
            "stages_s": {k: round(v, 3) for k, v in summary.timings.items()}}


def run_overhead(path: Path, read_rows: int) -> dict:
    """Packaged model, one thread, CPU time: embed() end to end vs the model on the same chunks."""
    import astromer_fast
    from astromer_fast.embedding.batch import BatchEmbedder
    from astromer_fast.embedding.stream import ChunkReady, Job, Producer

    be = BatchEmbedder(None, device="cpu")
    layout = be.detect(pq.ParquetFile(path).schema_arrow)
    chunks = []
    producer = Producer([Job(str(path), path=path)], be.columns, be.prep_kw, read_rows,
                        workers=1).start()
    for event in producer:
        if isinstance(event, ChunkReady):
            chunks.append(event.chunk)
    producer.close()
    assert layout is not None
    be.encoder.run(chunks[0])  # warm-up
    best_model = best_pipe = float("inf")
    for _ in range(2):
        c0 = time.process_time()
        for ch in chunks:
            be.encoder.run(ch)
        best_model = min(best_model, time.process_time() - c0)
        with tempfile.TemporaryDirectory() as out:
            c0 = time.process_time()
            astromer_fast.embed(path, out, device="cpu", progress=False,
                                read_batch_rows=read_rows)
            best_pipe = min(best_pipe, time.process_time() - c0)
    return {"model_cpu_s": best_model, "pipeline_cpu_s": best_pipe,
            "overhead": best_pipe / best_model - 1, "precision": be.encoder.precision}


def one(args) -> dict:
    """One configuration in this process (the child side of main)."""
    import torch

    os.environ["ASTROMER_FAST_HOST"] = args.host
    os.environ["ASTROMER_FAST_DECODE_WORKERS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    path = Path(args.file)
    if args.one == "host":
        res = run_host(path, args.threads, args.read_rows)
    elif args.one == "pipeline":
        res = run_pipeline(path, args.threads, args.read_rows, args.model)
    else:
        res = run_overhead(path, args.read_rows)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def child(kind, host, threads, file, args, model=None) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--host", host, "--threads", str(threads),
           "--file", str(file), "--read-rows", str(args.read_rows)]
    if model:
        cmd += ["--model", str(model)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} {host} x{threads} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        flags = info.get("Flags", "").split()
        wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        return (f"{info.get('Model name', platform.processor()).strip()}, {os.cpu_count()} "
                f"CPU(s), flags {' '.join(wanted)}")
    except OSError:
        return platform.processor()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curves", type=int, default=1_000_000)
    p.add_argument("--python-curves", type=int, default=100_000,
                   help="curves for the reference (numpy) host path")
    p.add_argument("--overhead-curves", type=int, default=4096)
    p.add_argument("--min-len", type=int, default=20)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--read-rows", type=int, default=4096)
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--json", default="bench_host.json")
    # The child side: one configuration per process.
    p.add_argument("--one", choices=["host", "pipeline", "overhead"], help=argparse.SUPPRESS)
    p.add_argument("--host", default="cpp", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.threads = int(args.threads)
        print(json.dumps(one(args)))
        return
    threads = [int(x) for x in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for n in sorted({args.curves, min(args.python_curves, args.curves)}):
            t0 = time.perf_counter()
            obs = generate(tmp / f"curves_{n}.parquet", n, args.min_len, args.max_len)
            files[n] = (tmp / f"curves_{n}.parquet", obs)
            print(f"generated {n} curves, {obs} observations in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        model = tiny_model(tmp / "tiny")

        def record(kind, host, n, k, res):
            obs = files[n][1]
            row = {"what": kind, "host": host, "threads": k, "curves": n, "observations": obs,
                   "obs_per_s_per_core": obs / res["cpu_s"] if "cpu_s" in res else None,
                   "curves_per_s": n / res["wall_s"] if "wall_s" in res else None, **res}
            rows.append(row)
            if "cpu_s" in res:
                rate = row["obs_per_s_per_core"] / 1e6
                print(f"{kind:9s} {host:6s} x{k} {n:>8d} curves: {rate:7.2f} M obs/s/core,"
                      f" {row['curves_per_s']:9.0f} curves/s, wall "
                      f"{res['wall_s']:.1f} s, cpu {res['cpu_s']:.1f} s, peak RSS "
                      f"{res['peak_rss_mb']:.0f} MB  {res.get('stages_s', '')}", flush=True)
            return row

        for host in ("python", "cpp"):
            sizes = [args.curves] if host == "cpp" else [min(args.python_curves, args.curves)]
            if host == "cpp" and args.python_curves < args.curves:
                sizes = [args.python_curves, args.curves]  # RSS at two sizes
            for n in sizes:
                for k in threads:
                    record("host", host, n, k, child("host", host, k, files[n][0], args))
        if not args.no_pipeline:
            for host in ("python", "cpp"):
                n = args.curves if host == "cpp" else min(args.python_curves, args.curves)
                for k in threads:
                    record("pipeline", host, n, k,
                           child("pipeline", host, k, files[n][0], args, model))
        if not args.no_overhead:
            n = args.overhead_curves
            path = tmp / "overhead.parquet"
            generate(path, n, args.min_len, args.max_len, seed=1)
            res = child("overhead", "cpp", 1, path, args)
            rows.append({"what": "overhead", "host": "cpp", "threads": 1, "curves": n, **res})
            print(f"overhead (packaged model, 1 thread, CPU time, {n} curves, "
                  f"{res['precision']}): pipeline {res['pipeline_cpu_s']:.2f} s vs model only "
                  f"{res['model_cpu_s']:.2f} s: {100 * res['overhead']:+.1f}%", flush=True)
    result = {"machine": machine(), "rows": rows, "curves": args.curves,
              "lengths": [args.min_len, args.max_len]}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}")


if __name__ == "__main__":
    main()
