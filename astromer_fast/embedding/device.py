"""The device side of the embedding pipeline: batches of windows through the model, pooling and
the per-curve average on the device, so only the pooled floats come back to the host.

On the CPU: the fused encoder (``astromer_fast.model.fused_cpu``), in the precision asked for or the
CPU's default. On CUDA: in bf16 (unless ``precision="fp32"``: the plain model in float32) either
the fused GPU encoder (``model/fused_gpu.py``) or the plain model under autocast, as ``gpu_path``
decides, with fp32 pooling; pinned host memory, copies on a side stream into two alternating
buffers (``h2d.py``), and CUDA graphs: one graph per window-width bucket (widths rounded up to a multiple of 16, batches padded to the
batch size with fully hidden rows), so a replay costs one launch instead of ~100. Padding columns
and rows are hidden keys, which get exactly zero attention weight, so the buckets change nothing
but the cost. A capture that fails falls back to eager execution with a warning.
``ASTROMER_FAST_CUDA_GRAPHS=0`` turns graphs off; ``ASTROMER_FAST_SYNC_TIMINGS=1`` synchronises
around each stage so the per-stage timers are device times (costs some overlap).
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import torch

from astromer_fast.embedding.h2d import iter_batches
from astromer_fast.model import masked_mean


class Timers(dict):
    """Seconds spent per stage (summed over calls; safe to add from several threads)."""

    _lock = threading.Lock()

    def add(self, name, seconds):
        with self._lock:
            self[name] = self.get(name, 0.0) + seconds


class WindowEncoder:
    """Runs prepared windows (sorted by decreasing length, see ``stream.prepare``) through the
    model. Each batch is cut to its longest window: hidden keys get exactly zero attention weight
    (their -1e9 logit underflows to 0 after the softmax), so the trim is exact and a batch of
    short windows costs a fraction of 200 slots. Sorting by length makes the batches dense."""

    def __init__(self, model, device, batch_size: int = 256, layers: bool = False,
                 timers: Timers | None = None, cuda_graphs: bool | None = None,
                 precision: str | None = None):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.layers = layers
        self.cuda = self.device.type == "cuda"
        self.precision, self.fused = _choose_engine(model, self.device, precision)
        self.timers = timers if timers is not None else Timers()
        self.d = model.config.d_model
        self.n_layers = model.config.n_blocks + 1
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("ASTROMER_FAST_CUDA_GRAPHS", "1") != "0"
        self.graphs = _GraphCache(self) if (self.cuda and cuda_graphs) else None
        self.sync_timings = os.environ.get("ASTROMER_FAST_SYNC_TIMINGS") == "1"

    def _sync(self):
        if self.cuda and self.sync_timings:
            torch.cuda.synchronize(self.device)

    def pooled(self, t, m, valid):
        """Per-window embeddings (fp32) of one batch: (B, D), or (B, n_blocks + 1, D)."""
        if self.graphs is not None:
            e = self.graphs.run(t, m, valid)
            if e is not None:
                return e
        return self._pooled_eager(t, m, valid)

    def _pooled_eager(self, t, m, valid):
        if self.fused is not None:
            return self.fused(t, m, valid, layers=self.layers)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            out = self.model.encode(t, m, ~valid, return_layers=self.layers)
        # Pooling in fp32 whatever the compute dtype.
        if self.layers:
            return torch.stack([masked_mean(x.float(), valid) for x in out.layers], dim=1)
        return masked_mean(out.last.float(), valid)

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
        spans = [(s, min(s + self.batch_size, n_win)) for s in range(0, n_win, self.batch_size)]
        # Each batch cut to its longest window (sorted: its first).
        slices = [(slice(s, e_), max(int(lengths[s]), 1)) for s, e_ in spans]
        batches = iter_batches(chunk.tensors, ("t", "m", "valid"), slices, dev,
                               self.batch_size)
        for s, e_ in spans:
            t0 = time.perf_counter()
            b = next(batches)
            t, m, valid = b["t"], b["m"], b["valid"]
            self._sync()
            t1 = time.perf_counter()
            e = self.pooled(t, m, valid)
            self._sync()
            t2 = time.perf_counter()
            w = nvalid[s:e_].view(-1, *([1] * len(shape)))
            sums.index_add_(0, curve[s:e_], e * w)
            if per_window:
                win[s:e_] = e.cpu()
            self._sync()
            t3 = time.perf_counter()
            tm.add("transfer", t1 - t0)
            tm.add("model", t2 - t1)
            tm.add("pool", t3 - t2)
        batches.close()
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


def embedding_precision(device: torch.device, precision: str | None = None) -> str:
    """The precision ``embed`` runs in on ``device`` when asked for ``precision``."""
    from astromer_fast.model.fused_cpu import resolve_precision

    if device.type != "cpu":
        return "fp32" if precision == "fp32" else "bf16"
    return resolve_precision(precision)


def _choose_engine(model, device: torch.device, precision: str | None):
    """(precision, fused encoder or None). On the CPU the fused encoder runs whenever the
    model's shape allows it (else the plain model, under bf16 autocast for ``bf16``); on CUDA,
    in ``bf16`` the fused GPU encoder where ``gpu_path`` chooses it, else the plain model, under
    bf16 autocast unless ``fp32`` is asked for."""
    from astromer_fast.model.fused_cpu import (FusedCpuEncoder, fused_cpu_unsupported,
                                               resolve_precision)

    if device.type != "cpu":
        if precision not in (None, "auto", "fp32", "bf16"):
            resolve_precision(precision)  # raises, naming the choices
        precision = "fp32" if precision == "fp32" else "bf16"
        return precision, (_fused_gpu_encoder(model) if precision == "bf16" else None)
    precision = resolve_precision(precision)
    if fused_cpu_unsupported(model.config) is not None:
        return precision, None
    return precision, FusedCpuEncoder(model, precision)


def gpu_path(device: torch.device) -> dict:
    """How ``embed`` runs bf16 windows on ``device``: {"path": "fused" or "plain", "attention",
    "stages", "gemm", "source"}. ``$ASTROMER_FAST_GPU_PATH`` (fused, plain or auto) decides when set;
    else the calibrated choice for this GPU (``kernels/calibration.py``); else ``plain``, the
    model with ``backends.CUDA_DEFAULTS``."""
    from astromer_fast.model.fused_gpu import GPU_PATH_ENV, GPU_PATHS

    env = os.environ.get(GPU_PATH_ENV, "").strip().lower()
    if env not in ("", "auto") + GPU_PATHS:
        raise ValueError(f"${GPU_PATH_ENV}={env!r}: choose one of {GPU_PATHS} or 'auto'")
    if env in GPU_PATHS:
        return {"path": env, "attention": None, "stages": None, "gemm": None,
                "source": GPU_PATH_ENV}
    from astromer_fast.kernels.calibration import cached_choice

    choice = cached_choice(device)
    if choice:
        return {**choice, "source": "calibration"}
    return {"path": "plain", "attention": None, "stages": None, "gemm": None,
            "source": "fallback"}


def _fused_gpu_encoder(model):
    """The fused GPU encoder when ``gpu_path`` says so and the model's shape allows it, else None
    (the plain model). A fused encoder that cannot be built falls back with a warning."""
    from astromer_fast.model.fused_gpu import FusedGpuEncoder, fused_gpu_unsupported

    device = next(model.parameters()).device
    choice = gpu_path(device)
    if choice["path"] != "fused" or fused_gpu_unsupported(model.config) is not None:
        return None
    try:
        return FusedGpuEncoder(model, attention=choice["attention"], stages=choice["stages"],
                               gemm=choice.get("gemm"))
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"the fused GPU encoder cannot run ({e}); embedding with the plain model",
                      RuntimeWarning)
        return None


def pin(a: np.ndarray, cuda: bool) -> torch.Tensor:
    """A torch tensor over ``a`` (zero-copy); for a CUDA run, in pinned (page-locked) memory so
    the host-to-device copies can be asynchronous. Not yet measured on a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory() if cuda else t


