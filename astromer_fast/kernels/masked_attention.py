"""Masked multi-head attention of Astromer (SPEC.md section 3), forward and backward.

    out = softmax(q k^T / sqrt(hd) + bias) v,  q, k, v: (B, H, L, hd),  key_hidden: (B, L) bool

Two mask rules, exactly as the released code adds them to the logits:

* ``"key"`` (Astromer 2): -1e9 on every hidden key, for every query. Added in float32 like the
  reference does, so a row whose keys are *all* hidden has all logits equal to fl(s - 1e9) = -1e9 and
  attends uniformly to all L keys: defined, never NaN. The kernels keep such logits shifted back by
  +1e9 (fl(fl(s - 1e9) + 1e9), exact), which changes no probability but keeps the log-sum-exp small
  enough for the backward to recompute P = exp(s' - lse) from it.
* ``"query_or_key_plus1"`` (Astromer 1): +1 on every (query, key) pair where either side is hidden.

The forward of the kernel backends returns the output and the per-row log-sum-exp (float32; float64
for float64 inputs of the ``torch`` implementation); the backward recomputes P from q, k and lse
(flash style) with D_i = rowsum(dO * O). Both are ``torch.library.custom_op``s
(``astromer_fast::masked_attention_fwd`` / ``_bwd``) with fake implementations, so torch.compile
traces them without graph breaks.

Public entry points: :func:`masked_attention` (dispatches to the fastest backend),
:func:`masked_attention_reference` (the model's plain-PyTorch math; the ``torch`` backend of
:func:`masked_attention`, natively differentiable, and what attention weights for plots come from)
and :func:`attention_bias` (each rule's additive logit bias: the one definition of the rules, which
the reference and the ``sdpa`` implementation add to the logits).
"""

# No ``from __future__ import annotations``: torch.library infers the op schema from the annotations.
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from astromer_fast.kernels import _checks, _ext
from astromer_fast.kernels.backends import BACKENDS, SDPA, pick_backend, resolve_backend

__all__ = [
    "AttentionMask",
    "MASK_RULES",
    "OP_BWD",
    "OP_FWD",
    "attention_bias",
    "attention_bias_reference",
    "masked_attention",
    "masked_attention_reference",
    "sdpa_mask",
]

OP_FWD = "astromer_fast::masked_attention_fwd"
OP_BWD = "astromer_fast::masked_attention_bwd"
MASK_RULES = ("key", "query_or_key_plus1")
_RULE_ID = {"key": 0, "query_or_key_plus1": 1}
_NEG = -1e9


class AttentionMask(NamedTuple):
    """What the model passes to its attention layers instead of a materialised bias tensor:
    the hidden keys, the rule, and the implementation (chosen once per forward, for the device:
    ``pick_backend("masked_attention", ...)``)."""

    hidden: Tensor  # (B, L) bool
    rule: str  # one of MASK_RULES
    backend: Optional[str] = None  # as for masked_attention(backend=...)


# ------------------------------------------------------------------------------------------------
# Reference (the model's math) and the flash-consistent PyTorch implementation
# ------------------------------------------------------------------------------------------------
def attention_bias(key_hidden: Tensor, rule: str, dtype: torch.dtype) -> Tensor:
    """Additive logit bias of a mask rule, broadcastable to (B, H, L, L).

    ``"key"``: -1e9 on hidden keys, what the official code adds; a row whose keys are all hidden
    therefore gets equal logits everywhere and attends uniformly to all L keys: defined, never NaN.
    ``"query_or_key_plus1"``: Astromer 1 adds the mask itself (+1, a bug its weights were trained
    with) wherever the query or the key is hidden."""
    h = key_hidden.to(dtype)
    if rule == "key":
        return (h * _NEG)[:, None, None, :]
    return torch.maximum(h[:, :, None], h[:, None, :])[:, None]


attention_bias_reference = attention_bias  # the name the kernel tests and benchmarks knew


def masked_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_hidden: Tensor, rule: str = "key"
) -> Tuple[Tensor, Tensor]:
    """The model's plain-PyTorch attention: (out, weights), weights (B, H, L, L) in q's dtype.

    logits = q k^T / sqrt(hd) + bias (bias in float32 or wider), softmax in float32 (or wider).
    """
    bias = attention_bias(key_hidden, rule, torch.promote_types(q.dtype, torch.float32))
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
    weights = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    weights = weights.to(q.dtype)
    return weights @ v, weights


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flash_logits(q: Tensor, k: Tensor, key_hidden: Tensor, rule: str, scale: float) -> Tensor:
    """s' of the header, in the accumulation dtype; hidden-key terms rounded in float32 as the
    reference (and every kernel) rounds them, also for float64 inputs."""
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    kh = key_hidden[:, None, None, :]
    if rule == "key":
        hid = s.to(torch.float32) + _NEG
        all_h = key_hidden.all(-1)[:, None, None, None]
        hid = torch.where(all_h, hid + (-_NEG), hid)
        return torch.where(kh, hid.to(acc), s)
    qh = key_hidden[:, None, :, None]
    return s + (qh | kh).to(acc)


