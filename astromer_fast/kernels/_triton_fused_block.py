"""Triton kernels of the fused GPU encoder block (``astromer_fast.model.fused_gpu``).

* ``attention``: flash-style masked attention forward that reads q, k and v straight out of the
  fused projection Y (N, >= 3D) by strides and writes the heads side by side into O (N, D), so the
  block needs no head transposes. Both mask rules of ``masked_attention.py``, with its float32
  rounding of the mask terms (all-hidden windows attend uniformly, never NaN). Under the ``key``
  rule a key block whose keys are all hidden is skipped when its window has a valid key: there
  each hidden logit is at least 1e9 below the row maximum, so its weight is exactly zero in
  float32. bf16 (tensor-core dots, float32 accumulation) or float32 (IEEE dots).
* ``bias_tanh``: U[:, :n] = tanh(U[:, :n] + b), in place (the first feed-forward layer).
* ``residual_layernorm``: OUT = LN(Z + b + R + rb) * g + beta per row, statistics in float32, and
  optionally the window means of the float32 result over the valid rows (the pooling), one program
  per window, so the sums are deterministic.

Kernels are jitted lazily (``TRITON_INTERPRET`` is read when ``triton.jit`` runs) and cached per
mode, as in ``_triton_masked_attention``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from astromer_fast.kernels._triton_jit import jit_kernels
from astromer_fast.kernels._triton_masked_attention import _logits

STAGES_ENV = "ASTROMER_FAST_TRITON_STAGES"


def _flash_head(
    Y, ldy, KH, row0, q, qh, allh, L, k_col, v_col, scale,
    RULE: tl.constexpr, SKIP: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One head's attention output (BLOCK_M, HD) float32 for the queries ``q`` of the window
    whose rows start at ``row0``: keys and values are the columns from ``k_col`` and ``v_col``."""
    offs_d = tl.arange(0, HD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < L
        kh = tl.load(KH + row0 + offs_n, mask=nmask, other=1) != 0
        visit = True
        if SKIP:
            n_open = tl.sum((nmask & (kh == 0)).to(tl.int32), 0)
            visit = (n_open > 0) | allh
        if visit:
            rows = (row0 + offs_n)[:, None] * ldy
            k = tl.load(Y + rows + (k_col + offs_d)[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(Y + rows + (v_col + offs_d)[None, :], mask=nmask[:, None], other=0.0)
            s = _logits(q, k, qh, kh, allh, nmask, scale, RULE, PREC)
            # Every visited block holds a real key (start_n < L), so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    return acc / l_i[:, None]


def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1: no overflow for any x.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


def _layernorm(z, cmask, g, beta, D, eps):
    """LayerNorm of the rows of ``z`` over its first D columns (``cmask``), times ``g`` plus
    ``beta``, in float32."""
    mean = tl.sum(tl.where(cmask[None, :], z, 0.0), 1) / D
    zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, 1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return zc * rstd[:, None] * g[None, :] + beta[None, :]


def _flash_fwd(
    Y, ldy, KH, ALLH, O, ldo, H, L, D, scale,
    RULE: tl.constexpr, SKIP: tl.constexpr, HD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = b.to(tl.int64) * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    mmask = offs_m < L
    q_ptr = Y + (row0 + offs_m)[:, None] * ldy + (h * HD + offs_d)[None, :]
    q = tl.load(q_ptr, mask=mmask[:, None], other=0.0)
    qh = tl.load(KH + row0 + offs_m, mask=mmask, other=1) != 0
    allh = tl.load(ALLH + b) != 0
    out = _flash_head(Y, ldy, KH, row0, q, qh, allh, L, D + h * HD, 2 * D + h * HD, scale,
                      RULE, SKIP, HD, BLOCK_M, BLOCK_N, PREC)
    o_ptr = O + (row0 + offs_m)[:, None] * ldo + (h * HD + offs_d)[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=mmask[:, None])


def _bias_tanh(U, ldu, BIAS, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    ptr = U + rows.to(tl.int64)[:, None] * ldu + cols[None, :]
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x = x + tl.load(BIAS + cols, mask=cols < n_cols, other=0.0)[None, :]
    tl.store(ptr, _tanh(x).to(U.dtype.element_ty), mask=mask)


def _residual_ln(
    Z, ldz, BZ, R, ldr, RB, G, BETA, OUT, ldo, VALID, POOL, ldp, L, D, eps,
    HAS_RES: tl.constexpr, HAS_RBIAS: tl.constexpr, DO_POOL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * L
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    bias = tl.load(BZ + cols, mask=cmask, other=0.0)
    if HAS_RBIAS:
        bias += tl.load(RB + cols, mask=cmask, other=0.0)
    g = tl.load(G + cols, mask=cmask, other=0.0)
    beta = tl.load(BETA + cols, mask=cmask, other=0.0)
    total = tl.zeros([BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_R], tl.float32)
    for r0 in range(0, L, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < L
        mask = rmask[:, None] & cmask[None, :]
        grow = (row0 + rows)[:, None]
        z = tl.load(Z + grow * ldz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            z += tl.load(R + grow * ldr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z += bias[None, :]
        y = _layernorm(z, cmask, g, beta, D, eps)
        tl.store(OUT + grow * ldo + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)
        if DO_POOL:
            ok = (tl.load(VALID + row0 + rows, mask=rmask, other=0) != 0) & rmask
            total += tl.sum(tl.where(ok[:, None] & mask, y, 0.0), 0)
            count += ok.to(tl.float32)
    if DO_POOL:
        n = tl.maximum(tl.sum(count, 0), 1.0)
        tl.store(POOL + b.to(tl.int64) * ldp + cols, total / n, mask=cmask)


# The device functions these kernels (and _triton_fused_gemm's) call, callees first.
HELPERS = (_logits, _flash_head, _tanh, _layernorm)
_cache: dict[bool, tuple] = {}


def _kernels():
    from astromer_fast.kernels.backends import triton_interpret_enabled

    interp = triton_interpret_enabled()
    ks = _cache.get(interp)
    if ks is None:
        ks = _cache[interp] = jit_kernels((_flash_fwd, _bias_tanh, _residual_ln), HELPERS)
    return ks


def _interpreting() -> bool:
    from astromer_fast.kernels.backends import triton_interpret_enabled

    return triton_interpret_enabled()


def attention_stages(stages: int | None = None) -> int:
    """Software-pipeline stages of the attention kernel: ``stages``, else
    ``$ASTROMER_FAST_TRITON_STAGES``, else 1 (Triton's default of 3 stalled the fp32 kernels on a
    GPU, bench/RESULTS.md; 1 and 2 are what calibration compares)."""
    if stages is None:
        env = os.environ.get(STAGES_ENV, "").strip()
        stages = int(env) if env else 1
    if stages not in (1, 2, 3, 4):
        raise ValueError(f"Triton pipeline stages must be 1 to 4, got {stages}")
    return stages


def attention(y: torch.Tensor, kh: torch.Tensor, all_hidden: torch.Tensor, out: torch.Tensor,
              B: int, L: int, H: int, rule: int, scale: float, skip: bool = True,
              stages: int | None = None) -> None:
    """O (N, D) <- masked attention of the q, k, v columns [0, D), [D, 2D), [2D, 3D) of Y (N, ldy)
    with N = B * L rows, window after window. ``kh`` (B, L) uint8 hidden flags, ``all_hidden``
    (B,) uint8. ``skip``: skip fully hidden key blocks (``key`` rule only)."""
    D = out.shape[1]
    hd = D // H
    if hd % 16 or hd > 256 or hd & (hd - 1):
        raise ValueError(f"Triton attention needs a power-of-two head size 16..256, got {hd}")
    if y.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("Triton attention needs rows with contiguous columns")
    if B * L == 0:
        return
    fwd = _kernels()[0]
    if _interpreting():
        bm = bn = 16
        launch = dict(num_warps=1)
    else:
        bm, bn = 64, 64
        launch = dict(num_warps=4, num_stages=attention_stages(stages))
    prec = "ieee" if y.dtype == torch.float32 else "tf32"  # bf16 dots ignore it
    grid = (B * H, triton.cdiv(L, bm))
    fwd[grid](y, y.stride(0), kh, all_hidden, out, out.stride(0), H, L, D, float(scale),
              RULE=rule, SKIP=bool(skip and rule == 0), HD=hd, BLOCK_M=bm, BLOCK_N=bn,
              PREC=prec, **launch)


def bias_tanh(u: torch.Tensor, bias: torch.Tensor, n_cols: int) -> None:
    """u[:, :n_cols] = tanh(u[:, :n_cols] + bias), in place; ``bias`` float32 (n_cols,)."""
    n_rows = u.shape[0]
    if n_rows == 0:
        return
    k = _kernels()[1]
    br, bc = (16, 64) if _interpreting() else (32, 128)
    k[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))](
        u, u.stride(0), bias, n_rows, n_cols, BLOCK_R=br, BLOCK_C=bc,
        num_warps=1 if _interpreting() else 4)


def residual_layernorm(z, bias, res, res_bias, gamma, beta, eps: float, out, B: int, L: int,
                       valid=None, pooled=None) -> None:
    """out = LN(z + bias + res + res_bias) * gamma + beta over rows of D columns (``res`` and
    ``res_bias`` may be None); with ``pooled`` (B, D) float32 (row stride free) and ``valid``
    (B, L) uint8, also the per-window means of the float32 result over valid rows."""
    D = out.shape[1]
    if B * L == 0:
        return
    k = _kernels()[2]
    block_d = triton.next_power_of_2(D)
    block_r = 4 if _interpreting() else max(1, min(16, 8192 // block_d))
    pool = pooled is not None
    k[(B,)](z, z.stride(0), bias, res if res is not None else z,
            res.stride(0) if res is not None else 0, res_bias if res_bias is not None else bias,
            gamma, beta, out, out.stride(0), valid if pool else gamma,
            pooled if pool else gamma, pooled.stride(0) if pool else 0, L, D, float(eps),
            HAS_RES=res is not None, HAS_RBIAS=res_bias is not None, DO_POOL=pool,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=1 if _interpreting() else 4)


__all__ = ["attention", "attention_stages", "bias_tanh", "residual_layernorm"]