class _GraphCache:
    """CUDA graphs of encode + pooling, one per width bucket, over static input buffers of
    ``batch_size`` rows. Built lazily; any failure disables graphs for this encoder (eager
    results are identical in meaning, only slower)."""

    BUCKET = 16

    def __init__(self, enc: WindowEncoder):
        self.enc = enc
        self.entries = {}
        self.failed = False

    def _width(self, width: int) -> int:
        full = self.enc.model.config.window
        return min(max(full, width), -(-width // self.BUCKET) * self.BUCKET)

    def _capture(self, width: int):
        enc, dev = self.enc, self.enc.device
        B = enc.batch_size
        st = torch.zeros((B, width), dtype=torch.float32, device=dev)
        sm = torch.zeros((B, width), dtype=torch.float32, device=dev)
        sv = torch.zeros((B, width), dtype=torch.bool, device=dev)
        sv[:, 0] = True  # warm-up on non-degenerate rows
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile / autotune / library handles outside the capture
                enc._pooled_eager(st, sm, sv)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = enc._pooled_eager(st, sm, sv)
        return graph, st, sm, sv, out

    def run(self, t, m, valid):
        if self.failed:
            return None
        n, width = t.shape
        if n > self.enc.batch_size:
            return None
        wb = self._width(width)
        try:
            entry = self.entries.get(wb)
            if entry is None:
                entry = self.entries[wb] = self._capture(wb)
            graph, st, sm, sv, out = entry
            st.zero_()
            sm.zero_()
            sv.zero_()
            st[:n, :width].copy_(t)
            sm[:n, :width].copy_(m)
            sv[:n, :width].copy_(valid)
            graph.replay()
            return out[:n].clone()
        except Exception as e:  # noqa: BLE001 - fall back to eager, loudly
            self.failed = True
            self.entries.clear()
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); "
                          "embedding continues without CUDA graphs", RuntimeWarning)
            return None
