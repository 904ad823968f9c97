"""The official pretraining loss of Astromer (SPEC.md section 4): weighted masked RMSE.

    w_bl   = minmax_over_valid(1 / e_bl) + 1e-3     (uniform 1 when a window's 1/e are all equal;
                                                     e clamped to 1e-8; 1 on valid without errors)
    mse_b  = sum_l w_bl p_bl (y_bl - yhat_bl)^2 / sum_l p_bl                 (p = probed mask)
    loss   = sqrt(mean_{b with >= 1 probed} mse_b + 1e-12)    (0 when no window has a probed obs)

Public entry points: :func:`weighted_rmse` (dispatches to the fastest backend; this is the one
dispatch point the training code uses, through ``astromer_fast.training.loss``) and
:func:`weighted_rmse_reference` (plain PyTorch: the ``torch`` backend and the test oracle, together
with :func:`error_weights`).

The kernel backends run behind the custom op ``astromer_fast::weighted_rmse``. One fused forward
computes the loss and, when a gradient will be needed, the per-observation direction
``dir = w p (yhat - y) / c_b`` and the scalar ``scale = 1 / (loss * n_windows_with_probed)``, so
that ``d loss / d yhat = dir * scale``: the backward is one elementwise multiply. Only ``pred``
gets a gradient (targets, errors and masks are data). Every kernel reduces each window in a fixed
order into a per-window partial and sums the partials in a fixed order (no float atomics), so the
loss and its gradient are bitwise reproducible.
"""

# No ``from __future__ import annotations``: torch.library infers the op schema from the
# annotations, and torch 2.4 cannot parse stringified ones.
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from astromer_fast.kernels import _checks, _ext
from astromer_fast.kernels.backends import BACKENDS, pick_backend, resolve_backend

__all__ = ["OP_BWD", "OP_NAME", "error_weights", "weighted_rmse", "weighted_rmse_reference"]

OP_NAME = "astromer_fast::weighted_rmse"
OP_BWD = "astromer_fast::weighted_rmse_bwd"


# ------------------------------------------------------------------------------------------------
# Reference / torch backend (moved here from astromer_fast.training.loss, unchanged semantics)
# ------------------------------------------------------------------------------------------------
def error_weights(err: Optional[Tensor], valid: Tensor) -> Tensor:
    """Per-observation weights: 1/e min-max scaled over each window's valid observations, + 1e-3.

    Guards the official formula's two NaN cases: a non-positive error (cleaning removes them; here
    it is clamped so 1/e stays finite) and a window whose errors are all equal (max == min), which
    gets uniform weight 1. Without errors every weight is 1.
    """
    if err is None or err.shape[-1] == 0:  # (L = 0: nothing to scale, and amin() would refuse)
        return valid.to(torch.float32)
    inv = 1.0 / err.float().clamp_min(1e-8)
    big = torch.finfo(inv.dtype).max
    lo = torch.where(valid, inv, big).amin(-1, keepdim=True)
    hi = torch.where(valid, inv, -big).amax(-1, keepdim=True)
    span = hi - lo
    flat = span <= 0
    w = torch.where(flat, torch.ones_like(inv), (inv - lo) / torch.where(flat, 1.0, span) + 1e-3)
    return w * valid


def weighted_rmse_reference(pred, target, err, probed, valid=None) -> Tensor:
    """The official weighted masked RMSE in plain PyTorch; windows without a probed observation are
    left out of the mean (0 when no window has one), so the loss is always finite.

    Computes in float32 (float64 when pred is float64, which is what gradcheck needs; the weights
    stay float32 either way: they are constants with respect to pred).
    """
    dt = torch.promote_types(pred.dtype, torch.float32)
    valid = probed if valid is None else valid
    w = error_weights(err, valid)
    p = probed.to(torch.float32)
    num = (w * p * (target.to(dt) - pred.to(dt)) ** 2).sum(-1)
    count = p.sum(-1)
    has = count > 0
    mse = num[has] / count[has]
    if mse.numel() == 0:
        return (pred.to(dt) * 0).sum()
    # 1e-12 keeps the gradient finite at a perfect fit (d sqrt(x)/dx is infinite at 0).
    return torch.sqrt(mse.mean() + 1e-12)