def _torch_fwd(q, k, v, key_hidden, rule) -> Tuple[Tensor, Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = _flash_logits(q, k, key_hidden, rule, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = (p @ v.to(s.dtype)).to(q.dtype)
    return out, lse


def _torch_bwd(dout, q, k, v, out, lse, key_hidden, rule) -> Tuple[Tensor, Tensor, Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = _acc_dtype(q.dtype)
    s = _flash_logits(q, k, key_hidden, rule, scale)
    p = torch.exp(s - lse.to(acc)[..., None])
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.to(acc).transpose(-1, -2) - delta) * scale
    dq = ds @ k.to(acc)
    dk = ds.transpose(-1, -2) @ q.to(acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------
# Kernel runners
# ------------------------------------------------------------------------------------------------
def _shape(q: Tensor):
    B, H, L, hd = q.shape
    return B, H, L, hd


_cpu_ext = _ext.require_cpu_ext
_cuda_ext = _ext.require_cuda_ext
_cuda_dev_stream = _ext.cuda_device_and_stream


def _rows_contiguous(x: Tensor) -> Tensor:
    """x itself when its rows (last dim) are contiguous, which is all the C++ kernel needs: the
    model's heads, (B, L, H, hd) projections viewed as (B, H, L, hd), go in without a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _qkv_strides(q, k, v) -> list:
    return [s for x in (q, k, v) for s in x.stride()[:3]]


def _fwd_cpu(q, k, v, kh, rule, out, lse):
    B, H, L, hd = _shape(q)
    _cpu_ext().masked_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), kh.data_ptr(), B, H, L, hd, _RULE_ID[rule],
        1.0 / math.sqrt(hd), out.data_ptr(), lse.data_ptr(), max(1, torch.get_num_threads()),
        qkv_strides=_qkv_strides(q, k, v))


def _bwd_cpu(do, q, k, v, out, lse, kh, rule, dq, dk, dv):
    B, H, L, hd = _shape(q)
    _cpu_ext().masked_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), kh.data_ptr(), out.data_ptr(), lse.data_ptr(),
        do.data_ptr(), B, H, L, hd, _RULE_ID[rule], 1.0 / math.sqrt(hd), dq.data_ptr(),
        dk.data_ptr(), dv.data_ptr(), max(1, torch.get_num_threads()),
        qkv_strides=_qkv_strides(q, k, v))


CUDA_ATTENTION_ENV = "ASTROMER_FAST_CUDA_ATTENTION"
_CUDA_ATTENTION_KERNELS = ("simt", "tensor_cores")


def _cuda_attention_kernel() -> str:
    """Which CUDA attention kernels the ``cuda`` backend runs, read from
    ``$ASTROMER_FAST_CUDA_ATTENTION`` at every call: ``simt`` (default; the scalar fp32-FMA
    kernels) or ``tensor_cores`` (bf16 WMMA kernels for bf16 inputs with L <= 256 on sm_80+;
    other inputs still take the scalar kernels). The tensor-core kernels are NOT YET RUN ON A GPU
    (tested on the CPU through an emulation of the same source only), hence not the default."""
    value = os.environ.get(CUDA_ATTENTION_ENV, "").strip() or "simt"
    if value not in _CUDA_ATTENTION_KERNELS:
        raise ValueError(f"{CUDA_ATTENTION_ENV}={value!r}: choose one of {_CUDA_ATTENTION_KERNELS}")
    return value


def _fwd_cuda(q, k, v, kh, rule, out, lse):
    B, H, L, hd = _shape(q)
    dev, stream = _cuda_dev_stream(q)
    _cuda_ext().masked_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), kh.data_ptr(), q.dtype == torch.bfloat16,
        B, H, L, hd, _RULE_ID[rule], 1.0 / math.sqrt(hd), out.data_ptr(), lse.data_ptr(),
        dev, stream, tensor_cores=_cuda_attention_kernel() == "tensor_cores")


def _bwd_cuda(do, q, k, v, out, lse, kh, rule, dq, dk, dv):
    B, H, L, hd = _shape(q)
    dev, stream = _cuda_dev_stream(q)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _cuda_ext().masked_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), kh.data_ptr(), out.data_ptr(), lse.data_ptr(),
        do.data_ptr(), q.dtype == torch.bfloat16, B, H, L, hd, _RULE_ID[rule],
        1.0 / math.sqrt(hd), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(),
        dev, stream, tensor_cores=_cuda_attention_kernel() == "tensor_cores")


def _fwd_triton(q, k, v, kh, rule, out, lse):
    from astromer_fast.kernels import _triton_masked_attention as tma

    tma.forward(q, k, v, kh, _RULE_ID[rule], 1.0 / math.sqrt(q.shape[-1]), out, lse)


def _bwd_triton(do, q, k, v, out, lse, kh, rule, dq, dk, dv):
    from astromer_fast.kernels import _triton_masked_attention as tma

    tma.backward(do, q, k, v, out, lse, kh, _RULE_ID[rule], 1.0 / math.sqrt(q.shape[-1]), dq, dk, dv)


def _qkv_for(backend, q, k, v) -> tuple:
    """q, k, v as the backend's kernels read them: rows contiguous for C++ (strides passed),
    dense for CUDA and Triton."""
    f = _rows_contiguous if backend == "cpu" else Tensor.contiguous
    return f(q), f(k), f(v)


_FWD = {"cpu": _fwd_cpu, "cuda": _fwd_cuda, "triton": _fwd_triton}
_BWD = {"cpu": _bwd_cpu, "cuda": _bwd_cuda, "triton": _bwd_triton}
_KERNEL_DTYPES = {
    "cpu": (torch.float32,),
    "cuda": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.bfloat16),
}


def _check_op_args(q, k, v, key_hidden, rule, backend, what) -> None:
    _checks.check_backend(what, backend, BACKENDS)
    if rule not in MASK_RULES:
        raise ValueError(f"{what}: unknown rule {rule!r}; choose one of {MASK_RULES}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{what}: q, k, v must all be (B, H, L, hd)")
    if key_hidden.dtype != torch.bool or key_hidden.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"{what}: key_hidden must be a bool (B, L) tensor")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{what}: q, k, v must share one dtype")
    if backend != "torch":
        if q.dtype not in _KERNEL_DTYPES[backend]:
            raise TypeError(f"{what}: backend {backend!r} supports {_KERNEL_DTYPES[backend]}, got {q.dtype}")
        if q.shape[-1] % 16 != 0 or q.shape[-1] > 256:
            raise ValueError(f"{what}: backend {backend!r} needs hd a multiple of 16 and <= 256")
        if backend == "cuda" and q.shape[-1] != 64:
            raise ValueError(f"{what}: backend 'cuda' supports hd 64 only, got {q.shape[-1]}")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op(OP_FWD, mutates_args=())
def _masked_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_hidden: Tensor, rule: str, backend: str
) -> Tuple[Tensor, Tensor]:
    _check_op_args(q, k, v, key_hidden, rule, backend, OP_FWD)
    if backend == "torch":
        return _torch_fwd(q, k, v, key_hidden, rule)
    resolve_backend(q.device, backend)  # raises BackendUnavailableError with the reason
    B, H, L, hd = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    qkv = _qkv_for(backend, q, k, v)
    _FWD[backend](*qkv, key_hidden.contiguous().view(torch.uint8), rule, out, lse)
    return out, lse


@_masked_attention_fwd.register_fake
def _masked_attention_fwd_fake(q, k, v, key_hidden, rule, backend):
    _check_op_args(q, k, v, key_hidden, rule, backend, OP_FWD)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op(OP_BWD, mutates_args=())
def _masked_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_hidden: Tensor,
    rule: str, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check_op_args(q, k, v, key_hidden, rule, backend, OP_BWD)
    if backend == "torch":
        return _torch_bwd(dout, q, k, v, out, lse, key_hidden, rule)
    resolve_backend(q.device, backend)
    c = lambda x: x.contiguous()  # noqa: E731
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if q.numel() == 0:
        return dq, dk, dv
    _BWD[backend](c(dout.to(q.dtype)), *_qkv_for(backend, q, k, v), c(out.to(q.dtype)),
                  c(lse.float()), c(key_hidden).view(torch.uint8), rule, dq, dk, dv)
    return dq, dk, dv


@_masked_attention_bwd.register_fake
def _masked_attention_bwd_fake(dout, q, k, v, out, lse, key_hidden, rule, backend):
    _check_op_args(q, k, v, key_hidden, rule, backend, OP_BWD)
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_hidden, rule, backend = inputs
    out, lse = output
    ctx.rule, ctx.backend = rule, backend
    ctx.save_for_backward(q, k, v, key_hidden, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, key_hidden, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _masked_attention_bwd(grad_out, q, k, v, out, lse, key_hidden, ctx.rule, ctx.backend)
    return dq, dk, dv, None, None, None


torch.library.register_autograd(OP_FWD, _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _validate(q, k, v, key_hidden, rule) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"masked_attention: {name} must be a floating-point tensor")
        if x.dim() != 4:
            raise ValueError(f"masked_attention: {name} must be (B, H, L, hd), got {tuple(x.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"masked_attention: q, k, v shapes differ: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(key_hidden, Tensor) or key_hidden.dtype != torch.bool:
        raise TypeError("masked_attention: key_hidden must be a torch.bool tensor")
    if key_hidden.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"masked_attention: key_hidden must be (B, L) = {(q.shape[0], q.shape[2])}, "
                         f"got {tuple(key_hidden.shape)}")
    _checks.check_same_device("masked_attention", "q", q, (("k", k), ("v", v), ("key_hidden", key_hidden)))
    if rule not in MASK_RULES:
        raise ValueError(f"masked_attention: rule must be one of {MASK_RULES}, got {rule!r}")


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_hidden: Tensor,
    rule: str = "key",
    return_weights: bool = False,
    backend: Optional[str] = None,
):
    """Astromer's masked attention, (B, H, L, hd) -> (B, H, L, hd); differentiable in q, k, v.

    Args:
        q, k, v: (B, H, L, hd) floating point, one dtype (mixed dtypes are promoted).
        key_hidden: (B, L) bool, True where the observation is hidden (padding or masked).
        rule: ``"key"`` (Astromer 2, -1e9 on hidden keys) or ``"query_or_key_plus1"`` (Astromer 1).
        return_weights: also return the (B, H, L, L) attention weights (for plots). Computed with
            the plain-PyTorch reference whatever the backend.
        backend: "cuda", "triton", "cpu", "torch", "sdpa", or None/"auto":
            ``$ASTROMER_FAST_BACKEND`` if set, else the default for the device: ``cpu`` (C++) on
            the CPU; on CUDA ``backends.CUDA_DEFAULTS`` (``sdpa``: PyTorch's fused SDPA with the
            rule's additive bias). ``torch`` is always the plain reference math.

    ``$ASTROMER_FAST_CUDA_ATTENTION`` picks the kernels of the ``cuda`` backend: ``simt``
    (default) or ``tensor_cores`` (bf16, L <= 256, sm_80+; NOT YET RUN ON A GPU).

    Kernel dtypes: the C++ kernel computes in float32 (other dtypes are cast in and the result cast
    back); CUDA and Triton take float32 and bfloat16 natively with float32 accumulation (float16 and
    float64 are cast to float32). float64 inputs default to the ``torch`` backend.
    """
    _validate(q, k, v, key_hidden, rule)
    if not (q.dtype == k.dtype == v.dtype):
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if return_weights:
        return masked_attention_reference(q, k, v, key_hidden, rule)
    name = pick_backend("masked_attention", q.device, q.dtype, backend)
    if name == SDPA:
        return _sdpa(q, k, v, key_hidden, rule)
    if name == "torch":
        return masked_attention_reference(q, k, v, key_hidden, rule)[0]
    if q.shape[-1] % 16 != 0 or q.shape[-1] > 256:
        raise ValueError(f"masked_attention: backend {name!r} needs hd a multiple of 16 and "
                         f"<= 256, got {q.shape[-1]}")
    dt = q.dtype if q.dtype in _KERNEL_DTYPES[name] else torch.float32
    out, _ = _masked_attention_fwd(q.to(dt), k.to(dt), v.to(dt), key_hidden, rule, name)
    return out.to(q.dtype)


def sdpa_mask(key_hidden: Tensor, rule: str, dtype: torch.dtype, for_gradient: bool):
    """What torch's SDPA takes for a mask rule: (additive bias, a (B, 1, 1, 1) factor for the
    queries or None).

    Below float64 a window whose keys are all hidden has every logit rounded to -1e9: uniform
    weights, which SDPA's forward gives but not its backward, which recomputes the weights from a
    log-sum-exp the -1e9 has absorbed (every weight comes back as 1, not 1 / L). With
    ``for_gradient`` such windows get no bias and zero queries instead: the same uniform weights,
    and the derivative of them (nothing to q and k, on which uniform weights do not depend).
    float64 keeps the scores beside -1e9 and SDPA's backward resolves them."""
    if for_gradient and rule == "key" and dtype != torch.float64:
        all_hidden = key_hidden.all(1)
        return (attention_bias(key_hidden & ~all_hidden[:, None], rule, dtype),
                (~all_hidden).to(dtype)[:, None, None, None])
    return attention_bias(key_hidden, rule, dtype), None


def _sdpa(q, k, v, key_hidden, rule):
    """PyTorch's fused SDPA with the additive bias of the rule (the same -1e9 / +1 terms as the
    reference, so all-hidden rows are uniform averages too); when a gradient is recorded, with
    ``sdpa_mask``'s route around SDPA's backward for windows whose keys are all hidden."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or
                                              v.requires_grad)
    bias, query_keep = sdpa_mask(key_hidden, rule, q.dtype, needs_grad)
    if query_keep is not None:
        q = q * query_keep
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)