"""Whole-model throughput against PyTorch done right, every variant side by side in one run:
windows/s for the embedding forward (window means included) and for a training step (forward,
official loss, backward, Adam), with ratios and each variant's cosine to float32.

    python bench/bench_model.py                                  # CPU: real EROS-1 windows
    python bench/bench_model.py --data random --windows 512      # CPU: 200-padded windows
    python bench/bench_model.py --device cuda --data random --windows 4096 --compile

The standard ("PyTorch done right"): the plain model with SDPA and the key mask, windows sorted by
length and every batch cut to its longest window, in float32 and under bf16 autocast, and
``torch.compile`` of both (``--compile``). Every variant gets exactly the same batches. The plain
model with its explicit softmax in float32 stays in the table for continuity.

Data (``--data``): ``eros`` real EROS-1 windows (both bands, ``../shared/data/eros1.parquet``,
cleaned and windowed as ``embed`` does; ``--windows`` of them drawn at random) or ``random``
(``--length`` = 200 slots, random padding from 1/4 full to full). Weights: the packaged model.
Training uses half of the valid observations as probed, as pretraining does.

Accuracy: ``min cos`` is the smallest cosine, over all windows, between a variant's window
embeddings and those of PyTorch float32 + SDPA.

Timing: every variant is built (and compiled) once, then timed in turn in each of ``--rounds``
rounds (median of ``--repeats`` passes over the data after a warm-up); a row is the median over
rounds, so a load that drifts during the run affects every row alike. A variant that raises gets
a row with its error; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import astromer_fast
from astromer_fast.model import masked_mean
from astromer_fast.training import weighted_rmse

from _timing import environ, failure_text, time_limit, timed_median

NAN = float("nan")
BF16_SDPA = "PyTorch bf16 + SDPA"
FP32_SDPA = "PyTorch fp32 + SDPA"


# -------------------------------------------------------------------------------------------------
# Data: windows sorted by decreasing length, cut into batches at their longest
# -------------------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """``$ASTROMER_FAST_SHARED_DATA`` (a GPU run's copy), else ../shared/data."""
    env = os.environ.get("ASTROMER_FAST_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def eros_windows(n: int, seed: int = 0):
    import pyarrow.parquet as pq

    from astromer_fast.data.layouts import detect_layout
    from astromer_fast.embedding.stream import prepare

    path = shared_data_dir() / "eros1.parquet"
    if not path.is_file():
        sys.exit(f"--data eros needs {path} (or use --data random)")
    table = pq.read_table(path, columns=["id", "band", "lightcurve"]).combine_chunks()
    chunk = prepare(table.to_batches(max_chunksize=table.num_rows)[0], detect_layout(table.schema),
                    window=200, window_mode="overlap", min_obs=5)
    total = chunk.n_windows
    pick = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    t, m, valid = (chunk.tensors[k][pick] for k in ("t", "m", "valid"))
    return t, m, valid


def random_windows(n: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_valid = torch.randint(max(1, length // 4), length + 1, (n,), generator=g)
    valid = torch.arange(length)[None] < n_valid[:, None]
    t = torch.sort(torch.rand(n, length, generator=g) * 1000 - 500, 1).values * valid
    m = torch.randn(n, length, generator=g) * 0.3 * valid
    return t, m, valid


def make_data(args, device):
    t, m, valid = eros_windows(args.windows) if args.data == "eros" else \
        random_windows(args.windows, args.length)
    order = torch.argsort(valid.sum(1), descending=True, stable=True)
    t, m, valid = t[order], m[order], valid[order]
    g = torch.Generator().manual_seed(1)
    err = (torch.rand(t.shape, generator=g) * 0.1 + 0.01) * valid
    probed = valid & (torch.rand(t.shape, generator=g) < 0.5)
    n = valid.sum(1)
    batches = []
    for s in range(0, len(n), args.batch):
        e = min(s + args.batch, len(n))
        width = t.shape[1] if args.full_width else max(int(n[s]), 1)
        batches.append(tuple(x[s:e, :width].contiguous().to(device)
                             for x in (t, m, valid, err, probed)))
    return batches, int(n.sum())


# -------------------------------------------------------------------------------------------------
# Variants
# -------------------------------------------------------------------------------------------------
def variants(device, compile_ref):  # compile_ref: False, True or a torch.compile mode
    """(name, builder[, setup]) tuples; a builder takes the packaged model and the device and
    returns (embed, train) closures over one batch; setup as ``_setup`` takes it."""
    cuda = device.type == "cuda"
    out = [("PyTorch fp32, explicit softmax", ref_variant("fp32", sdpa=False)),
           (FP32_SDPA, ref_variant("fp32", sdpa=True)),
           (BF16_SDPA, ref_variant("bf16", sdpa=True))]
    if compile_ref:
        mode = compile_ref if isinstance(compile_ref, str) and compile_ref != "default" else None
        tag = f"torch.compile {mode} " if mode else "torch.compile "
        out += [(tag + "fp32 + SDPA", ref_variant("fp32", sdpa=True, compiled=True, mode=mode)),
                (tag + "bf16 + SDPA", ref_variant("bf16", sdpa=True, compiled=True, mode=mode))]
    if cuda:
        # What embed runs by default on this GPU (the calibrated path, CUDA graphs per width):
        # the row the goals are read from.
        out.append((DEFAULT_GPU, default_gpu_variant()))
        # The fused GPU encoder (embedding only: training keeps the plain model), per attention,
        # eager and replayed from one CUDA graph per batch as embed's graph cache does.
        for att, stages in (("sdpa", None), ("triton", 1), ("triton", 2), ("cuda_tc", None)):
            name = f"astromer_fast fused GPU bf16, attention {att}" + \
                (f" ({stages} stage{'s' if stages > 1 else ''})" if stages else "")
            out += [(name, fused_gpu_variant(att, stages, graphs=False)),
                    (name + ", CUDA graphs", fused_gpu_variant(att, stages, graphs=True))]
            if att in ("sdpa", "triton") and stages != 2:
                # The Triton GEMM forms, eager (beside the eager cuBLAS row above): every graphed
                # variant keeps its batches' activations alive, and GPU memory bounds how many
                # one process may hold.
                out += [(name + ", Triton GEMMs", fused_gpu_variant(att, stages, graphs=False,
                                                                    gemm="triton")),
                        (name + ", Triton GEMMs + fused MLP",
                         fused_gpu_variant(att, stages, graphs=False, gemm="triton_mlp"))]
            if att == "triton" and stages == 1:
                # Attention + output projection + LN1 as one kernel, then the fused MLP.
                out.append((name + ", Triton block kernels",
                            fused_gpu_variant(att, stages, graphs=False, gemm="triton_block")))
        # Candidates for the attention default, the other ops on their defaults: Triton's tl.dot
        # kernels and the CUDA tensor-core (WMMA) kernels, both bf16 on tensor cores.
        out += [("astromer_fast defaults, bf16", ours_plain_variant("bf16")),
                ("astromer_fast defaults, attention triton, bf16", ours_plain_variant("bf16"),
                 dict(defaults={"masked_attention": "triton"})),
                ("astromer_fast defaults, attention cuda tc, bf16", ours_plain_variant("bf16"),
                 dict(defaults={"masked_attention": "cuda"},
                      env={"ASTROMER_FAST_CUDA_ATTENTION": "tensor_cores"}))]
    else:
        from astromer_fast.model.fused_cpu import resolve_precision

        default = resolve_precision()
        out += [("astromer_fast C++ ops, fp32 (plain model)", ours_plain_variant("fp32")),
                ("astromer_fast fused fp32", fused_variant("fp32")),
                ("astromer_fast fused bf16", fused_variant("bf16"))]
        out = [(v[0] + (" (default)" if v[0] == f"astromer_fast fused {default}" else ""),
                *v[1:]) for v in out]
    return out


def _autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _train_step(model, opt, forward, batch):
    t, m, valid, err, probed = batch
    model.train()
    pred = forward(t, m, ~valid | probed)
    loss = weighted_rmse(pred.float(), m, err, probed, valid)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9)


def ref_variant(precision, sdpa, compiled=False, mode=None):
    def build(model, device):
        emb_model, train_model = copy.deepcopy(model).eval(), copy.deepcopy(model)
        kw = dict(backend="sdpa" if sdpa else "torch")
        encode = emb_model.encode
        forward = train_model
        if compiled:
            encode = torch.compile(emb_model.encode, mode=mode)
            forward = torch.compile(train_model, mode=mode)
        opt = _adam(train_model)

        def embed(t, m, valid):
            with torch.no_grad(), _autocast(device, precision):
                out = encode(t, m, ~valid, **kw).last
            return masked_mean(out.float(), valid)

        def fwd(t, m, hidden):
            with _autocast(device, precision):
                return forward(t, m, hidden, **kw)

        return embed, lambda b: _train_step(train_model, opt, fwd, b)
    return build


DEFAULT_GPU = "astromer_fast default GPU path (calibrated), CUDA graphs"


def default_gpu_variant():
    """``embed``'s own window encoder (the cached calibration's choice, else the plain path),
    with its CUDA graphs sized to the bench's batches on first use."""
    def build(model, device):
        from astromer_fast.embedding.device import WindowEncoder, gpu_path

        choice = gpu_path(device)
        print(f"default GPU path: {choice}", flush=True)
        emb_model = copy.deepcopy(model).eval()
        encoders = {}

        def embed(t, m, valid):
            if "enc" not in encoders:
                encoders["enc"] = WindowEncoder(emb_model, device, batch_size=t.shape[0],
                                                precision="bf16")
            return encoders["enc"].pooled(t, m, valid)

        return embed, None
    return build


def ours_plain_variant(precision):
    """The plain model with this package's custom ops (the default kernels of each device)."""
    def build(model, device):
        emb_model, train_model = copy.deepcopy(model).eval(), copy.deepcopy(model)
        opt = _adam(train_model)

        def embed(t, m, valid):
            with torch.no_grad(), _autocast(device, precision):
                out = emb_model.encode(t, m, ~valid).last
            return masked_mean(out.float(), valid)

        def fwd(t, m, hidden):
            with _autocast(device, precision):
                return train_model(t, m, hidden)

        return embed, lambda b: _train_step(train_model, opt, fwd, b)
    return build


@contextlib.contextmanager
def _setup(defaults=None, env=None):
    """Per-op CUDA defaults (backends.CUDA_DEFAULTS) and environment variables for one variant,
    restored afterwards: they hold while it is built and while it is timed."""
    from astromer_fast.kernels import backends

    saved = dict(backends.CUDA_DEFAULTS)
    backends.CUDA_DEFAULTS.update(defaults or {})
    try:
        with environ(env):
            yield
    finally:
        backends.CUDA_DEFAULTS.clear()
        backends.CUDA_DEFAULTS.update(saved)


def fused_variant(precision):
    def build(model, device):
        from astromer_fast.model.fused_cpu import FusedCpuEncoder

        enc = FusedCpuEncoder(copy.deepcopy(model).eval(), precision)
        train_model = copy.deepcopy(model)
        opt = _adam(train_model)
        return (lambda t, m, valid: enc(t, m, valid),
                lambda b: _train_step(train_model, opt,
                                      lambda t, m, h: train_model(t, m, h, cpu_fused=precision),
                                      b))
    return build


def fused_gpu_variant(attention, stages, graphs, gemm=None):
    def build(model, device):
        from astromer_fast.model.fused_gpu import FusedGpuEncoder

        enc = FusedGpuEncoder(copy.deepcopy(model).eval(), attention=attention, stages=stages,
                              gemm=gemm)
        if not graphs:
            return enc, None
        # The bench's batches are fixed device tensors: one graph per batch, captured on first
        # use (after an eager warm-up call that compiles the kernels), replayed afterwards.
        cache = {}

        def embed(t, m, valid):
            key = (t.data_ptr(), t.shape)
            if key not in cache:
                enc(t, m, valid)
                torch.cuda.synchronize(device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = enc(t, m, valid)
                cache[key] = (g, out)
            g, out = cache[key]
            g.replay()
            return out
        return embed, None
    return build


class Variant:
    def __init__(self, name, build, model, batches, args, device, setup=None):
        self.name, self.args, self.device, self.batches = name, args, device, batches
        self.setup = setup or {}
        self.row = dict(variant=name, embed_s=NAN, train_s=NAN, compile_s=NAN, min_cos=NAN,
                        error=None)
        self.samples = {"embed": [], "train": []}
        self.embed = self.train = None
        try:
            t0 = time.perf_counter()
            with _setup(**self.setup), \
                    time_limit(args.compile_timeout if "compile" in name else None):
                self.embed, self.train = build(model, device)
                self.outputs = self.embed_all()  # first calls: compilation, caches
                if not args.no_train and self.train is not None:
                    for b in batches:
                        self.train(b)
                self._sync()
            if "compile" in name:
                self.row["compile_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001  (recorded; the other variants still run)
            self.row["error"] = failure_text(exc)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def embed_all(self):
        return torch.cat([self.embed(t, m, valid) for t, m, valid, _, _ in self.batches])

    def train_all(self):
        for b in self.batches:
            self.train(b)

    def time_round(self):
        if self.row["error"] or self.embed is None:
            return
        try:
            clock = time.process_time if self.args.cpu_time else time.perf_counter
            with _setup(**self.setup):
                self.samples["embed"].append(timed_median(self.embed_all, self.device,
                                                          self.args.repeats, 1, clock))
                if not self.args.no_train and self.train is not None:
                    self.samples["train"].append(timed_median(self.train_all, self.device,
                                                              self.args.repeats, 1, clock))
        except Exception as exc:  # noqa: BLE001
            self.row["error"] = failure_text(exc)
        n = sum(b[0].shape[0] for b in self.batches)
        for k, v in self.samples.items():
            if v:
                self.row[f"{k}_s"] = statistics.median(v)
            self.row[f"{k}_windows_per_s"] = n / self.row[f"{k}_s"] if self.row[f"{k}_s"] > 0 \
                else NAN
        self.row["rounds"] = len(self.samples["embed"])


def _ratios(rows):
    by = {r["variant"]: r for r in rows if not r["error"]}
    for r in rows:
        for k in ("embed", "train"):
            r.setdefault(f"{k}_windows_per_s", NAN)
            for ref, key in ((BF16_SDPA, "vs_bf16_sdpa"), (FP32_SDPA, "vs_fp32_sdpa")):
                base = by.get(ref, {}).get(f"{k}_windows_per_s", NAN)
                r[f"{k}_{key}"] = r[f"{k}_windows_per_s"] / base if base else NAN


def _print_table(rows):
    print(f"| {'variant':44s} | {'embed win/s':>11s} | {'vs bf16':>7s} | {'vs fp32':>7s} | "
          f"{'train win/s':>11s} | {'vs bf16':>7s} | {'vs fp32':>7s} | {'min cos':>9s} |")
    print("|" + "|".join("-" * w for w in (46, 13, 9, 9, 13, 9, 9, 11)) + "|")
    for r in rows:
        if r["error"]:
            print(f"| {r['variant']:44s} | FAILED: {r['error']}")
            continue
        extra = f" (compile + first calls {r['compile_s']:.0f} s)" \
            if math.isfinite(r["compile_s"]) else ""
        print(f"| {r['variant']:44s} | {r['embed_windows_per_s']:11.1f} | "
              f"{r['embed_vs_bf16_sdpa']:7.2f} | {r['embed_vs_fp32_sdpa']:7.2f} | "
              f"{r['train_windows_per_s']:11.1f} | {r['train_vs_bf16_sdpa']:7.2f} | "
              f"{r['train_vs_fp32_sdpa']:7.2f} | {r['min_cos']:9.6f} |{extra}", flush=True)


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from astromer_fast.model.fused_cpu import cpu_isa_info

    info = cpu_isa_info()
    return f"{info.get('model') or platform.processor()} ({', '.join(info.get('features', []))})"


def run(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = astromer_fast.load_model().to(device)
    batches, n_obs = make_data(args, device)
    n = sum(b[0].shape[0] for b in batches)
    hw = machine(device)
    clock = "CPU seconds of this process" if args.cpu_time else "wall time"
    print(f"{n} {args.data} windows ({n_obs} observations, batches of {args.batch} cut to their "
          f"longest), {device}: {hw}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median of {args.repeats} per round, {args.rounds} round(s), "
          f"{clock}", flush=True)
    built, rows = [], []
    compile_ref = args.compile and (getattr(args, "compile_mode", None) or True)
    for name, build, *setup in variants(device, compile_ref):
        if args.skip and re.search(args.skip, name):
            continue
        v = Variant(name, build, model, batches, args, device, *setup)
        built.append(v)
        rows.append(v.row)
        print(f"built {name}" + (f": FAILED {v.row['error']}" if v.row["error"] else ""),
              flush=True)
    ref = next((v for v in built if v.name == FP32_SDPA and not v.row["error"]), None)
    for v in built:
        if ref is not None and not v.row["error"]:
            cos = torch.nn.functional.cosine_similarity(v.outputs.float(), ref.outputs.float(),
                                                        dim=-1)
            v.row["min_cos"] = float(cos.min())
    for r in range(args.rounds):
        for v in built:
            v.time_round()
            # Written after every variant: a run stopped by its time limit keeps what finished.
            _ratios(rows)
            _dump(args, device, hw, n, n_obs, rows)
    print(f"\nmedian over {args.rounds} rounds; ratios to {BF16_SDPA} and {FP32_SDPA}:")
    _print_table(rows)
    return rows


def _dump(args, device, hw, n, n_obs, rows):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), hardware=hw, threads=torch.get_num_threads(),
                           data=args.data, windows=n, observations=n_obs, batch=args.batch,
                           repeats=args.repeats, rounds=args.rounds, torch=torch.__version__,
                           clock="process_time" if args.cpu_time else "wall",
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", choices=["eros", "random"], default=None,
                   help="real EROS-1 windows (default when ../shared/data is there) or random "
                   "padding of --length slots")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--full-width", action="store_true",
                   help="keep every batch at the full window (200-padded), not cut to its longest")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes per round (median; default 5 CUDA, 1 CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds, each timing every variant in turn (default 1 CUDA, 3 CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the reference (default: on CUDA only)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compiled variants, e.g. max-autotune")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="seconds allowed for compiling (and first calls of) a compiled variant")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this process's CPU seconds (time.process_time) instead of "
                   "wall time: for one thread on a machine other jobs share (--threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip", default=None, help="regex: skip variants whose name matches")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time and torch.get_num_threads() != 1:
        p.error("--cpu-time measures one thread: add --threads 1")
    cuda = a.device.startswith("cuda")
    if a.data is None:
        a.data = "eros" if (shared_data_dir() / "eros1.parquet").is_file() else "random"
    a.windows = a.windows or (4096 if cuda else 768)
    a.batch = a.batch or (1024 if cuda else 32)
    a.repeats = a.repeats or (5 if cuda else 1)
    a.rounds = a.rounds or (1 if cuda else 3)
    a.compile = cuda if a.compile is None else a.compile
    run(a)
