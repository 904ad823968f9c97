"""The official pretraining loss and metrics, in plain PyTorch (the reference the kernels match).

SPEC section 4: ``mse_b = sum_l w_bl p_bl (y_bl - yhat_bl)^2 / sum_l p_bl``, ``loss = sqrt(mean_b
mse_b)`` with ``w = minmax_over_window(1/e) + 1e-3`` computed from the original (un-centred) errors.
"""

from __future__ import annotations

import torch


def error_weights(err: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Per-observation weights: 1/e min-max scaled over each window's valid observations, + 1e-3.

    Guards the official formula's two NaN cases: a non-positive error (cleaning removes them; here
    it is clamped so 1/e stays finite) and a window whose errors are all equal (max == min), which
    gets uniform weight 1. Without errors every weight is 1.
    """
    if err is None:
        return valid.to(torch.float32)
    inv = 1.0 / err.float().clamp_min(1e-8)
    big = torch.finfo(inv.dtype).max
    lo = torch.where(valid, inv, big).amin(-1, keepdim=True)
    hi = torch.where(valid, inv, -big).amax(-1, keepdim=True)
    span = hi - lo
    flat = span <= 0
    w = torch.where(flat, torch.ones_like(inv), (inv - lo) / torch.where(flat, 1.0, span) + 1e-3)
    return w * valid


def weighted_rmse(pred, target, err, probed, valid=None) -> torch.Tensor:
    """The official weighted masked RMSE; windows without a probed observation are left out of the
    mean (0 when no window has one), so the loss is always finite."""
    valid = probed if valid is None else valid
    w = error_weights(err, valid)
    p = probed.to(torch.float32)
    num = (w * p * (target.float() - pred.float()) ** 2).sum(-1)
    count = p.sum(-1)
    has = count > 0
    mse = num[has] / count[has]
    if mse.numel() == 0:
        return (pred.float() * 0).sum()
    # 1e-12 keeps the gradient finite at a perfect fit (d sqrt(x)/dx is infinite at 0).
    return torch.sqrt(mse.mean() + 1e-12)


@torch.no_grad()
def probed_metrics(pred, target, probed) -> dict:
    """Unweighted RMSE and R² over all probed observations of a batch (pooled, as logged)."""
    y = target.float()[probed]
    yh = pred.float()[probed]
    if y.numel() == 0:
        return {"rmse": float("nan"), "r2": float("nan"), "n": 0}
    ss_res = ((y - yh) ** 2).sum()
    ss_tot = ((y - y.mean()) ** 2).sum()
    return {"rmse": float(torch.sqrt(ss_res / y.numel())),
            "r2": float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan"), "n": int(y.numel())}
