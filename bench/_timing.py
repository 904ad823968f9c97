"""Timing helpers shared by the benchmark scripts (bench/bench_*.py, run as scripts from the
repository root, so this module is importable as ``_timing``)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: torch.cuda.synchronize on CUDA, a no-op otherwise."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, sync, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (which also compiles)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
