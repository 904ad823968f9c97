"""Triton forward kernel of the fused input embedding (backend ``triton``).

Imported only when that backend is used, so that ``import astromer_fast`` never pays for (or fails
on) ``import triton``. The kernel is decorated lazily: ``triton.jit`` decides at decoration time
whether it compiles for the GPU or runs in the interpreter (``TRITON_INTERPRET=1``), and both can be
wanted in one process (tests toggle the variable).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

# Triton turns Python float literals into fp32 constants, so pi/2 is given as three fp32-exact
# pieces (Cody-Waite): q * piece is exact in fp64 for |q| < 2^29, and the sum of the pieces equals
# pi/2 to ~1e-23. A literal double pi/2 would silently be rounded to fp32 (error 4e-8, times q).
_PIO2_A = tl.constexpr(1.5707963705062866)
_PIO2_B = tl.constexpr(-4.371138828673793e-08)
_PIO2_C = tl.constexpr(-1.7151245100058819e-15)
# Only used to pick the nearest quadrant: an fp32 error here at worst leaves |r| a hair above pi/4.
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
# Cephes sinf/cosf minimax coefficients for [-pi/4, pi/4] (same as the CUDA kernel).
_S1 = tl.constexpr(-1.9515295891e-4)
_S2 = tl.constexpr(8.3321608736e-3)
_S3 = tl.constexpr(-1.6666654611e-1)
_C1 = tl.constexpr(2.443315711809948e-5)
_C2 = tl.constexpr(-1.388731625493765e-3)
_C3 = tl.constexpr(4.166664568298827e-2)


def _input_embedding_fwd(
    t_ptr, m_ptr, hidden_ptr, w_ptr, b_ptr, token_ptr, omega_ptr, out_ptr,
    rows, dim,
    USE_TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < rows
    jmask = j < dim

    t = tl.load(t_ptr + r, mask=rmask, other=0.0).to(tl.float64)
    mv = tl.load(m_ptr + r, mask=rmask, other=0.0)
    if USE_TOKEN:
        hid = tl.load(hidden_ptr + r, mask=rmask, other=0).to(tl.int32)
        tok = tl.load(token_ptr)
        mv = tl.where(hid != 0, tok, mv)
    omega = tl.load(omega_ptr + j, mask=jmask, other=0.0)  # fp64 table
    w = tl.load(w_ptr + j, mask=jmask, other=0.0)
    b = tl.load(b_ptr + j, mask=jmask, other=0.0)

    # |t * omega| reaches thousands of radians: reduce to [-pi/4, pi/4] in fp64, then evaluate
    # short fp32 polynomials (no libdevice: the interpreter cannot run extern calls).
    x = t[:, None] * omega[None, :]
    q = tl.floor(x * _TWO_OVER_PI + 0.5)
    red = ((x - q * _PIO2_A) - q * _PIO2_B) - q * _PIO2_C
    rf = red.to(tl.float32)
    # Odd channels are cosines: cos(x) = sin(x + pi/2), i.e. one quadrant further.
    quadrant = (q.to(tl.int64) & 3).to(tl.int32) + (j[None, :] & 1)
    z = rf * rf
    s = ((_S1 * z + _S2) * z + _S3) * z * rf + rf
    c = ((_C1 * z + _C2) * z + _C3) * z * z + (1.0 - 0.5 * z)
    v = tl.where((quadrant & 1) != 0, c, s)
    v = tl.where((quadrant & 2) != 0, -v, v)

    out = v + (mv[:, None] * w[None, :] + b[None, :])
    offs = r.to(tl.int64)[:, None] * dim + j[None, :]
    tl.store(out_ptr + offs, out, mask=rmask[:, None] & jmask[None, :])


_kernels: dict[bool, object] = {}
_omega_cache: dict[tuple, torch.Tensor] = {}


def _kernel():
    from astromer_fast.kernels.backends import triton_interpret_enabled

    interp = triton_interpret_enabled()
    k = _kernels.get(interp)
    if k is None:
        k = _kernels[interp] = triton.jit(_input_embedding_fwd)
    return k


def _omega(dim: int, base: float, device: torch.device) -> torch.Tensor:
    key = (dim, float(base), device)
    om = _omega_cache.get(key)
    if om is None:
        j = torch.arange(dim, dtype=torch.float64, device=device)
        om = torch.pow(torch.tensor(float(base), dtype=torch.float64, device=device), -2.0 * j / dim)
        _omega_cache[key] = om
    return om


def input_embedding_forward(t, m, hidden, w, b, token, base: float, out) -> None:
    """Fill ``out`` (rows, D) from contiguous float32 ``t``, ``m`` (rows,), ``w``, ``b`` (D,)."""
    rows, dim = out.shape
    if rows == 0:
        return
    use_token = token is not None and hidden is not None
    block_d = min(triton.next_power_of_2(dim), 256)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))
    _kernel()[grid](
        t, m, hidden if use_token else t, w, b, token if use_token else t,
        _omega(dim, base, t.device), out, rows, dim,
        USE_TOKEN=use_token, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )


__all__ = ["input_embedding_forward"]
