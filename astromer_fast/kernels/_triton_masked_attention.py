"""Triton kernels of the masked attention (backend ``triton``): flash-style forward, backward.

Semantics as ``masked_attention.py`` documents them (mask terms added in float32 exactly as the
reference adds them; all-hidden rows shifted back by +1e9). Forward: one program per (query block,
b*h), online softmax over key blocks, writes out and lse. Backward: D = rowsum(dO * O) in PyTorch,
then one kernel for dk/dv (one program per key block, looping over query blocks) and one for dq
(one program per query block, looping over key blocks): no atomics, deterministic.

Imported only when that backend is used; kernels are decorated lazily because ``triton.jit``
decides at decoration time whether to compile or interpret (``TRITON_INTERPRET=1``).
fp32 inputs use IEEE fp32 dots (never TF32); bf16 inputs use bf16 dots with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from astromer_fast.kernels._triton_jit import jit_kernels


def _logits(q, k, qh, kh, allh, nmask, scale, RULE: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if RULE == 0:
        b1 = tl.where(kh, -1e9, 0.0)
        b2 = tl.where(kh & allh, 1e9, 0.0)
        s = (s + b1[None, :]) + b2[None, :]
    else:
        s = s + tl.where(qh[:, None] | kh[None, :], 1.0, 0.0)
    return tl.where(nmask[None, :], s, float("-inf"))


def _fwd_kernel(
    Q, K, V, KH, ALLH, Out, Lse, H, L, scale,
    RULE: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    base = bh.to(tl.int64) * L * HD
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < L
    dmask = offs_d < HD
    q = tl.load(Q + base + offs_m[:, None] * HD + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    qh = tl.load(KH + b * L + offs_m, mask=mmask, other=0) != 0
    allh = tl.load(ALLH + b) != 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        kv_off = base + offs_n[:, None] * HD + offs_d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + kv_off, mask=kvmask, other=0.0)
        v = tl.load(V + kv_off, mask=kvmask, other=0.0)
        kh = tl.load(KH + b * L + offs_n, mask=nmask, other=0) != 0
        s = _logits(q, k, qh, kh, allh, nmask, scale, RULE, PREC)
        # every key block holds at least one real key (start_n < L), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * HD + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, m_i + tl.log(l_i), mask=mmask)


def _bwd_dkdv_kernel(
    Q, K, V, KH, ALLH, DO, Lse, Delta, DK, DV, H, L, scale,
    RULE: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    base = bh.to(tl.int64) * L * HD
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < L
    dmask = offs_d < HD
    kv_off = base + offs_n[:, None] * HD + offs_d[None, :]
    kvmask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + kv_off, mask=kvmask, other=0.0)
    v = tl.load(V + kv_off, mask=kvmask, other=0.0)
    kh = tl.load(KH + b * L + offs_n, mask=nmask, other=0) != 0
    allh = tl.load(ALLH + b) != 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < L
        qo_off = base + offs_m[:, None] * HD + offs_d[None, :]
        qomask = mmask[:, None] & dmask[None, :]
        q = tl.load(Q + qo_off, mask=qomask, other=0.0)
        do = tl.load(DO + qo_off, mask=qomask, other=0.0)
        qh = tl.load(KH + b * L + offs_m, mask=mmask, other=0) != 0
        lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=mmask, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=mmask, other=0.0)
        s = _logits(q, k, qh, kh, allh, nmask, scale, RULE, PREC)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mmask[:, None] & nmask[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kvmask)


def _bwd_dq_kernel(
    Q, K, V, KH, ALLH, DO, Lse, Delta, DQ, H, L, scale,
    RULE: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    base = bh.to(tl.int64) * L * HD
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < L
    dmask = offs_d < HD
    qo_off = base + offs_m[:, None] * HD + offs_d[None, :]
    qomask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + qo_off, mask=qomask, other=0.0)
    do = tl.load(DO + qo_off, mask=qomask, other=0.0)
    qh = tl.load(KH + b * L + offs_m, mask=mmask, other=0) != 0
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=mmask, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=mmask, other=0.0)
    allh = tl.load(ALLH + b) != 0

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        kv_off = base + offs_n[:, None] * HD + offs_d[None, :]
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + kv_off, mask=kvmask, other=0.0)
        v = tl.load(V + kv_off, mask=kvmask, other=0.0)
        kh = tl.load(KH + b * L + offs_n, mask=nmask, other=0) != 0
        s = _logits(q, k, qh, kh, allh, nmask, scale, RULE, PREC)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mmask[:, None] & nmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + qo_off, dq.to(DQ.dtype.element_ty), mask=qomask)


def _bwd_delta_kernel(O, DO, Delta, n_rows, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (offs_d < HD)[None, :]
    offs = rows.to(tl.int64)[:, None] * HD + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, 1), mask=rmask)


_cache: dict[bool, tuple] = {}
_FP32_STAGES = 1


def _kernels():
    from astromer_fast.kernels.backends import triton_interpret_enabled

    interp = triton_interpret_enabled()
    ks = _cache.get(interp)
    if ks is None:
        ks = _cache[interp] = jit_kernels(
            (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_delta_kernel), (_logits,))
    return ks


def _meta(q: torch.Tensor, L: int):
    from astromer_fast.kernels.backends import triton_interpret_enabled

    hd = q.shape[-1]
    block_d = triton.next_power_of_2(max(hd, 16))
    launch = dict(num_warps=4)
    if triton_interpret_enabled():
        bm = bn = 16
        launch["num_warps"] = 1
    else:
        bm, bn = 64, 64
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if q.dtype == torch.float32:
        # fp32 dots run on FMA units, so the cp.async software pipeline buys little, and with it
        # (Triton 3.6's default of 3 stages) the fp32 kernels stalled on a GPU (bench/RESULTS.md),
        # cause unknown. One stage is the suspect-free variant; `tools/
        # triton_attention_probe.py` tries each variant on a GPU to settle it.
        launch["num_stages"] = _FP32_STAGES
    return dict(HD=hd, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec), launch


def _all_hidden(kh: torch.Tensor) -> torch.Tensor:
    return (kh != 0).all(-1).to(torch.uint8).contiguous()


def forward(q, k, v, kh, rule: int, scale: float, out, lse) -> None:
    """Fill out (B, H, L, hd) and lse (B, H, L) fp32 from contiguous q, k, v and uint8 kh (B, L)."""
    fwd = _kernels()[0]
    B, H, L, _ = q.shape
    meta, launch = _meta(q, L)
    # (b, h) on grid axis 0: axis 1 is limited to 65535, and B * H reaches 8192 * 4 and more.
    grid = (B * H, triton.cdiv(L, meta["BLOCK_M"]))
    fwd[grid](q, k, v, kh, _all_hidden(kh), out, lse, H, L, float(scale), RULE=rule,
              **launch, **meta)


def backward(do, q, k, v, out, lse, kh, rule: int, scale: float, dq, dk, dv) -> None:
    _, dkdv, dqk, delta_k = _kernels()
    B, H, L, hd = q.shape
    meta, launch = _meta(q, L)
    # rowsum(dO * O) in one pass: in PyTorch it would materialise two fp32 copies of (B, H, L, hd).
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    n_rows = B * H * L
    block_r = 16 if meta["BLOCK_M"] <= 16 else 64
    delta_k[(triton.cdiv(n_rows, block_r),)](out, do, delta, n_rows, HD=hd,
                                             BLOCK_D=meta["BLOCK_D"], BLOCK_R=block_r,
                                             num_warps=launch["num_warps"])
    allh = _all_hidden(kh)
    dkdv[(B * H, triton.cdiv(L, meta["BLOCK_N"]))](
        q, k, v, kh, allh, do, lse, delta, dk, dv, H, L, float(scale), RULE=rule,
        **launch, **meta)
    dqk[(B * H, triton.cdiv(L, meta["BLOCK_M"]))](
        q, k, v, kh, allh, do, lse, delta, dq, H, L, float(scale), RULE=rule,
        **launch, **meta)


__all__ = ["backward", "forward"]
