"""Timing helpers shared by the benchmark scripts (bench/bench_*.py, run as scripts from the
repository root, so this module is importable as ``_timing``)."""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import threading
import time
import traceback
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


def timed_median(fn, device: torch.device, repeats: int, warmup: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds per call of ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is bracketed by CUDA events on the current stream (device time of exactly
    that call, launch overheads included because the stream idles while Python enqueues); on the
    CPU by ``clock`` (wall time; ``time.process_time`` gives this process's CPU seconds, which a
    single-threaded run on a shared machine measures without the time other jobs take). The
    median, not the best, because other processes share the machine."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


class TimeLimit(Exception):
    """Raised inside the guarded block when its time limit runs out."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raises TimeLimit in the main thread after ``seconds`` (SIGALRM; a no-op elsewhere or when
    seconds is falsy). Meant for torch.compile, whose compile time is not bounded otherwise."""
    if not seconds or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TimeLimit(f"time limit of {seconds:.0f} s exceeded")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def environ(env: dict | None):
    """Environment variables set for the duration, then restored (None: nothing changes)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failure_text(exc: BaseException) -> str:
    """One line for a table cell / JSON field: the exception and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:300]}{where}"
