"""Per-op throughput, every backend and the reference PyTorch variants side by side in one run:
windows/s for the forward and for forward + backward, with ratios to eager fp32.

    python bench/bench_ops.py                                  # CPU, every registered op
    python bench/bench_ops.py --device cuda --windows 4096 --json out.json
    python bench/bench_ops.py --ops masked_attention --compile

Each op registers one function with ``@register("name")``; it receives the parsed arguments and
returns rows ``dict(op=, variant=, fwd_windows_per_s=, fwd_bwd_windows_per_s=)`` (NaN where a
variant has no backward). The first row of each op is its baseline (eager fp32). Add an op by
adding a section below; nothing else needs to change.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from typing import Callable

import torch
import torch.nn.functional as F

from astromer_fast.kernels import available_backends

from _timing import device_sync, timed

OP_BENCHES: list[tuple[str, Callable]] = []  # (op name, bench function), in registration order


def register(name: str):
    def deco(fn):
        OP_BENCHES.append((name, fn))
        return fn

    return deco


def _row(op, variant, n, t_fwd, t_fb):
    return dict(op=op, variant=variant, fwd_windows_per_s=n / t_fwd,
                fwd_bwd_windows_per_s=n / t_fb if math.isfinite(t_fb) else float("nan"))


# ------------------------------------------------------------------------------------------------
# masked_attention: (B, 4, L, 64), key mask with random padding and 20% masked observations
# ------------------------------------------------------------------------------------------------
@register("masked_attention")
def bench_masked_attention(args) -> list[dict]:
    from astromer_fast.kernels import masked_attention, masked_attention_reference
    from astromer_fast.model.astromer import attention_bias

    device = torch.device(args.device)
    sync = device_sync(device)
    B, L, H, hd = args.windows, args.length, 4, 64
    g = torch.Generator().manual_seed(0)
    n_valid = torch.randint(L // 4, L + 1, (B,), generator=g)
    kh = ((torch.arange(L)[None] >= n_valid[:, None]) | (torch.rand(B, L, generator=g) < 0.2)).to(device)
    base = [torch.randn(B, H, L, hd, generator=g).to(device) for _ in range(3)]
    dout = torch.randn(B, H, L, hd, generator=g).to(device)

    def eager(q, k, v):
        return masked_attention_reference(q, k, v, kh, "key")[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias(kh, "key", q.dtype))

    variants: list[tuple[str, Callable, torch.dtype]] = [("eager fp32 (reference math)", eager, torch.float32)]
    if device.type == "cuda":
        variants.append(("eager bf16 SDPA + key mask", sdpa, torch.bfloat16))
    variants.append(("eager fp32 SDPA + key mask", sdpa, torch.float32))
    if args.compile:
        variants.append(("torch.compile fp32 (reference math)", torch.compile(eager), torch.float32))
    for b in available_backends(device):
        if b == "torch" or (b == "triton" and device.type != "cuda"):
            continue
        dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
        for dt in dtypes:
            variants.append((f"{b} {'bf16' if dt == torch.bfloat16 else 'fp32'}",
                             lambda q, k, v, b=b: masked_attention(q, k, v, kh, "key", backend=b), dt))

    rows = []
    for name, fn, dt in variants:
        q, k, v = (x.to(dt) for x in base)
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        do = dout.to(dt)

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd():
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), do)

        t_f = timed(fwd, sync, args.repeats)
        t_fb = timed(fwd_bwd, sync, args.repeats) if not args.no_backward else float("nan")
        rows.append(_row("masked_attention", name, B, t_f, t_fb))
    return rows


# ------------------------------------------------------------------------------------------------
# weighted_rmse: (B, L) loss with random padding, half the valid observations probed, errors
# ------------------------------------------------------------------------------------------------
@register("weighted_rmse")
def bench_weighted_rmse(args) -> list[dict]:
    from astromer_fast.kernels import weighted_rmse, weighted_rmse_reference

    device = torch.device(args.device)
    sync = device_sync(device)
    B, L = args.windows, args.length
    g = torch.Generator().manual_seed(0)
    n_valid = torch.randint(L // 4, L + 1, (B,), generator=g)
    valid = torch.arange(L)[None] < n_valid[:, None]
    probed = valid & (torch.rand(B, L, generator=g) < 0.5)
    err = torch.rand(B, L, generator=g) * 0.1 + 0.01
    target = torch.randn(B, L, generator=g)
    base = target + 0.3 * torch.randn(B, L, generator=g)
    valid, probed, err, target, base = (x.to(device) for x in (valid, probed, err, target, base))

    def eager(pred):
        return weighted_rmse_reference(pred, target, err, probed, valid)

    variants: list[tuple[str, Callable, torch.dtype]] = [("eager fp32 (reference)", eager, torch.float32)]
    if device.type == "cuda":
        variants.append(("eager bf16 pred (reference)", eager, torch.bfloat16))
    if args.compile:
        variants.append(("torch.compile fp32 (reference)", torch.compile(eager), torch.float32))
    for b in available_backends(device):
        if b == "torch" or (b == "triton" and device.type != "cuda"):
            continue
        for dt in (torch.float32, torch.bfloat16):
            variants.append((f"{b} {'bf16' if dt == torch.bfloat16 else 'fp32'} pred",
                             lambda pred, b=b: weighted_rmse(pred, target, err, probed, valid, backend=b), dt))

    rows = []
    for name, fn, dt in variants:
        pred = base.to(dt)
        pg = pred.detach().clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                fn(pred)

        def fwd_bwd():
            torch.autograd.grad(fn(pg), pg)

        t_f = timed(fwd, sync, args.repeats)
        t_fb = timed(fwd_bwd, sync, args.repeats) if not args.no_backward else float("nan")
        rows.append(_row("weighted_rmse", name, B, t_f, t_fb))
    return rows


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=int, default=None, help="windows per call (default 64 CPU, 4096 CUDA)")
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", default="all", help="comma-separated op names, or 'all'")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.windows = args.windows or (4096 if args.device.startswith("cuda") else 64)
    wanted = None if args.ops == "all" else set(args.ops.split(","))

    device = torch.device(args.device)
    hw = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{args.windows} windows x {args.length} obs, {device} ({hw}, {torch.get_num_threads()} "
          f"threads), torch {torch.__version__}")
    print(f"{'op':18s} {'variant':38s} {'fwd win/s':>12s} {'ratio':>7s} {'fwd+bwd win/s':>14s} {'ratio':>7s}")
    all_rows = []
    for op, fn in OP_BENCHES:
        if wanted is not None and op not in wanted:
            continue
        rows = fn(args)
        b_f, b_fb = rows[0]["fwd_windows_per_s"], rows[0]["fwd_bwd_windows_per_s"]
        for r in rows:
            r["fwd_ratio"] = r["fwd_windows_per_s"] / b_f
            r["fwd_bwd_ratio"] = r["fwd_bwd_windows_per_s"] / b_fb
            print(f"{r['op']:18s} {r['variant']:38s} {r['fwd_windows_per_s']:12.1f} {r['fwd_ratio']:7.2f} "
                  f"{r['fwd_bwd_windows_per_s']:14.1f} {r['fwd_bwd_ratio']:7.2f}")
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), hardware=hw, threads=torch.get_num_threads(),
                           windows=args.windows, length=args.length, torch=torch.__version__,
                           rows=all_rows), f, indent=2)
    return all_rows


if __name__ == "__main__":
    main()