def _op_torch(pred, target, err, probed, valid, need_grad) -> Tuple[Tensor, Tensor, Tensor]:
    """The op's outputs (loss, dir, scale) in plain PyTorch (any device; fixed-order sums)."""
    w = error_weights(err, probed if valid is None else valid)
    p = probed.to(torch.float32)
    d = pred.float() - target.float()
    wp = w * p
    count = p.sum(-1)
    has = count > 0
    mse = (wp * d * d).sum(-1, dtype=torch.float64) / count.clamp_min(1)
    n = has.sum()
    mean = torch.where(has, mse, 0.0).sum() / n.clamp_min(1)
    loss = torch.where(n > 0, torch.sqrt(mean + 1e-12), 0.0).float()
    scale = torch.where(n > 0, 1.0 / (loss.double() * n.clamp_min(1)), 0.0).float()
    dir_ = (wp * d * (1.0 / count.clamp_min(1)).unsqueeze(-1)) if need_grad else d.new_empty(0)
    return loss, dir_, scale


# ------------------------------------------------------------------------------------------------
# Custom op: one fused forward kernel per backend; the backward is dir * scale
# ------------------------------------------------------------------------------------------------
_ptr = _ext.ptr


def _run_cpu(pred, target, err, probed, valid, loss, scale, dir_) -> None:
    rows, length = pred.shape
    _ext.require_cpu_ext().weighted_rmse_forward(
        _ptr(pred), pred.dtype == torch.bfloat16, _ptr(target), _ptr(err), _ptr(probed),
        _ptr(valid), rows, length, _ptr(loss), _ptr(scale), _ptr(dir_),
        max(1, torch.get_num_threads()),
    )


def _run_cuda(pred, target, err, probed, valid, loss, scale, dir_) -> None:
    ext = _ext.require_cuda_ext()
    rows, length = pred.shape
    dev, stream = _ext.cuda_device_and_stream(pred)
    workspace = torch.empty(2 * rows, dtype=torch.float32, device=pred.device)
    ext.weighted_rmse_forward(
        _ptr(pred), pred.dtype == torch.bfloat16, _ptr(target), _ptr(err), _ptr(probed),
        _ptr(valid), rows, length, _ptr(workspace), _ptr(loss), _ptr(scale), _ptr(dir_),
        dev, stream,
    )


def _run_triton(pred, target, err, probed, valid, loss, scale, dir_) -> None:
    from astromer_fast.kernels import _triton_weighted_rmse

    _triton_weighted_rmse.weighted_rmse_forward(pred, target, err, probed, valid, loss, scale, dir_)


