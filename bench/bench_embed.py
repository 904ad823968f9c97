"""End-to-end embedding throughput, Parquet in -> Parquet out, beside the model alone, PyTorch
done right on the same windows, and a naive curve-by-curve loop, with where the time goes.

    python bench/bench_embed.py                          # CPU: real EROS-1 curves (both bands)
    python bench/bench_embed.py --data generated --curves 500
    python bench/bench_embed.py --device cuda --data generated --curves 1000000 --batch-size 4096

Data (``--data``): ``eros`` the real EROS-1 curves of ``../shared/data/eros1.parquet`` (``--curves``
of them, default all 7,282), or ``generated``: survey-like curves, lengths log-uniform in
[``--min-len``, ``--max-len``] observations, nested ``list<struct<time, mag, magerr>>`` Parquet
(row groups of 4096). Model: the packaged Astromer 2 weights.

Rows of the table:
* ``pipeline``: ``astromer_fast.embed(file, out_dir)`` in its default precision (and, on the CPU,
  in the other one), wall time including the Parquet read and the output write (the model load
  and the data generation excluded).
* ``model only``: the same windows (same chunks, same length-sorted batches cut to their longest
  window) already prepared and on the device, through this package's model and the pooling only.
* ``PyTorch ... model only``: the plain model on exactly those batches, with SDPA and the key
  mask, in float32 and under bf16 autocast, and ``torch.compile`` of both (``--compile``): the
  denominators of the goals ("PyTorch done right").
* ``naive``: what users of the official ``encode()`` do: a Python loop over curves, each curve's
  arrays pulled out of the table, cleaned and cut into 200-padded windows with numpy, one model
  call per curve (its windows as the batch). Run on a subset (``--naive-curves``), rate
  extrapolated.
The breakdown sums per-stage seconds; the decode/clean/window/read stages run on the worker
thread, overlapped with the model, so they add up to more than the wall time when overlapped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

# The installed package (with its compiled kernels) is what is measured, never the source tree.
import astromer_fast
from astromer_fast.data import Curves
from astromer_fast.data.layouts import detect_layout
from astromer_fast.embedding.stream import prepare
from astromer_fast.model import masked_mean

from _timing import environ

NAN = float("nan")


def _shared_data() -> Path:
    """``$ASTROMER_FAST_SHARED_DATA`` (a GPU run's copy), else ../shared/data."""
    env = os.environ.get("ASTROMER_FAST_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def generate(path: Path, n_curves: int, lo: int, hi: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    typ = pa.list_(pa.struct([("time", pa.float64()), ("mag", pa.float32()),
                              ("magerr", pa.float32())]))
    schema = pa.schema([("id", pa.string()), ("band", pa.string()), ("lightcurve", typ)])
    total_obs = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for s in range(0, n_curves, 4096):
            k = min(4096, n_curves - s)
            lengths = np.exp(rng.uniform(np.log(lo), np.log(hi + 1), k)).astype(np.int64)
            n = int(lengths.sum())
            total_obs += n
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            cid = np.repeat(np.arange(k), lengths)
            cs = np.cumsum(rng.exponential(3.0, n))  # ~3-day cadence
            t = 58000 + cs - np.repeat(cs[offsets[:-1]], lengths)
            m = rng.normal(18, 0.3, n) + 0.2 * np.sin(t / (1 + cid % 17))
            e = rng.uniform(0.01, 0.15, n)
            curves = Curves(t, m, e, offsets)
            w.write_table(pa.table({"id": [f"obj{s + i}" for i in range(k)],
                                    "band": ["r"] * k, "lightcurve": curves.to_arrow()},
                                   schema=schema))
    return total_obs


