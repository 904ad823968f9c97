"""Triton kernels of the weighted masked RMSE (backend ``triton``).

Two launches, no atomics: (1) one program per window reduces it (lo/hi of 1/e over valid
observations and the probed count, then the weighted squared error, fp32 accumulation) into a
per-window partial (mse_b, has_b) and writes the backward direction; (2) one program sums the
partials in a fixed order (fp64) and writes the loss and the backward scale. Same contract as the
C++ kernel (csrc/cpu/weighted_rmse.h).

Imported only when the backend is used; kernels are decorated lazily because ``triton.jit`` decides
at decoration time whether it compiles or runs in the interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # fp32-exact


def _wrmse_windows(
    pred_ptr, target_ptr, err_ptr, probed_ptr, valid_ptr, part_ptr, dir_ptr, n,
    HAS_ERR: tl.constexpr, WRITE_DIR: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    base = r.to(tl.int64) * n
    lo = tl.full([BLOCK], _FLT_MAX, tl.float32)
    hi = tl.full([BLOCK], -_FLT_MAX, tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        cnt += tl.load(probed_ptr + base + offs, mask=m, other=0).to(tl.int32)
        if HAS_ERR:
            e = tl.load(err_ptr + base + offs, mask=m, other=1.0)
            inv = 1.0 / tl.maximum(e, 1e-8)
            ok = tl.load(valid_ptr + base + offs, mask=m, other=0) != 0
            lo = tl.minimum(lo, tl.where(ok, inv, _FLT_MAX))
            hi = tl.maximum(hi, tl.where(ok, inv, -_FLT_MAX))
    count = tl.sum(cnt, axis=0)
    lo_s = tl.min(lo, axis=0)
    hi_s = tl.max(hi, axis=0)
    # hi < lo only when nothing is valid (or without errors): then span = 0, i.e. flat (weights are
    # valid-masked anyway). Written this way so that FLT_MAX - (-FLT_MAX) never overflows.
    span = hi_s - tl.minimum(lo_s, hi_s)
    flat = span <= 0.0
    safe_span = tl.where(flat, 1.0, span)
    countf = count.to(tl.float32)
    inv_count = 1.0 / tl.maximum(countf, 1.0)

    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        w = tl.load(valid_ptr + base + offs, mask=m, other=0).to(tl.float32)
        if HAS_ERR:
            e = tl.load(err_ptr + base + offs, mask=m, other=1.0)
            inv = 1.0 / tl.maximum(e, 1e-8)
            w = w * tl.where(flat, 1.0, (inv - lo_s) / safe_span + 1e-3)
        wp = w * tl.load(probed_ptr + base + offs, mask=m, other=0).to(tl.float32)
        y = tl.load(target_ptr + base + offs, mask=m, other=0.0)
        yh = tl.load(pred_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = yh - y
        acc += wp * d * d
        if WRITE_DIR:
            tl.store(dir_ptr + base + offs, wp * d * inv_count, mask=m)
    num = tl.sum(acc, axis=0)
    has = count > 0
    tl.store(part_ptr + 2 * r, tl.where(has, num / tl.maximum(countf, 1.0), 0.0))
    tl.store(part_ptr + 2 * r + 1, has.to(tl.float32))


def _wrmse_reduce(part_ptr, loss_ptr, scale_ptr, rows, BLOCK: tl.constexpr):
    s = tl.zeros([BLOCK], tl.float64)
    c = tl.zeros([BLOCK], tl.float64)
    for start in range(0, rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < rows
        mse = tl.load(part_ptr + 2 * offs, mask=m, other=0.0)
        has = tl.load(part_ptr + 2 * offs + 1, mask=m, other=0.0)
        s += tl.where(has != 0.0, mse, 0.0).to(tl.float64)
        c += has.to(tl.float64)
    total = tl.sum(s, axis=0)
    n = tl.sum(c, axis=0)
    some = n > 0.0
    mean = total / tl.maximum(n, 1.0)
    loss = tl.where(some, tl.sqrt(mean + 1e-12), 0.0).to(tl.float32)
    scale = tl.where(some, 1.0 / (loss.to(tl.float64) * tl.maximum(n, 1.0)), 0.0).to(tl.float32)
    tl.store(loss_ptr, loss)
    tl.store(scale_ptr, scale)


_kernels: dict[bool, tuple] = {}


def _get_kernels():
    from astromer_fast.kernels.backends import triton_interpret_enabled

    interp = triton_interpret_enabled()
    k = _kernels.get(interp)
    if k is None:
        k = _kernels[interp] = (triton.jit(_wrmse_windows), triton.jit(_wrmse_reduce))
    return k


def weighted_rmse_forward(pred, target, err, probed, valid, loss, scale, dir_) -> None:
    """Fill ``loss``/``scale`` (0-d float32) and, if given, ``dir_`` (B, L) float32 from contiguous
    (B, L) pred (float32/bfloat16), target, err (float32 or None), probed, valid (bool or None)."""
    rows, n = pred.shape
    windows, reduce = _get_kernels()
    part = torch.empty(2 * max(rows, 1), dtype=torch.float32, device=pred.device)
    if rows > 0:
        block = max(16, min(triton.next_power_of_2(max(n, 1)), 1024))
        windows[(rows,)](
            pred, target, err if err is not None else target, probed,
            valid if valid is not None else probed, part, dir_ if dir_ is not None else part, n,
            HAS_ERR=err is not None, WRITE_DIR=dir_ is not None, BLOCK=block,
            num_warps=max(1, min(8, block // 64)),
        )
    reduce[(1,)](part, loss, scale, rows, BLOCK=1024, num_warps=4)


__all__ = ["weighted_rmse_forward"]