_RUNNERS = {"cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


def _check_op_args(pred, target, err, probed, valid, backend) -> None:
    """Checks for direct callers of the op; the public wrapper has already normalised its inputs."""
    _checks.check_backend(OP_NAME, backend, BACKENDS)
    if pred.dim() != 2:
        raise ValueError(f"{OP_NAME}: inputs must have shape (B, L), got {tuple(pred.shape)}")
    for name, x in (("target", target), ("err", err), ("probed", probed), ("valid", valid)):
        if x is not None and x.shape != pred.shape:
            raise ValueError(f"{OP_NAME}: {name} has shape {tuple(x.shape)}, pred has {tuple(pred.shape)}")
    for name, x in (("probed", probed), ("valid", valid)):
        if x is not None and x.dtype != torch.bool:
            raise TypeError(f"{OP_NAME}: {name} must be torch.bool, got {x.dtype}")
    if backend != "torch":
        if pred.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{OP_NAME}: backend {backend!r} needs float32 or bfloat16 pred, got {pred.dtype}")
        _checks.check_float32(OP_NAME, backend, (("target", target), ("err", err)))


@torch.library.custom_op(OP_NAME, mutates_args=())
def _weighted_rmse_op(
    pred: Tensor,
    target: Tensor,
    err: Optional[Tensor],
    probed: Tensor,
    valid: Optional[Tensor],
    need_grad: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, dir, scale): loss () float32; dir (B, L) float32 if need_grad else (0,); scale ()."""
    _check_op_args(pred, target, err, probed, valid, backend)
    if backend == "torch":
        return _op_torch(pred, target, err, probed, valid, need_grad)
    if not (backend == "cpu" and pred.device.type == "cpu" and _ext.cpu_ext() is not None):
        # Raises BackendUnavailableError with the reason (wrong device, extension not built, ...).
        resolve_backend(pred.device, backend)
    f32 = torch.float32
    loss = torch.empty((), dtype=f32, device=pred.device)
    scale = torch.empty((), dtype=f32, device=pred.device)
    dir_ = torch.empty(pred.shape if need_grad else (0,), dtype=f32, device=pred.device)
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731  (no-op for the wrapper's inputs)
    _RUNNERS[backend](c(pred), c(target), c(err), c(probed), c(valid), loss, scale,
                      dir_ if need_grad else None)
    return loss, dir_, scale


@_weighted_rmse_op.register_fake
def _weighted_rmse_fake(pred, target, err, probed, valid, need_grad, backend):
    _check_op_args(pred, target, err, probed, valid, backend)
    f32 = torch.float32
    return (pred.new_empty((), dtype=f32),
            pred.new_empty(pred.shape if need_grad else (0,), dtype=f32),
            pred.new_empty((), dtype=f32))


def _setup_context(ctx, inputs, output) -> None:
    pred, need_grad = inputs[0], inputs[5]
    _, dir_, scale = output
    ctx.need_grad = need_grad
    ctx.pred_dtype = pred.dtype
    ctx.mark_non_differentiable(dir_, scale)
    ctx.save_for_backward(dir_, scale)


def _grad_in_torch(dir_: Tensor, grad_loss: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """dir * (grad_loss * scale) in plain PyTorch, with the C++ pass's roundings: the factor in
    float32, one rounding of the product to ``dtype``."""
    return (dir_ * (grad_loss * scale)).to(dtype)


@torch.library.custom_op(OP_BWD, mutates_args=())
def _weighted_rmse_bwd(dir_: Tensor, grad_loss: Tensor, scale: Tensor, grad_bf16: bool) -> Tensor:
    """d loss / d pred = dir * (grad_loss * scale) in pred's dtype (bfloat16 or float32). On the CPU
    one multi-threaded C++ pass writes it straight in that dtype; elsewhere ``_grad_in_torch``."""
    dt = torch.bfloat16 if grad_bf16 else torch.float32
    ext = _ext.cpu_ext() if dir_.device.type == "cpu" else None
    if ext is None or dir_.dtype != torch.float32:
        return _grad_in_torch(dir_, grad_loss, scale, dt)
    d = dir_.contiguous()
    out = torch.empty(d.shape, dtype=dt)
    ext.weighted_rmse_backward(d.data_ptr(), float(grad_loss), float(scale), out.data_ptr(),
                               grad_bf16, d.numel(), max(1, torch.get_num_threads()))
    return out


# The autograd backward calls the C++ pass (through the custom op above) only for bfloat16
# gradients of at least this many elements on the CPU; otherwise the two PyTorch ops of
# _grad_in_torch are faster (the C++ pass wins only for large bfloat16 gradients; figures in
# bench/RESULTS.md). On CUDA it also saves a custom-op dispatch on the host, which is most of the
# op's time at the benchmark's 4096 x 200.
_CPP_BWD_MIN_NUMEL = 1 << 19


@_weighted_rmse_bwd.register_fake
def _weighted_rmse_bwd_fake(dir_, grad_loss, scale, grad_bf16):
    return dir_.new_empty(dir_.shape, dtype=torch.bfloat16 if grad_bf16 else torch.float32)


def _backward(ctx, grad_loss: Tensor, grad_dir, grad_scale):
    dir_, scale = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        if not ctx.need_grad:
            raise RuntimeError(f"{OP_NAME}: called with need_grad=False, so there is no backward")
        bf16 = ctx.pred_dtype == torch.bfloat16
        if bf16 and dir_.device.type == "cpu" and dir_.numel() >= _CPP_BWD_MIN_NUMEL:
            grad_pred = _weighted_rmse_bwd(dir_, grad_loss, scale, True)
        else:
            grad_pred = _grad_in_torch(dir_, grad_loss, scale, ctx.pred_dtype)
    return grad_pred, None, None, None, None, None, None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _validate(pred, target, err, probed, valid) -> None:
    for name, x in (("pred", pred), ("target", target), ("err", err)):
        if name == "err" and x is None:
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"weighted_rmse: {name} must be a floating-point tensor, got {got}")
    for name, x in (("probed", probed), ("valid", valid)):
        if name == "valid" and x is None:
            continue
        if not isinstance(x, Tensor) or x.dtype != torch.bool:
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"weighted_rmse: {name} must be a torch.bool tensor, got {got}")
    if pred.dim() < 1:
        raise ValueError("weighted_rmse: pred must have shape (..., L), got a 0-d tensor")
    for name, x in (("target", target), ("err", err), ("probed", probed), ("valid", valid)):
        if x is None:
            continue
        if x.shape != pred.shape:
            raise ValueError(f"weighted_rmse: {name} has shape {tuple(x.shape)}, pred has {tuple(pred.shape)}")
        if x.device != pred.device:
            raise ValueError(f"weighted_rmse: {name} is on {x.device} but pred is on {pred.device}")


def weighted_rmse(
    pred: Tensor,
    target: Tensor,
    err: Optional[Tensor],
    probed: Tensor,
    valid: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """The official weighted masked RMSE (SPEC.md section 4), a float32 scalar (float64 for float64
    pred on the torch backend).

    Args:
        pred: (..., L) reconstructed magnitudes (float32 or bfloat16 for the kernels; any float
            dtype on the torch backend). The only input that gets a gradient.
        target: (..., L) true magnitudes.
        err: (..., L) the original (un-centred) magnitude errors, or None (all weights 1).
        probed: (..., L) bool, the observations that enter the loss.
        valid: (..., L) bool, the observations (not padding) over which the 1/e min-max scaling is
            taken; None means ``probed``.
        backend: "cuda", "triton", "cpu", "torch", or None/"auto": ``$ASTROMER_FAST_BACKEND`` if
            set, else the fastest available for the tensors' device. float64 pred defaults to the
            ``torch`` backend (the kernels compute in float32).

    Windows without a probed observation are left out of the mean; with none at all the loss is 0
    (and so is its gradient).
    """
    _validate(pred, target, err, probed, valid)
    name = pick_backend("weighted_rmse", pred.device, pred.dtype, backend)
    if name == "torch":
        return weighted_rmse_reference(pred, target, err, probed, valid)

    f32 = torch.float32
    length = pred.shape[-1]
    if pred.dtype not in (f32, torch.bfloat16):
        pred = pred.to(f32)
    rows = math.prod(pred.shape[:-1])

    def flat(x):  # (rows, L) contiguous; a no-op for the usual (B, L) contiguous inputs
        if x is None:
            return None
        if x.dim() != 2:
            x = x.reshape(rows, length)
        return x.contiguous()

    def flat32(x):
        return flat(x if x is None or x.dtype == f32 else x.to(f32))

    need_grad = torch.is_grad_enabled() and pred.requires_grad
    loss, _, _ = _weighted_rmse_op(flat(pred), flat32(target), flat32(err), flat(probed),
                                   flat(valid), need_grad, name)
    return loss
