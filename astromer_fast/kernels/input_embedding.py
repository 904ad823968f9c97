"""Fused input embedding of Astromer (SPEC.md section 2).

    x0[..., l, j] = PE_j(t[..., l]) + m'[..., l] * w[j] + b[j]
    PE_j(t) = sin(t * omega_j) (j even), cos(t * omega_j) (j odd),  omega_j = base^(-2j/D)
    m' = token where hidden, else m   (no token, i.e. Astromer 1: m' = m)

Every channel j has its own frequency (exponent 2j/D with the channel index itself), which is what
the released code computes and what the published weights were trained with. The angle t*omega
reaches thousands of radians, so every backend forms it (or at least range-reduces it) in float64.

Public entry points: :func:`input_embedding` (dispatches to the fastest backend) and
:func:`input_embedding_reference` (plain PyTorch; the ``torch`` backend and the test oracle).
The kernel backends run behind the custom op ``astromer_fast::input_embedding`` (fake
implementation for torch.compile/meta tensors, backward in PyTorch); the ``torch`` backend calls
the reference directly so that it stays natively differentiable for any device and dtype.
"""

# No ``from __future__ import annotations``: torch.library infers the op schema from the
# annotations, and torch 2.4 cannot parse stringified ones.
import math
from functools import reduce
from typing import Optional, Tuple

import torch
from torch import Tensor

from astromer_fast.kernels import _checks, _ext
from astromer_fast.kernels.backends import BACKENDS, pick_backend, resolve_backend

__all__ = ["OP_NAME", "input_embedding", "input_embedding_reference"]

OP_NAME = "astromer_fast::input_embedding"


# ------------------------------------------------------------------------------------------------
# Reference / torch backend
# ------------------------------------------------------------------------------------------------
def _result_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    return reduce(torch.promote_types, [x.dtype for x in tensors if x is not None])


def _angles(t: Tensor, dim: int, base: float) -> Tuple[Tensor, Tensor]:
    """(t*omega + phase, omega) in float64; odd channels get +pi/2 so that one sin covers cos.

    Adding the phase in float64 costs ~1e-13 rad at |t*omega| ~ 3e3, and halves the work compared
    with evaluating both sin and cos and selecting.
    """
    j = torch.arange(dim, dtype=torch.float64, device=t.device)
    omega = float(base) ** (-2.0 * j / dim)
    phase = torch.remainder(j, 2.0) * (math.pi / 2)
    return t.to(torch.float64).unsqueeze(-1) * omega + phase, omega


def _effective_m(m: Tensor, hidden: Optional[Tensor], token: Optional[Tensor]) -> Tensor:
    if token is None or hidden is None:
        return m
    return torch.where(hidden.bool(), token.reshape(()).to(m.dtype), m)


def input_embedding_reference(
    t: Tensor,
    m: Tensor,
    hidden: Optional[Tensor],
    w: Tensor,
    b: Tensor,
    token: Optional[Tensor] = None,
    base: float = 10000.0,
) -> Tensor:
    """Plain-PyTorch input embedding, differentiable in every input, any device and float dtype.

    The angle t*omega is formed in float64 from ``t`` (|t| reaches thousands of days, where a float32
    angle is off by ~1e-4 rad) and the whole sum stays in float64 until one final cast to the result
    dtype (the promotion of the dtypes of t, m, w, b and token), so a float32 result is correctly
    rounded up to ~1e-12: good enough to serve as the oracle. Returns (..., L, D).
    """
    dtype = _result_dtype(t, m, w, b, token)
    f64 = torch.float64
    angle, _ = _angles(t, w.shape[-1], base)
    mp = _effective_m(m, hidden, token).to(f64)
    return (torch.sin(angle) + torch.addcmul(b.to(f64), mp.unsqueeze(-1), w.to(f64))).to(dtype)


# ------------------------------------------------------------------------------------------------
# Custom op: kernels for the forward, PyTorch for the backward
# ------------------------------------------------------------------------------------------------
_ptr = _ext.ptr


def _run_cpu(t, m, hidden, w, b, token, base, out) -> None:
    _ext.require_cpu_ext().input_embedding_forward(
        _ptr(t), _ptr(m), _ptr(hidden), _ptr(w), _ptr(b), _ptr(token), float(base),
        t.numel(), w.numel(), _ptr(out), max(1, torch.get_num_threads()),
    )


