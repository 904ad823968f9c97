"""The device side of the embedding pipeline: batches of windows through the model, pooling and
the per-curve average on the device, so only the pooled floats come back to the host.

GPU paths (bf16 autocast with fp32 pooling, pinned host memory, non-blocking copies) are written
for CUDA but **not yet measured on a GPU**; the CPU path is what the tests and the CPU benchmark
exercise. CUDA graphs are not used yet (every batch is cut to its own longest window, so shapes
vary; a graph per width bucket is the next step).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from astromer_fast.model import masked_mean


class Timers(dict):
    """Seconds spent per stage (summed over calls)."""

    def add(self, name, seconds):
        self[name] = self.get(name, 0.0) + seconds


class WindowEncoder:
    """Runs prepared windows (sorted by decreasing length, see ``stream.prepare``) through the
    model. Each batch is cut to its longest window: hidden keys get exactly zero attention weight
    (their -1e9 logit underflows to 0 after the softmax), so the trim is exact and a batch of
    short windows costs a fraction of 200 slots. Sorting by length makes the batches dense."""

    def __init__(self, model, device, batch_size: int = 256, layers: bool = False,
                 timers: Timers | None = None):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.layers = layers
        self.cuda = self.device.type == "cuda"
        self.timers = timers if timers is not None else Timers()
        self.d = model.config.d_model
        self.n_layers = model.config.n_blocks + 1

    def _sync(self):
        if self.cuda:  # only for honest stage timings; costs a little overlap on the GPU
            torch.cuda.synchronize(self.device)

    def _to_device(self, a, sl):
        x = a[sl]
        if self.cuda:
            return x.to(self.device, non_blocking=True)
        return x

    @torch.inference_mode()
    def run(self, chunk, per_window: bool = False):
        """Embeddings of one prepared chunk.

        Returns ``(curve_emb, curve_layers, win_emb, win_layers)`` as numpy float32:
        ``curve_emb`` (n_curves, D) is the per-curve average of window embeddings weighted by the
        windows' valid counts (rows of curves without windows are zero and unused);
        ``curve_layers`` (n_curves, n_blocks + 1, D) the same for every layer when ``layers``;
        with ``per_window``, ``win_emb`` / ``win_layers`` per window in the chunk's sorted order.
        """
        n_win, n_cur = chunk.n_windows, chunk.n_curves
        dev = self.device
        shape = (self.n_layers, self.d) if self.layers else (self.d,)
        sums = torch.zeros((n_cur, *shape), dtype=torch.float32, device=dev)
        curve = chunk.tensors["curve"].to(dev, non_blocking=self.cuda)
        nvalid = chunk.tensors["n_valid"].to(dev, non_blocking=self.cuda).float()
        win = torch.empty((n_win, *shape), dtype=torch.float32) if per_window else None
        lengths = chunk.n_valid_sorted
        tm = self.timers
        for s in range(0, n_win, self.batch_size):
            e_ = min(s + self.batch_size, n_win)
            width = max(int(lengths[s]), 1)  # sorted: the first is the longest
            sl = (slice(s, e_), slice(0, width))
            t0 = time.perf_counter()
            t = self._to_device(chunk.tensors["t"], sl)
            m = self._to_device(chunk.tensors["m"], sl)
            valid = self._to_device(chunk.tensors["valid"], sl)
            self._sync()
            t1 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cuda):
                out = self.model.encode(t, m, ~valid, return_layers=self.layers)
            self._sync()
            t2 = time.perf_counter()
            # Pooling in fp32 whatever the compute dtype.
            if self.layers:
                e = torch.stack([masked_mean(x.float(), valid) for x in out.layers], dim=1)
            else:
                e = masked_mean(out.last.float(), valid)
            w = nvalid[s:e_].view(-1, *([1] * len(shape)))
            sums.index_add_(0, curve[s:e_], e * w)
            if per_window:
                win[s:e_] = e.cpu()
            self._sync()
            t3 = time.perf_counter()
            tm.add("transfer", t1 - t0)
            tm.add("model", t2 - t1)
            tm.add("pool", t3 - t2)
        t0 = time.perf_counter()
        total = torch.zeros(n_cur, dtype=torch.float32, device=dev)
        total.index_add_(0, curve, nvalid)
        emb = sums / total.clamp_min(1).view(-1, *([1] * len(shape)))
        emb = emb.cpu().numpy()
        tm.add("transfer", time.perf_counter() - t0)
        win_np = None if win is None else win.numpy()
        if self.layers:
            return emb[:, -1], emb, (None if win_np is None else win_np[:, -1]), win_np
        return emb, None, win_np, None


def pin(a: np.ndarray, cuda: bool) -> torch.Tensor:
    """A torch tensor over ``a`` (zero-copy); for a CUDA run, in pinned (page-locked) memory so
    the host-to-device copies can be asynchronous. Not yet measured on a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory() if cuda else t