def prepared_batches(model, path, device, batch_size, read_rows):
    """The windows ``embed`` runs, as it batches them: chunk by chunk, sorted by length, each
    batch cut to its longest window; on the device."""
    pf = pq.ParquetFile(path)
    layout = detect_layout(pf.schema_arrow)
    batches = []
    for rb in pf.iter_batches(batch_size=read_rows, columns=layout.columns()):
        ch = prepare(rb, layout, window=model.config.window, window_mode="overlap", min_obs=5)
        for s in range(0, ch.n_windows, batch_size):
            width = max(int(ch.n_valid_sorted[s]), 1)
            sl = (slice(s, s + batch_size), slice(0, width))
            batches.append(tuple(ch.tensors[k][sl].to(device) for k in ("t", "m", "valid")))
    return batches


def model_only_variants(model, device, compile_ref: bool, precision: str,
                        compile_mode: str | None = None):
    """name -> function(t, m, valid) -> window means: this package's model (as ``embed`` runs it,
    on CUDA also each GPU path forced) and the plain PyTorch model done right."""
    from astromer_fast.embedding.device import WindowEncoder

    ours = WindowEncoder(model, device, precision=precision)
    out = {f"model only, astromer_fast {precision}": ours.pooled}
    if device.type == "cuda" and precision == "bf16":
        # Each path keeps CUDA graphs per batch width alive: the Triton GEMM forms get one row
        # each (bench_model has them all, on fixed batches).
        for path, att, gemm in (("plain", "", ""), ("fused", "sdpa", ""), ("fused", "triton", ""),
                                ("fused", "cuda_tc", ""), ("fused", "sdpa", "triton_mlp"),
                                ("fused", "triton", "triton_block")):
            env = {"ASTROMER_FAST_GPU_PATH": path,
                   **({"ASTROMER_FAST_GPU_ATTENTION": att} if att else {}),
                   **({"ASTROMER_FAST_GPU_GEMM": gemm} if gemm else {})}
            try:
                with environ(env):
                    enc = WindowEncoder(model, device, precision=precision)
            except Exception as e:  # noqa: BLE001 - reported, the other rows still run
                print(f"GPU path {path} {att}: {type(e).__name__}: {e}")
                continue
            out[f"model only, astromer_fast {path} GPU path" + (f", {att}" if att else "")
                + (f", {gemm} GEMMs" if gemm else "")] = enc.pooled

    mode = compile_mode if compile_mode not in (None, "default") else None

    def plain(precision_, compiled=False):
        encode = torch.compile(model.encode, mode=mode) if compiled else model.encode

        def f(t, m, valid):
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=precision_ == "bf16"):
                out = encode(t, m, ~valid, backend="sdpa").last
            return masked_mean(out.float(), valid)
        return f

    out["model only, PyTorch fp32 + SDPA"] = plain("fp32")
    out["model only, PyTorch bf16 + SDPA"] = plain("bf16")
    if compile_ref:
        tag = f"torch.compile {mode}" if mode else "torch.compile"
        out[f"model only, {tag} fp32 + SDPA"] = plain("fp32", True)
        out[f"model only, {tag} bf16 + SDPA"] = plain("bf16", True)
    return out


CLOCK = time.perf_counter  # time.process_time with --cpu-time


def time_model_only(fn, batches, device):
    """Seconds for one pass over the batches (after a warm-up pass, which also compiles)."""
    def once():
        with torch.inference_mode():
            for t, m, valid in batches:
                fn(t, m, valid)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = CLOCK()
    once()
    first = CLOCK() - t0
    t0 = CLOCK()
    once()
    return CLOCK() - t0, first