def _run_cuda(t, m, hidden, w, b, token, base, out) -> None:
    ext = _ext.require_cuda_ext()
    dev, stream = _ext.cuda_device_and_stream(t)
    ext.input_embedding_forward(
        _ptr(t), _ptr(m), _ptr(hidden), _ptr(w), _ptr(b), _ptr(token), float(base),
        t.numel(), w.numel(), _ptr(out), dev, stream,
    )


def _run_triton(t, m, hidden, w, b, token, base, out) -> None:
    from astromer_fast.kernels import _triton_input_embedding

    _triton_input_embedding.input_embedding_forward(
        t.reshape(-1), m.reshape(-1), None if hidden is None else hidden.reshape(-1),
        w, b, token, base, out.view(-1, w.shape[0]),
    )


_RUNNERS = {"cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


def _check_op_args(t, m, hidden, w, b, token, backend) -> None:
    """Checks for direct callers of the op; the public wrapper has already normalised its inputs."""
    _checks.check_backend(OP_NAME, backend, BACKENDS)
    if backend != "torch":
        _checks.check_float32(OP_NAME, backend, (("t", t), ("m", m), ("w", w), ("b", b), ("token", token)))
    if m.shape != t.shape or (hidden is not None and hidden.shape != t.shape):
        raise ValueError(f"{OP_NAME}: t, m (and hidden) must have one shape")
    if hidden is not None and hidden.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{OP_NAME}: hidden must be torch.bool, got {hidden.dtype}")
    if w.dim() != 1 or b.shape != w.shape:
        raise ValueError(f"{OP_NAME}: w and b must both have shape (D,)")
    if backend != "torch" and w.shape[0] % 2 != 0:
        raise ValueError(f"{OP_NAME}: backend {backend!r} needs an even D, got D={w.shape[0]}")
    if token is not None and (token.numel() != 1 or token.dim() > 1):
        raise ValueError(f"{OP_NAME}: token must have shape (1,) or ()")


@torch.library.custom_op(OP_NAME, mutates_args=())
def _input_embedding_op(
    t: Tensor,
    m: Tensor,
    hidden: Optional[Tensor],
    w: Tensor,
    b: Tensor,
    token: Optional[Tensor],
    base: float,
    backend: str,
) -> Tensor:
    _check_op_args(t, m, hidden, w, b, token, backend)
    if backend == "torch":
        return input_embedding_reference(t, m, hidden, w, b, token, base).to(t.dtype)
    # Raises BackendUnavailableError with the reason (wrong device, extension not built, ...).
    resolve_backend(t.device, backend)
    out = torch.empty((*t.shape, w.shape[0]), dtype=torch.float32, device=t.device)
    if out.numel() == 0:
        return out
    use_token = token is not None and hidden is not None
    c = lambda x: x.contiguous()  # noqa: E731  (no-op for the wrapper's inputs)
    _RUNNERS[backend](
        c(t), c(m), c(hidden).view(torch.uint8) if use_token else None, c(w), c(b),
        c(token) if use_token else None, base, out,
    )
    return out


@_input_embedding_op.register_fake
def _input_embedding_fake(t, m, hidden, w, b, token, base, backend):
    _check_op_args(t, m, hidden, w, b, token, backend)
    return t.new_empty((*t.shape, w.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    t, m, hidden, w, b, token, base, backend = inputs
    ctx.base = base
    ctx.save_for_backward(t, m, hidden, w, token)


def _backward(ctx, grad: Tensor):
    t, m, hidden, w, token = ctx.saved_tensors
    need = ctx.needs_input_grad
    dim = w.shape[0]
    use_token = token is not None and hidden is not None
    g2 = grad.reshape(-1, dim)
    grad_t = grad_m = grad_w = grad_b = grad_token = None

    if need[4]:
        grad_b = g2.sum(0).to(w.dtype)
    if need[3]:
        grad_w = torch.mv(g2.t(), _effective_m(m, hidden, token).reshape(-1).to(g2.dtype)).to(w.dtype)
    if need[1] or need[5]:
        gw = torch.mv(g2, w.to(g2.dtype)).reshape(m.shape)
        if need[1]:
            grad_m = (gw.masked_fill(hidden.bool(), 0.0) if use_token else gw).to(m.dtype)
        if need[5]:
            if use_token:
                grad_token = torch.where(hidden.bool(), gw, 0.0).sum().reshape(token.shape).to(token.dtype)
            else:
                grad_token = torch.zeros_like(token)
    if need[0]:
        # d/dt sin(t*omega + phase) = omega * cos(t*omega + phase), in float64 like the forward.
        angle, omega = _angles(t, dim, ctx.base)
        grad_t = (grad.to(torch.float64) * (torch.cos(angle) * omega)).sum(-1).to(t.dtype)
    return grad_t, grad_m, None, grad_w, grad_b, grad_token, None, None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _validate(t, m, hidden, w, b, token, base) -> None:
    for name, x in (("t", t), ("m", m), ("w", w), ("b", b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"input_embedding: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input_embedding: {name} must be a floating-point tensor, got {x.dtype}")
    if t.dim() < 1:
        raise ValueError("input_embedding: t must have shape (..., L), got a 0-d tensor")
    if m.shape != t.shape:
        raise ValueError(f"input_embedding: m has shape {tuple(m.shape)}, t has {tuple(t.shape)}")
    if w.dim() != 1 or b.dim() != 1 or w.shape != b.shape:
        raise ValueError(
            f"input_embedding: w and b must both have shape (D,), got {tuple(w.shape)} and {tuple(b.shape)}"
        )
    if w.shape[0] == 0:
        raise ValueError("input_embedding: D (= len(w)) must be positive")
    if hidden is not None:
        if not isinstance(hidden, Tensor) or hidden.dtype != torch.bool:
            got = hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__
            raise TypeError(f"input_embedding: hidden must be a torch.bool tensor or None, got {got}")
        if hidden.shape != t.shape:
            raise ValueError(
                f"input_embedding: hidden has shape {tuple(hidden.shape)}, t has {tuple(t.shape)}"
            )
    if token is not None:
        if not isinstance(token, Tensor) or not token.is_floating_point():
            raise TypeError("input_embedding: token must be a floating-point tensor of shape (1,) or (), or None")
        if token.numel() != 1 or token.dim() > 1:
            raise ValueError(f"input_embedding: token must have shape (1,) or (), got {tuple(token.shape)}")
    _checks.check_same_device("input_embedding", "t", t,
                              (("m", m), ("hidden", hidden), ("w", w), ("b", b), ("token", token)))
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"input_embedding: base must be a positive finite number, got {base!r}")


def input_embedding(
    t: Tensor,
    m: Tensor,
    hidden: Optional[Tensor],
    w: Tensor,
    b: Tensor,
    token: Optional[Tensor] = None,
    base: float = 10000.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Astromer input embedding x0 = PE(t) + m'·w + b, shape (..., L, D).

    Args:
        t, m: (..., L) times (days, ideally window-centred) and magnitudes, floating point.
        hidden: (..., L) bool, True where the observation is hidden from attention (masked or
            padding): there m is replaced by ``token``. Ignored when ``token`` is None.
        w, b: (D,) kernel and bias of the Dense(1 -> D) magnitude projection (D even for kernels).
        token: the MASK token, shape (1,) or (), or None (Astromer 1: no token, m' = m).
        base: PE frequency base (the released code uses 10000).
        backend: "cuda", "triton", "cpu", "torch", or None/"auto": ``$ASTROMER_FAST_BACKEND`` if set,
            else the fastest available for the tensors' device. Forcing an unavailable backend
            raises ``BackendUnavailableError`` saying why.

    The result dtype is the promotion of the input dtypes. The compiled kernels compute in float32
    (other dtypes are cast in, and the result cast back); float64 inputs therefore default to the
    ``torch`` backend, which keeps float64 throughout. Differentiable in t, m, w, b and token.
    """
    _validate(t, m, hidden, w, b, token, base)
    out_dtype = _result_dtype(t, m, w, b, token)
    name = pick_backend("input_embedding", t.device, out_dtype, backend)
    if token is None:
        hidden = None

    if name == "torch":
        return input_embedding_reference(t, m, hidden, w, b, token, base)

    if w.shape[0] % 2 != 0:
        raise ValueError(f"input_embedding: backend {name!r} needs an even D, got D={w.shape[0]}")
    f32 = torch.float32
    if token is not None:
        token = token.reshape(1).to(f32)
    out = _input_embedding_op(
        t.to(f32).contiguous(), m.to(f32).contiguous(),
        None if hidden is None else hidden.contiguous(),
        w.to(f32).contiguous(), b.to(f32).contiguous(), token, float(base), name,
    )
    return out if out_dtype == f32 else out.to(out_dtype)
