"""Triton GEMMs whose epilogues do the fused GPU block's element-wise work while the tile is still
in registers (``astromer_fast.model.fused_gpu`` with ``gemm="triton"``).

With cuBLAS, each of the block's GEMMs writes its bf16 result and a second pass reads it back for
the bias, tanh, residual and LayerNorm. The GEMMs here have K = d_model or dff (256 or 512 in
Astromer 2), so that extra round trip through memory is of the same order as the GEMM itself.

* ``gemm_bias_tanh``: C = A @ W with C[:, :n] = tanh(C[:, :n] + b) (the first feed-forward layer,
  its leak columns left as they are).
* ``gemm_residual_layernorm``: OUT = LN(A @ W + b + R + rb) * g + beta, one program owning whole
  rows (BLOCK_N >= D), so the row statistics are taken from the float32 accumulator: the GEMM's
  result is never rounded to bf16 before the LayerNorm (the cuBLAS path rounds it once).
* ``mlp_residual_layernorm``: the whole feed-forward half of the block in one kernel,
  OUT = LN(tanh(A W1 + b1) W2 + b2 + A Wleak + bleak) * g + beta: the hidden layer is produced
  and consumed a column slice at a time in registers, never written (``gemm="triton_mlp"``).
* ``attention_out_layernorm``: the attention half of the block in one kernel,
  OUT = LN(attention(Y) Wo + bo + R) * g + beta: per head, the flash-style loop of
  ``_triton_fused_block`` (same masks, same skipping), its output multiplied into the output
  projection's accumulator at once; O never reaches memory (``gemm="triton_block"``).
* ``window_means``: the per-window mean of a (B * L, D) activation over the valid rows, float32
  sums, one program per window (deterministic: no atomics).

A (M, K) and R may be column slices of wider buffers (row strides are arguments); W is (K, N)
row-major, as ``fused_gpu._Block`` stores the transposed weights. Accumulation is float32; bf16
inputs use tensor cores, float32 inputs IEEE dots (the interpreter tests).

Tile shapes: each GEMM times a few candidate tilings on its first eager call per (shape of W,
dtype, device) and keeps the fastest for the process (never while a CUDA graph is being captured:
then the first candidate runs). ``$ASTROMER_FAST_TRITON_GEMM_TUNE=0`` always takes the first.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from astromer_fast.kernels._triton_fused_block import HELPERS, _flash_head, _layernorm, _tanh
from astromer_fast.kernels._triton_jit import jit_kernels

TUNE_ENV = "ASTROMER_FAST_TRITON_GEMM_TUNE"
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is taken without tuning.
BIAS_TANH_TILES = ((128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 3),
                   (128, 256, 64, 8, 3))
# BLOCK_N is the whole row (the next power of two >= D): (BLOCK_M, BLOCK_K, num_warps, num_stages).
RESIDUAL_LN_TILES = ((64, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (128, 64, 8, 2))
# (BLOCK_M, BLOCK_F, BLOCK_K, num_warps, num_stages) of the fused feed-forward layers.
MLP_TILES = ((64, 64, 64, 8, 2), (64, 128, 64, 8, 2), (32, 64, 64, 4, 3), (128, 64, 64, 8, 2))
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention + output projection kernel.
ATTENTION_OUT_TILES = ((64, 64, 8, 1), (64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1))


def _tile_matmul(acc, A, lda, W, ldw, rows, cols, rmask, cmask, K,
                 EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc + A[rows, :K] @ W[:K, cols], K in BLOCK_K steps (``EVEN_K``: K is a multiple)."""
    ks = tl.arange(0, BLOCK_K)
    a_ptr = A + rows.to(tl.int64)[:, None] * lda + ks[None, :]
    w_ptr = W + ks[:, None] * ldw + cols[None, :]
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr, mask=rmask[:, None], other=0.0)
            w = tl.load(w_ptr, mask=cmask[None, :], other=0.0)
        else:
            kmask = (k0 + ks) < K
            a = tl.load(a_ptr, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K * ldw
    return acc


def _gemm_bias_tanh(
    A, lda, W, ldw, C, ldc, BIAS, M, N, K, n_tanh,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    acc = _tile_matmul(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), A, lda, W, ldw, rows, cols,
                       rmask, cmask, K, EVEN_K, BLOCK_K, PREC)
    tmask = cols < n_tanh
    y = _tanh(acc + tl.load(BIAS + cols, mask=tmask, other=0.0)[None, :])
    out = tl.where(tmask[None, :], y, acc)
    c_ptr = C + rows.to(tl.int64)[:, None] * ldc + cols[None, :]
    tl.store(c_ptr, out.to(C.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _residual_ln_store(z, rows, cols, rmask, cmask, BZ, R, ldr, RB, G, BETA, OUT, ldo, D, eps,
                       HAS_RES: tl.constexpr, HAS_RBIAS: tl.constexpr):
    """OUT[rows] = LN(z + BZ (+ RB) (+ R[rows])) * G + BETA: the epilogue of the three kernels
    that end a half of the block."""
    mask = rmask[:, None] & cmask[None, :]
    bias = tl.load(BZ + cols, mask=cmask, other=0.0)
    if HAS_RBIAS:
        bias += tl.load(RB + cols, mask=cmask, other=0.0)
    z = z + bias[None, :]
    if HAS_RES:
        r_ptr = R + rows.to(tl.int64)[:, None] * ldr + cols[None, :]
        z += tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)
    y = _layernorm(z, cmask, tl.load(G + cols, mask=cmask, other=0.0),
                   tl.load(BETA + cols, mask=cmask, other=0.0), D, eps)
    o_ptr = OUT + rows.to(tl.int64)[:, None] * ldo + cols[None, :]
    tl.store(o_ptr, y.to(OUT.dtype.element_ty), mask=mask)


def _gemm_residual_ln(
    A, lda, W, ldw, BZ, R, ldr, RB, G, BETA, OUT, ldo, M, D, K, eps,
    HAS_RES: tl.constexpr, HAS_RBIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < D
    acc = _tile_matmul(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), A, lda, W, ldw, rows, cols,
                       rmask, cmask, K, EVEN_K, BLOCK_K, PREC)
    _residual_ln_store(acc, rows, cols, rmask, cmask, BZ, R, ldr, RB, G, BETA, OUT, ldo, D, eps,
                       HAS_RES, HAS_RBIAS)


def _mlp_residual_ln(
    A, lda, W1, ldw1, B1, W2, ldw2, WL, ldwl, B2, BL, G, BETA, OUT, ldo, M, D, F, eps,
    HAS_LEAK: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    fs = tl.arange(0, BLOCK_F)
    rmask = rows < M
    cmask = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The hidden layer in BLOCK_F-column slices: each slice goes through bias + tanh in registers
    # and straight into the second layer's accumulator, so U never reaches memory.
    for f0 in range(0, F, BLOCK_F):
        fmask = (f0 + fs) < F
        u = _tile_matmul(tl.zeros([BLOCK_M, BLOCK_F], tl.float32), A, lda, W1, ldw1, rows,
                         f0 + fs, rmask, fmask, D, EVEN_K, BLOCK_K, PREC)
        h = _tanh(u + tl.load(B1 + f0 + fs, mask=fmask, other=0.0)[None, :])
        h = tl.where(fmask[None, :], h, 0.0)
        w2 = tl.load(W2 + (f0 + fs)[:, None] * ldw2 + cols[None, :],
                     mask=fmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(h.to(w2.dtype), w2, acc, input_precision=PREC)
    if HAS_LEAK:
        acc = _tile_matmul(acc, A, lda, WL, ldwl, rows, cols, rmask, cmask, D, EVEN_K, BLOCK_K,
                           PREC)
    _residual_ln_store(acc, rows, cols, rmask, cmask, B2, A, 0, BL, G, BETA, OUT, ldo, D, eps,
                       False, HAS_LEAK)


def _attention_out_ln(
    Y, ldy, KH, ALLH, WO, ldwo, BO, R, ldr, G, BETA, OUT, ldo, H, L, D, scale, eps,
    RULE: tl.constexpr, SKIP: tl.constexpr, HAS_RES: tl.constexpr, HD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    # Each head's output is the head's slice of the output projection's K dimension, so it goes
    # into Z as soon as the head is done.
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * L
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HD)
    cols = tl.arange(0, BLOCK_D)
    mmask = offs_m < L
    cmask = cols < D
    qh = tl.load(KH + row0 + offs_m, mask=mmask, other=1) != 0
    allh = tl.load(ALLH + b) != 0
    z = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for h in range(0, H):
        q = tl.load(Y + (row0 + offs_m)[:, None] * ldy + (h * HD + offs_d)[None, :],
                    mask=mmask[:, None], other=0.0)
        o = _flash_head(Y, ldy, KH, row0, q, qh, allh, L, D + h * HD, 2 * D + h * HD, scale,
                        RULE, SKIP, HD, BLOCK_M, BLOCK_N, PREC)
        wo = tl.load(WO + (h * HD + offs_d)[:, None] * ldwo + cols[None, :],
                     mask=cmask[None, :], other=0.0)
        z = tl.dot(o.to(wo.dtype), wo, z, input_precision=PREC)
    _residual_ln_store(z, row0 + offs_m, cols, mmask, cmask, BO, R, ldr, BO, G, BETA, OUT, ldo, D,
                       eps, HAS_RES, False)


def _window_means(X, ldx, VALID, POOL, ldp, L, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * L
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    total = tl.zeros([BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_R], tl.float32)
    for r0 in range(0, L, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < L
        ok = (tl.load(VALID + row0 + rows, mask=rmask, other=0) != 0) & rmask
        x = tl.load(X + (row0 + rows)[:, None] * ldx + cols[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        total += tl.sum(x, 0)
        count += ok.to(tl.float32)
    n = tl.maximum(tl.sum(count, 0), 1.0)
    tl.store(POOL + b.to(tl.int64) * ldp + cols, total / n, mask=cmask)


_cache: dict[bool, tuple] = {}


def _interpreting() -> bool:
    from astromer_fast.kernels.backends import triton_interpret_enabled

    return triton_interpret_enabled()


def _kernels():
    interp = _interpreting()
    ks = _cache.get(interp)
    if ks is None:
        ks = _cache[interp] = jit_kernels(
            (_gemm_bias_tanh, _gemm_residual_ln, _window_means, _mlp_residual_ln,
             _attention_out_ln), HELPERS + (_tile_matmul, _residual_ln_store))
    return ks


def _check(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, n_out: int) -> tuple[int, int]:
    if a.dim() != 2 or w.dim() != 2 or out.dim() != 2:
        raise ValueError("the fused GEMMs take 2-D operands")
    M, K = a.shape
    if w.shape != (K, n_out) or out.shape[0] != M or out.shape[1] < n_out:
        raise ValueError(f"shapes do not chain: A {tuple(a.shape)}, W {tuple(w.shape)}, "
                         f"out {tuple(out.shape)}")
    if a.stride(1) != 1 or w.stride(1) != 1 or out.stride(1) != 1 or w.stride(0) != n_out:
        raise ValueError("the fused GEMMs need rows with contiguous columns and a row-major W")
    if not (a.dtype == w.dtype == out.dtype):
        raise ValueError(f"A, W and out must share a dtype, got {a.dtype}, {w.dtype}, {out.dtype}")
    return M, K


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # bf16 dots ignore it


_tuned: dict[tuple, tuple] = {}


def _tile(kind: str, tiles: tuple, key: tuple, launch, device: torch.device) -> tuple:
    """The tiling for ``key``: the one timed fastest (``launch(tile)`` runs the kernel once)."""
    full = (kind, *key, str(device))
    if full in _tuned:
        return _tuned[full]
    if (os.environ.get(TUNE_ENV, "1").strip() == "0" or device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()):
        return tiles[0]
    best, best_ms = tiles[0], float("inf")
    for tile in tiles:
        try:
            launch(tile)  # compiles
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                launch(tile)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        except Exception:  # noqa: BLE001 - a tiling this GPU cannot run (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = tile, ms
    _tuned[full] = best
    return best


def gemm_bias_tanh(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, n_tanh: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """out = a @ w, then out[:, :n_tanh] = tanh(out[:, :n_tanh] + bias) before rounding to
    out's dtype; ``bias`` float32 (n_tanh,). Returns ``out`` (a new (M, N) tensor if None)."""
    N = w.shape[1]
    if out is None:
        out = torch.empty(a.shape[0], N, dtype=a.dtype, device=a.device)
    M, K = _check(a, w, out, N)
    if not 0 <= n_tanh <= N or bias.numel() < n_tanh:
        raise ValueError(f"n_tanh ({n_tanh}) must be within the {N} columns and the bias")
    if M == 0:
        return out
    kernel = _kernels()[0]

    def launch(tile):
        bm, bn, bk, warps, stages = tile
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        extra = dict(num_warps=warps) if _interpreting() else \
            dict(num_warps=warps, num_stages=stages)
        kernel[grid](a, a.stride(0), w, w.stride(0), out, out.stride(0), bias, M, N, K, n_tanh,
                     EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     PREC=_precision(a.dtype), **extra)

    if _interpreting():
        launch((16, 16, 16, 1, 1))
    else:
        launch(_tile("bias_tanh", BIAS_TANH_TILES, (K, N, a.dtype), launch, a.device))
    return out


def gemm_residual_layernorm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, res, res_bias,
                            gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                            out: torch.Tensor) -> torch.Tensor:
    """out = LN(a @ w + bias + res + res_bias) * gamma + beta per row, the LayerNorm taken from
    the float32 accumulator (``res`` and ``res_bias`` may be None); bias/LN parameters float32."""
    D = w.shape[1]
    M, K = _check(a, w, out, D)
    if res is not None and (res.shape[0] != M or res.shape[1] < D or res.stride(1) != 1):
        raise ValueError(f"the residual must be ({M}, >= {D}) with contiguous columns")
    if M == 0:
        return out
    kernel = _kernels()[1]
    block_n = max(16, triton.next_power_of_2(D))

    def launch(tile):
        bm, bk, warps, stages = tile
        extra = dict(num_warps=warps) if _interpreting() else \
            dict(num_warps=warps, num_stages=stages)
        kernel[(triton.cdiv(M, bm),)](
            a, a.stride(0), w, w.stride(0), bias, res if res is not None else a,
            res.stride(0) if res is not None else 0, res_bias if res_bias is not None else bias,
            gamma, beta, out, out.stride(0), M, D, K, float(eps),
            HAS_RES=res is not None, HAS_RBIAS=res_bias is not None, EVEN_K=K % bk == 0,
            BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=bk, PREC=_precision(a.dtype), **extra)

    if _interpreting():
        launch((16, 16, 1, 1))
    else:
        # A whole row per program: wide rows take the tilings with fewer rows.
        tiles = RESIDUAL_LN_TILES if block_n <= 256 else \
            tuple(t for t in RESIDUAL_LN_TILES if t[0] <= 32)
        key = (K, D, a.dtype, res is not None, res_bias is not None)
        launch(_tile("residual_ln", tiles, key, launch, a.device))
    return out


def mlp_residual_layernorm(a: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                           w2: torch.Tensor, b2: torch.Tensor, w_leak, b_leak,
                           gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                           out: torch.Tensor) -> torch.Tensor:
    """out = LN(tanh(a @ w1 + b1) @ w2 + b2 + a @ w_leak + b_leak) * gamma + beta per row in one
    kernel (the block's feed-forward half; ``w_leak``/``b_leak`` None without the skip path).
    ``w1`` (D, F) and ``w_leak`` (D, D) may be column slices of one row-major buffer; ``w2``
    (F, D) row-major; the hidden layer is rounded to the operands' dtype before ``w2``, as the
    two-GEMM form stores it."""
    M, D = a.shape
    F = w1.shape[1]
    if w1.shape[0] != D or w2.shape != (F, D) or out.shape != (M, D):
        raise ValueError(f"shapes do not chain: A {tuple(a.shape)}, W1 {tuple(w1.shape)}, "
                         f"W2 {tuple(w2.shape)}, out {tuple(out.shape)}")
    if w_leak is not None and w_leak.shape != (D, D):
        raise ValueError(f"the skip weight must be ({D}, {D}), got {tuple(w_leak.shape)}")
    mats = [a, w1, w2, out] + ([w_leak] if w_leak is not None else [])
    if any(x.stride(1) != 1 for x in mats):
        raise ValueError("the fused feed-forward layers need rows with contiguous columns")
    if len({x.dtype for x in mats}) != 1:
        raise ValueError("A, the weights and out must share a dtype")
    if M == 0:
        return out
    kernel = _kernels()[3]
    block_n = max(16, triton.next_power_of_2(D))
    leak = w_leak is not None

    def launch(tile):
        bm, bf, bk, warps, stages = tile
        extra = dict(num_warps=warps) if _interpreting() else \
            dict(num_warps=warps, num_stages=stages)
        kernel[(triton.cdiv(M, bm),)](
            a, a.stride(0), w1, w1.stride(0), b1, w2, w2.stride(0),
            w_leak if leak else w1, w_leak.stride(0) if leak else 0, b2,
            b_leak if leak else b2, gamma, beta, out, out.stride(0), M, D, F, float(eps),
            HAS_LEAK=leak, EVEN_K=D % bk == 0, BLOCK_M=bm, BLOCK_N=block_n,
            BLOCK_F=bf, BLOCK_K=bk, PREC=_precision(a.dtype), **extra)

    if _interpreting():
        launch((16, 16, 16, 1, 1))
    else:
        tiles = MLP_TILES if block_n <= 256 else tuple(t for t in MLP_TILES if t[0] <= 32)
        launch(_tile("mlp", tiles, (D, F, a.dtype, leak), launch, a.device))
    return out


def attention_out_layernorm(y: torch.Tensor, kh: torch.Tensor, all_hidden: torch.Tensor,
                            w_o: torch.Tensor, b_o: torch.Tensor, res, gamma: torch.Tensor,
                            beta: torch.Tensor, eps: float, out: torch.Tensor, B: int, L: int,
                            H: int, rule: int, scale: float, skip: bool = True) -> torch.Tensor:
    """out = LN(attention(q, k, v) @ w_o + b_o + res) * gamma + beta: the attention half of the
    block in one kernel. q, k, v are the columns [0, D), [D, 2D), [2D, 3D) of Y (B * L rows,
    window after window), masked as ``_triton_fused_block.attention`` does (``kh`` (B, L) and
    ``all_hidden`` (B,) uint8, ``rule`` 0 = key, 1 = query_or_key_plus1; ``skip`` leaves out
    fully hidden key blocks under the key rule); ``w_o`` (D, D) row-major; ``res`` may be None."""
    D = out.shape[1]
    hd = D // H
    if hd * H != D or hd % 16 or hd > 256 or hd & (hd - 1):
        raise ValueError(f"the fused attention needs a power-of-two head size 16..256, got "
                         f"{D} / {H}")
    if y.shape[0] != B * L or y.shape[1] < 3 * D or out.shape[0] != B * L or \
            w_o.shape != (D, D):
        raise ValueError(f"shapes do not chain: Y {tuple(y.shape)}, W_o {tuple(w_o.shape)}, "
                         f"out {tuple(out.shape)} for {B} windows of {L}")
    mats = [y, w_o, out] + ([res] if res is not None else [])
    if any(x.stride(1) != 1 for x in mats):
        raise ValueError("the fused attention needs rows with contiguous columns")
    if B * L == 0:
        return out
    kernel = _kernels()[4]
    block_d = max(16, triton.next_power_of_2(D))

    def launch(tile):
        bm, bn, warps, stages = tile
        extra = dict(num_warps=warps) if _interpreting() else \
            dict(num_warps=warps, num_stages=stages)
        kernel[(B, triton.cdiv(L, bm))](
            y, y.stride(0), kh, all_hidden, w_o, w_o.stride(0), b_o,
            res if res is not None else y, res.stride(0) if res is not None else 0,
            gamma, beta, out, out.stride(0), H, L, D, float(scale), float(eps),
            RULE=rule, SKIP=bool(skip and rule == 0), HAS_RES=res is not None, HD=hd,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=_precision(y.dtype), **extra)

    if _interpreting():
        launch((16, 16, 1, 1))
    else:
        tiles = ATTENTION_OUT_TILES if block_d <= 256 else \
            tuple(t for t in ATTENTION_OUT_TILES if t[0] <= 32) or ((32, 32, 4, 1),)
        launch(_tile("attention_out", tiles, (D, H, y.dtype, rule, res is not None), launch,
                     y.device))
    return out


def window_means(x: torch.Tensor, valid: torch.Tensor, pooled: torch.Tensor, B: int,
                 L: int) -> None:
    """pooled[b] = mean of x's rows b * L .. b * L + L - 1 where ``valid`` (B, L) uint8 is set,
    in float32 (zeros for a window without valid rows); ``pooled`` (B, D), row stride free."""
    D = x.shape[1]
    if B * L == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_r = 4 if _interpreting() else max(1, min(32, 8192 // block_d))
    _kernels()[2][(B,)](x, x.stride(0), valid, pooled, pooled.stride(0), L, D,
                        BLOCK_R=block_r, BLOCK_D=block_d,
                        num_warps=1 if _interpreting() else 4)


__all__ = ["ATTENTION_OUT_TILES", "BIAS_TANH_TILES", "MLP_TILES", "RESIDUAL_LN_TILES",
           "TUNE_ENV", "attention_out_layernorm", "gemm_bias_tanh", "gemm_residual_layernorm",
           "mlp_residual_layernorm", "window_means"]
