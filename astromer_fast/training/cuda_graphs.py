"""Training steps replayed from CUDA graphs (``TrainSettings(cuda_graphs=True)``, off by default).

A training step of this small model on a large GPU is bounded by kernel launches, not arithmetic.
Batches are cut to their longest window rounded up to 16, so a run sees a handful of shapes:
the forward, the loss and the backward of each shape are captured once into a
``torch.cuda.CUDAGraph`` with static input buffers, and replayed. Clipping and the optimizer stay
eager: the loop checks the loss and the gradient norm on the host before each update, and the
learning-rate schedule changes every step.

Any failure to capture (an op that synchronises with the host, an unsupported kernel) turns the
graphs off for the rest of the run, said once in the log; the steps then run eagerly. Not yet run
on a GPU: only the CPU fallback and the capture-safe loss are tested without one.
"""

from __future__ import annotations

import torch

# Warm-up runs on a side stream before a capture, as torch's documentation asks (cuBLAS
# workspaces, autograd's lazy state).
_WARMUP_RUNS = 3


def graph_safe_weighted_rmse(pred, target, err, probed, valid) -> torch.Tensor:
    """``weighted_rmse_reference`` without its boolean indexing, which waits for the host and so
    cannot be captured: windows without a probed observation count zero instead of dropping out."""
    from astromer_fast.kernels.weighted_rmse import error_weights

    dt = torch.promote_types(pred.dtype, torch.float32)
    w = error_weights(err, valid)
    p = probed.to(torch.float32)
    num = (w * p * (target.to(dt) - pred.to(dt)) ** 2).sum(-1)
    count = p.sum(-1)
    has = (count > 0).to(dt)
    mse = num / count.clamp_min(1)
    # 1e-12 as in the reference: a finite gradient at a perfect fit.
    return torch.sqrt((mse * has).sum() / has.sum().clamp_min(1) + 1e-12)


def cuda_graphs_unavailable(device, world: int) -> str | None:
    """Why training steps on ``device`` cannot be graphed, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, training runs on {device}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if world > 1:
        return "data-parallel runs reduce gradients in DDP's hooks, which are not captured here"
    return None


class GraphedSteps:
    """``step(batch)`` -> the loss, with the gradient left in the parameters' ``.grad``, like
    ``loss_fn(batch).backward()`` but replayed from one CUDA graph per batch shape.

    ``loss_fn(batch)`` must be capturable (no host synchronisation). The graphs share one memory
    pool: each replay rewrites its static inputs first and its outputs are read before any other
    graph runs, so one graph's temporaries overwriting another's buffers loses nothing.
    """

    def __init__(self, model, loss_fn, log=print):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_fn = loss_fn
        self.log = log
        self.graphs: dict = {}
        self.pool = None
        self.off_reason: str | None = None

    def step(self, b: dict) -> torch.Tensor:
        if self.off_reason is None:
            try:
                return self._replay(b)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                self.off_reason = f"{type(e).__name__}: {e}"
                self.graphs.clear()
                self.log(f"CUDA graphs off for the rest of the run, eager steps: {self.off_reason}")
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(b)
        loss.backward()
        return loss

    def _replay(self, b: dict) -> torch.Tensor:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(b.items()) if v is not None)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(b)
        graph, static, loss, grads = entry
        for k, v in static.items():
            v.copy_(b[k], non_blocking=True)
        graph.replay()
        # The loop sets .grad to None between steps; the graph writes into its own tensors.
        for p, g in zip(self.params, grads):
            p.grad = g
        return loss

    def _capture(self, b: dict):
        static = {k: v.clone() for k, v in b.items() if v is not None}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                for p in self.params:
                    p.grad = None
                self.loss_fn(static).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.loss_fn(static)
            loss.backward()
        self.pool = graph.pool()
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("a parameter got no gradient in the captured step")
        return graph, static, loss, grads