def naive(model, path, device, n_curves, window=200):
    """The official encode() pattern: per curve, Python-side arrays, numpy windows, one call."""
    table = pq.read_table(path).slice(0, n_curves)
    t0 = CLOCK()
    out = []
    with torch.inference_mode():
        for row in table.to_pylist():
            lc = row["lightcurve"]
            t = np.array([o["time"] for o in lc])
            m = np.array([o["mag"] for o in lc], np.float32)
            e = np.array([o["magerr"] for o in lc], np.float32)
            ok = np.isfinite(t) & np.isfinite(m) & np.isfinite(e) & (e > 0)
            t, m = t[ok], m[ok]
            order = np.argsort(t, kind="stable")
            t, m = t[order], m[order]
            n = len(t)
            if n < 5:
                continue
            starts = [min(s, max(n - window, 0)) for s in range(0, n + 1, window)][: n // window + 1]
            tw = np.zeros((len(starts), window), np.float32)
            mw = np.zeros((len(starts), window), np.float32)
            vw = np.zeros((len(starts), window), bool)
            counts = []
            for j, s in enumerate(starts):
                c = min(window, n - s)
                tt, mm = t[s:s + c], m[s:s + c].astype(np.float64)
                tw[j, :c] = tt - tt.mean()
                mw[j, :c] = mm - mm.mean()
                vw[j, :c] = True
                counts.append(c)
            emb = model.embed_windows(torch.from_numpy(tw).to(device),
                                      torch.from_numpy(mw).to(device),
                                      torch.from_numpy(vw).to(device)).cpu().numpy()
            c = np.array(counts, np.float64)[:, None]
            out.append((emb * c).sum(0) / c.sum())
    return CLOCK() - t0, len(table)


def eros_parquet(dst: Path, n_curves: int | None) -> int:
    """The first ``n_curves`` of EROS-1 (both bands) copied to ``dst``; their observations."""
    src = _shared_data() / "eros1.parquet"
    if not src.is_file():
        sys.exit(f"--data eros needs {src} (or use --data generated)")
    table = pq.read_table(src, columns=["id", "band", "lightcurve"])
    if n_curves:
        table = table.slice(0, n_curves)
    pq.write_table(table, dst, row_group_size=4096)
    return int(pc.sum(pc.list_value_length(table["lightcurve"])).as_py())


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from astromer_fast.model.fused_cpu import cpu_isa_info

    info = cpu_isa_info()
    return f"{info.get('model') or platform.processor()} ({', '.join(info.get('features', []))})"


def main(argv=None):
    from astromer_fast.embedding.device import embedding_precision

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["eros", "generated"], default=None,
                   help="default: eros when ../shared/data is there")
    p.add_argument("--curves", type=int, default=None,
                   help="curves (default: all 7,282 of EROS-1; 500 generated)")
    p.add_argument("--min-len", type=int, default=50)
    p.add_argument("--max-len", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--read-rows", type=int, default=1024)
    p.add_argument("--naive-curves", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time torch.compile of the plain model (model only)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compiled rows, e.g. max-autotune")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this process's CPU seconds (all its threads, the decoding "
                   "worker included) instead of wall time: for a machine other jobs share")
    p.add_argument("--json", default="bench_embed.json")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.data is None:
        shared = _shared_data() / "eros1.parquet"
        args.data = "eros" if shared.is_file() else "generated"
    torch.manual_seed(0)
    default = embedding_precision(device)
    precisions = [default] + ([p_ for p_ in ("fp32", "bf16") if p_ != default]
                              if device.type == "cpu" else [])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "curves.parquet"
        if args.data == "eros":
            n_obs = eros_parquet(src, args.curves)
        else:
            n_obs = generate(src, args.curves or 500, args.min_len, args.max_len)
        model = astromer_fast.load_model(device=device).eval()
        batches = prepared_batches(model, src, device, args.batch_size, args.read_rows)
        n_windows = sum(b[0].shape[0] for b in batches)
        variants = model_only_variants(model, device, args.compile, default, args.compile_mode)

        def pipeline(precision, out):
            return astromer_fast.embed(src, out, model=model, device=device, progress=False,
                                       batch_size=args.batch_size, read_batch_rows=args.read_rows,
                                       precision=precision)

        # Warm-up (first-call costs, compilation), then rounds in which every row is timed in
        # turn, best of --repeats: on a shared machine the load of other jobs drifts.
        first = {}
        for prec in precisions:
            pipeline(prec, tmp / f"warm-{prec}")
        for name, fn in variants.items():
            first[name] = time_model_only(fn, batches, device)[1]
        naive(model, src, device, 2)
        best, summaries = {}, {}
        for r in range(args.repeats):
            for prec in precisions:
                t0 = CLOCK()
                summary = pipeline(prec, tmp / f"out{r}-{prec}")
                took = CLOCK() - t0
                name = f"pipeline (Parquet -> Parquet), {prec}"
                if took < best.get(name, float("inf")):
                    best[name], summaries[prec] = took, summary
            for name, fn in variants.items():
                best[name] = min(best.get(name, float("inf")),
                                 time_model_only(fn, batches, device)[0])
        nv, nv_curves = naive(model, src, device, args.naive_curves)

    n = summaries[default].curves_in
    rows = [(name, sec, n / sec, n_windows / sec) for name, sec in best.items()]
    rows.append((f"naive per-curve loop ({nv_curves} curves)", nv, nv_curves / nv, NAN))
    denominators = {k: best[f"model only, PyTorch {k} + SDPA"] for k in ("fp32", "bf16")}
    tm = summaries[default].timings
    print(f"\nastromer_fast {astromer_fast.__version__}, torch {torch.__version__}, {device}: "
          f"{machine(device)}, {torch.get_num_threads()} threads, "
          f"{'CPU seconds of this process' if args.cpu_time else 'wall time'}")
    print(f"{args.data}: {n} curves, {n_obs} observations, {n_windows} windows, batch "
          f"{args.batch_size}; default precision {default}\n")
    print(f"| {'what':46s} | {'seconds':>8s} | {'curves/s':>9s} | {'windows/s':>9s} | "
          f"{'vs PyTorch bf16':>15s} | {'vs PyTorch fp32':>15s} |")
    print("|" + "|".join("-" * w for w in (48, 10, 11, 11, 17, 17)) + "|")
    for name, sec, rate, wrate in rows:
        vs = [d / sec if "naive" not in name else NAN for d in
              (denominators["bf16"], denominators["fp32"])]
        extra = f"  (first pass {first[name]:.1f} s)" if "compile" in name else ""
        print(f"| {name:46s} | {sec:8.2f} | {rate:9.1f} | {wrate:9.1f} | {vs[0]:15.2f} | "
              f"{vs[1]:15.2f} |{extra}")
    mo = best[f"model only, astromer_fast {default}"]
    e2e = best[f"pipeline (Parquet -> Parquet), {default}"]
    print(f"\npipeline / model-only throughput: {mo / e2e:.1%} (overhead "
          f"{(e2e - mo) / mo:+.1%} of model time); pipeline / naive: "
          f"{(n / e2e) / (nv_curves / nv):.1f}x")
    order = ["read", "decode", "clean", "window", "wait (model idle)", "transfer", "model", "pool",
             "write"]
    print("\nwhere the time goes (default precision; seconds; read..window on the worker thread, "
          "overlapped):")
    for k in order:
        if k in tm:
            print(f"  {k:18s} {tm[k]:8.2f}")
    print(f"  {'wall':18s} {e2e:8.2f}")
    result = {"machine": machine(device), "platform": platform.platform(), "device": str(device),
              "torch_threads": torch.get_num_threads(), "data": args.data, "curves": n,
              "observations": n_obs, "windows": n_windows, "batch_size": args.batch_size,
              "default_precision": default, "clock": "process_time" if args.cpu_time else "wall",
              "rows": [dict(what=a, seconds=b, curves_per_s=c, windows_per_s=d)
                       for a, b, c, d in rows],
              "pipeline_over_model_only": mo / e2e,
              "pipeline_over_pytorch_bf16_sdpa": denominators["bf16"] / e2e,
              "pipeline_over_pytorch_fp32_sdpa": denominators["fp32"] / e2e,
              "pipeline_over_naive": (n / e2e) / (nv_curves / nv), "breakdown_s": tm}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
