"""Per-op throughput, every backend and the reference PyTorch variants side by side in one run:
windows/s for the forward and for forward + backward, with ratios to eager fp32.

    python bench/bench_ops.py                                  # CPU, every registered op
    python bench/bench_ops.py --device cuda --windows 4096 --json out.json
    python bench/bench_ops.py --ops masked_attention --compile

Each op registers one function with ``@register("name")``; it receives the parsed arguments and
returns a list of variants ``(name, make)``: ``make()`` builds the variant's inputs and returns
``(fwd, fwd_bwd)`` callables (fwd_bwd None when there is no backward). The first variant of each op
is its baseline (eager fp32); on CUDA the ratios are also given against eager bf16 SDPA with the
key mask where the op has one. Timing: median of --repeats calls after warm-up (CUDA events on
CUDA). A variant that raises (while building, compiling or running) gets a row with its error and
the run goes on. Add an op by adding a section below; nothing else needs to change.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from typing import Callable

import torch
import torch.nn.functional as F

from astromer_fast.kernels import available_backends

from _timing import environ, failure_text, time_limit, timed_median

OP_BENCHES: list[tuple[str, Callable]] = []  # (op name, bench function), in registration order


def register(name: str):
    def deco(fn):
        OP_BENCHES.append((name, fn))
        return fn

    return deco


NAN = float("nan")
SDPA_BF16 = "eager bf16 SDPA + key mask"  # the second reference on CUDA


def _padding(B, L, g):
    """Random valid lengths (at least L/4) and 20% of the valid observations masked on top."""
    n_valid = torch.randint(max(1, L // 4), L + 1, (B,), generator=g)
    valid = torch.arange(L)[None] < n_valid[:, None]
    return valid, valid & (torch.rand(B, L, generator=g) < 0.2)


def _measure(op, name, make, args, device, n) -> dict:
    row = dict(op=op, variant=name, fwd_s=NAN, fwd_bwd_s=NAN, bwd_s=NAN, compile_s=NAN, error=None)
    try:
        t0 = time.perf_counter()
        # torch.compile compiles at the first call: bounded by --compile-timeout.
        with time_limit(args.compile_timeout if "compile" in name else None):
            fwd, fwd_bwd = make()
            fwd()
            if fwd_bwd is not None and not args.no_backward:
                fwd_bwd()
            _sync(device)
        if "compile" in name:
            row["compile_s"] = time.perf_counter() - t0
        row["fwd_s"] = timed_median(fwd, device, args.repeats)
        if fwd_bwd is not None and not args.no_backward:
            row["fwd_bwd_s"] = timed_median(fwd_bwd, device, args.repeats)
            row["bwd_s"] = row["fwd_bwd_s"] - row["fwd_s"]
    except Exception as exc:  # noqa: BLE001  (recorded; the other variants still run)
        row["error"] = failure_text(exc)
    for k in ("fwd", "fwd_bwd", "bwd"):
        row[f"{k}_windows_per_s"] = n / row[f"{k}_s"] if row[f"{k}_s"] > 0 else NAN
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dt_name(dt):
    return "bf16" if dt == torch.bfloat16 else "fp32"


def _kernel_backends(device):
    """Kernel backends to time on this device (the Triton interpreter is never timed)."""
    return [b for b in available_backends(device)
            if b != "torch" and not (b == "triton" and device.type != "cuda")]


# ------------------------------------------------------------------------------------------------
# masked_attention: (B, 4, L, 64), key mask with random padding and 20% masked observations
# ------------------------------------------------------------------------------------------------
@register("masked_attention")
def bench_masked_attention(args) -> list:
    from astromer_fast.kernels import masked_attention, masked_attention_reference
    from astromer_fast.model.astromer import attention_bias

    device = torch.device(args.device)
    B, L, H, hd = args.windows, args.length, 4, 64
    g = torch.Generator().manual_seed(0)
    valid, masked = _padding(B, L, g)
    kh = (~valid | masked).to(device)
    base = [torch.randn(B, H, L, hd, generator=g).to(device) for _ in range(3)]
    dout = torch.randn(B, H, L, hd, generator=g).to(device)

    def eager(q, k, v):
        return masked_attention_reference(q, k, v, kh, "key")[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(kh, "key", q.dtype))

    def variant(fn, dt, compiled=False, env=None):
        def make():
            f = torch.compile(fn) if compiled else fn
            q, k, v = (x.to(dt) for x in base)
            qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
            do = dout.to(dt)

            def fwd():
                with torch.no_grad(), environ(env):
                    f(q, k, v)

            def fwd_bwd():
                # (the backward reads the environment too, so it spans both)
                with environ(env):
                    torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), do)

            return fwd, fwd_bwd
        return make

    cuda = device.type == "cuda"
    out = [("eager fp32 (reference math)", variant(eager, torch.float32))]
    if cuda:
        out.append((SDPA_BF16, variant(sdpa, torch.bfloat16)))
    out.append(("eager fp32 SDPA + key mask", variant(sdpa, torch.float32)))
    if args.compile:
        cdt = torch.bfloat16 if cuda else torch.float32
        out.append((f"torch.compile {_dt_name(cdt)} SDPA + key mask", variant(sdpa, cdt, True)))
    for b in _kernel_backends(device):
        for dt in ((torch.float32, torch.bfloat16) if cuda else (torch.float32,)):
            fn = lambda q, k, v, b=b: masked_attention(q, k, v, kh, "key", backend=b)  # noqa: E731
            out.append((f"{b} {_dt_name(dt)}", variant(fn, dt)))
            if b == "cuda" and dt == torch.bfloat16:
                # The tensor-core (WMMA) kernels, opt-in until they have passed on a GPU.
                out.append(("cuda tensor_cores bf16",
                            variant(fn, dt, env={"ASTROMER_FAST_CUDA_ATTENTION": "tensor_cores"})))
    if cuda and "triton" in _kernel_backends(device):
        # The fused GPU encoder's attention (forward only): q, k, v read out of one (B*L, 3D)
        # projection, the heads written side by side, fully hidden key blocks skipped.
        for stages in (1, 2):
            out.append((f"triton fused-block bf16, {stages} stage(s), forward only",
                        _fused_block_attention(base, kh, stages)))
    return out


def _fused_block_attention(base, kh, stages):
    def make():
        from astromer_fast.kernels import _triton_fused_block as tfb

        B, H, L, hd = base[0].shape
        y = torch.cat([x.transpose(1, 2).reshape(B * L, H * hd) for x in base], 1)
        y = y.to(torch.bfloat16).contiguous()
        out = torch.empty(B * L, H * hd, dtype=torch.bfloat16, device=y.device)
        kh8 = kh.contiguous().view(torch.uint8)
        allh = kh.all(1).contiguous().view(torch.uint8)

        def fwd():
            tfb.attention(y, kh8, allh, out, B, L, H, 0, 1.0 / math.sqrt(hd), stages=stages)

        return fwd, None
    return make


@register("weighted_rmse")
def bench_weighted_rmse(args) -> list:
    from astromer_fast.kernels import weighted_rmse, weighted_rmse_reference

    device = torch.device(args.device)
    B, L = args.windows, args.length
    g = torch.Generator().manual_seed(0)
    valid, _ = _padding(B, L, g)
    probed = valid & (torch.rand(B, L, generator=g) < 0.5)
    err = torch.rand(B, L, generator=g) * 0.1 + 0.01
    target = torch.randn(B, L, generator=g)
    base = target + 0.3 * torch.randn(B, L, generator=g)
    valid, probed, err, target, base = (x.to(device) for x in (valid, probed, err, target, base))

    def eager(pred):
        return weighted_rmse_reference(pred, target, err, probed, valid)

    def variant(fn, dt, compiled=False):
        def make():
            f = torch.compile(fn) if compiled else fn
            pred = base.to(dt)
            pg = pred.detach().clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    f(pred)

            def fwd_bwd():
                torch.autograd.grad(f(pg), pg)

            return fwd, fwd_bwd
        return make

    cuda = device.type == "cuda"
    out = [("eager fp32 (reference)", variant(eager, torch.float32))]
    if cuda:
        out.append(("eager bf16 pred (reference)", variant(eager, torch.bfloat16)))
    if args.compile:
        out.append(("torch.compile fp32 (reference)", variant(eager, torch.float32, True)))
    for b in _kernel_backends(device):
        for dt in (torch.float32, torch.bfloat16):
            fn = lambda pred, b=b: weighted_rmse(pred, target, err, probed, valid, backend=b)  # noqa: E731
            out.append((f"{b} {_dt_name(dt)} pred", variant(fn, dt)))
    return out


@register("input_embedding")
def bench_input_embedding(args) -> list:
    from astromer_fast.kernels import input_embedding
    from astromer_fast.kernels.input_embedding import input_embedding_reference

    device = torch.device(args.device)
    B, L, D = args.windows, args.length, 256
    g = torch.Generator().manual_seed(0)
    valid, masked = _padding(B, L, g)
    t = (torch.sort(torch.rand(B, L, generator=g) * 2000 - 1000, 1).values * valid).to(device)
    m = (torch.randn(B, L, generator=g) * valid).to(device)
    hidden = (~valid | masked).to(device)
    w0, b0 = torch.randn(D, generator=g).to(device), torch.randn(D, generator=g).to(device)
    tok0 = torch.randn(1, generator=g).to(device)

    def variant(fn, compiled=False):
        def make():
            f = torch.compile(fn) if compiled else fn
            w, b, tok = (x.detach().clone().requires_grad_(True) for x in (w0, b0, tok0))
            dout = torch.randn(B, L, D, device=device)

            def fwd():
                with torch.no_grad():
                    f(t, m, hidden, w0, b0, tok0)

            def fwd_bwd():
                torch.autograd.grad(f(t, m, hidden, w, b, tok), (w, b, tok), dout)

            return fwd, fwd_bwd
        return make

    out = [("eager fp32 (reference)", variant(input_embedding_reference))]
    if args.compile:
        out.append(("torch.compile fp32 (reference)", variant(input_embedding_reference, True)))
    for be in _kernel_backends(device):
        fn = lambda t, m, h, w, b, tok, be=be: input_embedding(t, m, h, w, b, tok, backend=be)  # noqa: E731
        out.append((f"{be} fp32", variant(fn)))
    return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=None, help="windows per call (default 64 CPU, 4096 CUDA)")
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--repeats", type=int, default=None, help="timed calls (median; default 20 CUDA, 7 CPU)")
    p.add_argument("--ops", default="all", help="comma-separated op names, or 'all'")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the reference (default: on CUDA only)")
    p.add_argument("--compile-timeout", type=float, default=90.0,
                   help="seconds allowed for one torch.compile variant's first calls")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--skip", default=None, help="regex: skip variants whose name matches "
                   "(e.g. one known to stall, so the rest of a time-boxed run is measured)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.windows = args.windows or (4096 if cuda else 64)
    args.repeats = args.repeats or (20 if cuda else 7)
    args.compile = cuda if args.compile is None else args.compile
    wanted = None if args.ops == "all" else set(args.ops.split(","))

    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"{args.windows} windows x {args.length} obs, {device} ({hw}, {torch.get_num_threads()} "
          f"threads), torch {torch.__version__}; median of {args.repeats}", flush=True)
    head = (f"{'op':16s} {'variant':36s} {'fwd win/s':>11s} {'ratio':>6s} {'fwd+bwd win/s':>13s} "
            f"{'ratio':>6s} {'bwd win/s':>11s} {'ratio':>6s}")
    if cuda:
        head += f"  {'vs SDPA bf16: fwd':>17s} {'bwd':>5s}"
    all_rows = []
    for op, bench in OP_BENCHES:
        if wanted is not None and op not in wanted:
            continue
        print(head, flush=True)
        rows = []
        try:
            variants = bench(args)
        except Exception as exc:  # noqa: BLE001
            variants = []
            rows.append(dict(op=op, variant="(inputs)", error=failure_text(exc)))
        for name, make in variants:
            if args.skip and re.search(args.skip, name):
                print(f"{op:16s} {name:36s} skipped (--skip)", flush=True)
                continue
            r = _measure(op, name, make, args, device, args.windows)
            rows.append(r)
            base = rows[0]
            sd = next((x for x in rows if x["variant"] == SDPA_BF16 and not x.get("error")), None)
            for k in ("fwd", "fwd_bwd", "bwd"):
                r[f"{k}_ratio"] = r[f"{k}_windows_per_s"] / base.get(f"{k}_windows_per_s", NAN)
                if sd is not None:
                    r[f"{k}_vs_sdpa_bf16"] = r[f"{k}_windows_per_s"] / sd[f"{k}_windows_per_s"]
            line = f"{op:16s} {name:36s} "
            if r["error"]:
                line += f"FAILED: {r['error']}"
            else:
                line += (f"{r['fwd_windows_per_s']:11.1f} {r['fwd_ratio']:6.2f} "
                         f"{r['fwd_bwd_windows_per_s']:13.1f} {r['fwd_bwd_ratio']:6.2f} "
                         f"{r['bwd_windows_per_s']:11.1f} {r['bwd_ratio']:6.2f}")
                if sd is not None:
                    line += f"  {r['fwd_vs_sdpa_bf16']:17.2f} {r['bwd_vs_sdpa_bf16']:5.2f}"
                if math.isfinite(r["compile_s"]):
                    line += f"  (compile + first calls {r['compile_s']:.1f} s)"
            print(line, flush=True)
            # Rewritten after every row: a run stopped by an outer timeout keeps what it measured.
            _dump(args, device, hw, all_rows + rows)
        all_rows += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _dump(args, device, hw, all_rows)
    return all_rows


def _dump(args, device, hw, rows):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), hardware=hw, threads=torch.get_num_threads(),
                           windows=args.windows, length=args.length, repeats=args.repeats,
                           torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
