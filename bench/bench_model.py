"""Whole-model throughput, every variant side by side in one run: windows/s for the embedding
forward and for a training step (forward + official loss + backward + Adam), with ratios to the
plain PyTorch reference in fp32.

    python bench/bench_model.py                       # CPU: small sizes
    python bench/bench_model.py --device cuda --windows 4096 --json out.json

Variants:
  * reference eager fp32 (torch backend: explicit softmax attention, plain-PyTorch embedding/loss);
  * reference eager bf16 autocast with SDPA and the key mask;
  * torch.compile of the reference (bf16 autocast + SDPA on CUDA, fp32 on the CPU): its compile
    time (and first calls) is reported separately and bounded by --compile-timeout; default on
    CUDA only (--compile / --no-compile); with --compile, also this package's model compiled
    (its custom ops stay opaque in the graph: attention triton on CUDA, C++ ops on the CPU);
  * this package's model with each kernel backend (cuda, triton / cpu), fp32 and bf16 autocast.
Inputs: random times, magnitudes and errors, random padding lengths, half of the valid
observations probed. Timing: each variant is built (and compiled) once, then every variant is
timed in turn in each of --rounds rounds (median of --repeats calls after a warm-up, CUDA events on
CUDA); a row is the median over rounds, so a load that drifts during the run affects every row
alike. A variant that raises gets a row with its error; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import statistics
import time

import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.kernels import available_backends, backends
from astromer_fast.training import weighted_rmse

from _timing import environ, failure_text, time_limit, timed_median

SDPA_BF16 = "reference eager bf16 SDPA + key mask"

NAN = float("nan")


def make_batch(n, L, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_valid = torch.randint(max(1, L // 4), L + 1, (n,), generator=g)  # random padding
    valid = torch.arange(L)[None] < n_valid[:, None]
    t = torch.sort(torch.rand(n, L, generator=g) * 1000 - 500, 1).values * valid
    m = torch.randn(n, L, generator=g) * valid
    err = (torch.rand(n, L, generator=g) * 0.1 + 0.01) * valid
    probed = valid & (torch.rand(n, L, generator=g) < 0.5)
    return [x.to(device) for x in (t, m, valid, err, probed)]


def variants(device, compile_ref):
    """(name, model kwargs, autocast dtype or None, compiled[, setup]); setup may override
    per-op defaults (``defaults``) and environment variables (``env``) while the variant runs."""
    cuda = device.type == "cuda"
    out = [("reference eager fp32", dict(backend="torch"), None, False),
           (SDPA_BF16, dict(backend="torch", use_sdpa=True), torch.bfloat16, False)]
    if compile_ref:
        if cuda:
            out.append(("reference torch.compile bf16 SDPA", dict(backend="torch", use_sdpa=True),
                        torch.bfloat16, True))
        else:
            out.append(("reference torch.compile fp32", dict(backend="torch"), None, True))
    # What a user gets without choosing (on CUDA: backends.CUDA_DEFAULTS).
    out.append(("astromer_fast defaults bf16 autocast" if cuda else "astromer_fast defaults fp32",
                dict(backend=None), torch.bfloat16 if cuda else None, False))
    if cuda:
        # Candidates for the attention default, with the other ops on their defaults: Triton's
        # tl.dot kernels and the CUDA tensor-core (WMMA) kernels, both on tensor cores in bf16.
        out.append(("defaults, attention triton, bf16", dict(backend=None), torch.bfloat16, False,
                    dict(defaults={"masked_attention": "triton"})))
        out.append(("defaults, attention cuda tc, bf16", dict(backend=None), torch.bfloat16, False,
                    dict(defaults={"masked_attention": "cuda"},
                         env={"ASTROMER_FAST_CUDA_ATTENTION": "tensor_cores"})))
        if compile_ref:
            # Our custom ops inside a compiled graph: inductor fuses the norms, activations and
            # residuals around them (the reference's compile gain), the ops stay ours.
            out.append(("defaults, attention triton, compiled bf16", dict(backend=None),
                        torch.bfloat16, True, dict(defaults={"masked_attention": "triton"})))
    if compile_ref and not cuda:
        # Our C++ custom ops inside a compiled graph: what compiling buys on top of the kernels.
        out.append(("astromer_fast defaults, compiled fp32", dict(backend=None), None, True))
    for b in available_backends(device):
        if b == "torch" or (b == "triton" and not cuda):
            continue
        out.append((f"fused {b} fp32", dict(backend=b), None, False))
        out.append((f"fused {b} bf16 autocast", dict(backend=b), torch.bfloat16, False))
    return out


@contextlib.contextmanager
def _setup(defaults=None, env=None):
    """Per-op defaults (backends.CUDA_DEFAULTS) and environment variables, restored afterwards."""
    saved = dict(backends.CUDA_DEFAULTS)
    backends.CUDA_DEFAULTS.update(defaults or {})
    try:
        with environ(env):
            yield
    finally:
        backends.CUDA_DEFAULTS.clear()
        backends.CUDA_DEFAULTS.update(saved)


class Variant:
    """One row of the table: its model and closures, built (and compiled) once, then timed in
    every round, so that all variants are timed side by side under the same machine load."""

    def __init__(self, name, kw, amp, compiled, data, args, device, setup=None):
        self.name, self.setup, self.args, self.device = name, setup or {}, args, device
        self.row = dict(variant=name, embed_s=NAN, train_s=NAN, compile_s=NAN, error=None)
        self.samples = {"embed": [], "train": []}
        self.fns = None
        try:
            with _setup(**self.setup):
                self.fns = self._build(kw, amp, compiled, data)
        except Exception as exc:  # noqa: BLE001  (recorded; the other variants still run)
            self.row["error"] = failure_text(exc)

    def _build(self, kw, amp, compiled, data):
        args, device = self.args, self.device
        t, m, valid, err, probed = data
        hidden = ~valid
        torch.manual_seed(0)
        model = Astromer(AstromerConfig()).to(device)
        loss_backend = kw["backend"]
        fwd_model = torch.compile(model) if compiled else model
        # encode() for embedding; forward() (with the regression head) for training.
        enc = torch.compile(model.encode) if compiled else model.encode
        ac = dict(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)

        def embed():
            model.eval()
            with torch.no_grad(), torch.autocast(**ac):
                for s in range(0, args.windows, args.batch):
                    sl = slice(s, s + args.batch)
                    enc(t[sl], m[sl], hidden[sl], **kw)

        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

        def train():
            model.train()
            for s in range(0, args.windows, args.batch):
                sl = slice(s, s + args.batch)
                with torch.autocast(**ac):
                    pred = fwd_model(t[sl], m[sl], hidden[sl] | probed[sl], **kw)
                loss = weighted_rmse(pred, m[sl], err[sl], probed[sl], valid[sl],
                                     backend=loss_backend)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        t0 = time.perf_counter()
        with time_limit(args.compile_timeout if compiled else None):
            embed()  # first calls: compilation, allocator and kernel caches
            if not args.no_train:
                train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        if compiled:
            self.row["compile_s"] = time.perf_counter() - t0
        return {"embed": embed} if args.no_train else {"embed": embed, "train": train}

    def time_round(self):
        """One round: the median of --repeats timed calls of each task, after one warm-up."""
        if self.row["error"] or self.fns is None:
            return
        try:
            with _setup(**self.setup):
                for k, fn in self.fns.items():
                    self.samples[k].append(timed_median(fn, self.device, self.args.repeats,
                                                        warmup=1))
        except Exception as exc:  # noqa: BLE001
            self.row["error"] = failure_text(exc)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        for k, v in self.samples.items():
            if v:
                self.row[f"{k}_s"] = statistics.median(v)
            self.row[f"{k}_windows_per_s"] = (self.args.windows / self.row[f"{k}_s"]
                                              if self.row[f"{k}_s"] > 0 else NAN)
        self.row["rounds"] = len(self.samples["embed"])


def _ratios(rows, cuda):
    base = rows[0]
    # The GPU goals are ratios to eager bf16 SDPA (embed >= 1.5x, train >= 1.3x).
    sdpa = next((x for x in rows if x["variant"] == SDPA_BF16 and not x["error"]), None)
    for r in rows:
        for k in ("embed", "train"):
            r.setdefault(f"{k}_windows_per_s", NAN)
            r[f"{k}_ratio"] = r[f"{k}_windows_per_s"] / base.get(f"{k}_windows_per_s", NAN)
            if cuda and sdpa is not None:
                r[f"{k}_vs_sdpa_bf16"] = r[f"{k}_windows_per_s"] / sdpa[f"{k}_windows_per_s"]


def _print_row(r):
    name = r["variant"]
    if r["error"]:
        print(f"{name:38s} FAILED: {r['error']}", flush=True)
        return
    line = (f"{name:38s} {r['embed_windows_per_s']:12.1f} {r['embed_ratio']:7.2f} "
            f"{r['train_windows_per_s']:12.1f} {r['train_ratio']:7.2f}")
    if "embed_vs_sdpa_bf16" in r:
        line += f"   vs SDPA bf16: {r['embed_vs_sdpa_bf16']:.2f} / {r['train_vs_sdpa_bf16']:.2f}"
    if math.isfinite(r["compile_s"]):
        line += f"  (compile + first calls {r['compile_s']:.1f} s)"
    print(line, flush=True)


def _header():
    print(f"{'variant':38s} {'embed win/s':>12s} {'ratio':>7s} {'train win/s':>12s} {'ratio':>7s}",
          flush=True)


def run(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    data = make_batch(args.windows, args.length, device)
    hw = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"{args.windows} windows x {args.length} obs (random padding), batch {args.batch}, "
          f"{device} ({hw}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"median of {args.repeats} per round, {args.rounds} round(s)", flush=True)
    _header()
    variants_, rows = [], []
    # Round 1 builds, times and prints each variant at once (a run cut short by an outer timeout
    # keeps what it measured); later rounds time every variant again, in turn.
    for name, kw, amp, compiled, *setup in variants(device, args.compile):
        if args.skip and re.search(args.skip, name):
            print(f"{name:38s} skipped (--skip)", flush=True)
            continue
        v = Variant(name, kw, amp, compiled, data, args, device, *setup)
        v.time_round()
        if args.rounds == 1:
            v.fns = None  # nothing more to time: free the model (and its compiled graphs)
        variants_.append(v)
        rows.append(v.row)
        _ratios(rows, cuda)
        _print_row(v.row)
        _dump(args, device, hw, rows)
    if args.rounds > 1:
        for _ in range(args.rounds - 1):
            for v in variants_:
                v.time_round()
            _ratios(rows, cuda)
            _dump(args, device, hw, rows)
        print(f"median over {args.rounds} rounds:", flush=True)
        _header()
        for r in rows:
            _print_row(r)
    _dump(args, device, hw, rows)
    return rows


def _dump(args, device, hw, rows):
    """Rewritten after every variant: a run stopped by an outer timeout keeps what it measured."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), hardware=hw, threads=torch.get_num_threads(),
                           windows=args.windows, length=args.length, batch=args.batch,
                           repeats=args.repeats, rounds=args.rounds, torch=torch.__version__,
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per round (median; default 5 CUDA, 1 CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds, each timing every variant in turn; a row is the median over "
                        "rounds (default 1 CUDA, 5 CPU, where other load drifts more)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the reference (default: on CUDA only)")
    p.add_argument("--compile-timeout", type=float, default=180.0,
                   help="seconds allowed for compiling (and first calls of) the compiled variant")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--skip", default=None, help="regex: skip variants whose name matches")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    a.windows = a.windows or (4096 if cuda else 64)
    a.batch = a.batch or (1024 if cuda else 32)
    a.repeats = a.repeats or (5 if cuda else 1)
    a.rounds = a.rounds or (1 if cuda else 5)
    a.compile = cuda if a.compile is None else a.compile
    run(a)
