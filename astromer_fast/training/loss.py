"""The official pretraining loss and metrics (SPEC.md section 4).

``weighted_rmse`` is the fused op of :mod:`astromer_fast.kernels.weighted_rmse` (the one dispatch
point: C++ / CUDA / Triton kernels, or the plain PyTorch reference with ``backend="torch"`` or
``ASTROMER_FAST_BACKEND=torch``). ``error_weights`` and ``weighted_rmse_reference`` are the plain
PyTorch definitions the kernels are tested against; they are re-exported here so that existing
imports keep working.

``mse_b = sum_l w_bl p_bl (y_bl - yhat_bl)^2 / sum_l p_bl``, ``loss = sqrt(mean_b mse_b)`` with
``w = minmax_over_window(1/e) + 1e-3`` computed from the original (un-centred) errors.
"""

from __future__ import annotations

import torch

from astromer_fast.kernels.weighted_rmse import error_weights, weighted_rmse, weighted_rmse_reference

__all__ = ["error_weights", "probed_metrics", "weighted_rmse", "weighted_rmse_reference"]


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
