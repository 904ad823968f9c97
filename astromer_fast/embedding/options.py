"""The options of ``embed`` checked once, up front, each failure naming the option: a bad value
must neither reach the data (``batch_size=-1`` once wrote all-zero embeddings) nor fail later
with a message that blames the input file."""

from __future__ import annotations

import numbers
import os

WINDOW_MODES = ("overlap", "nonoverlap")


def positive_int(name: str, value, *, optional: bool = False):
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_embedder_options(*, batch_size, window_mode, min_obs, bands, layers, per_window,
                           precision=None, standardize=False) -> list | None:
    """Check what ``BatchEmbedder`` takes (the device and columns apart); returns ``bands`` as a
    list."""
    from astromer_fast.embedding.standardize import standardize_method
    from astromer_fast.model.fused_cpu import resolve_precision

    positive_int("batch_size", batch_size)
    resolve_precision(precision)  # raises, naming the choices (and $ASTROMER_FAST_PRECISION)
    positive_int("min_obs", min_obs)
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {window_mode!r}")
    _flag("layers", layers)
    _flag("per_window", per_window)
    standardize_method(standardize)  # raises, naming the choices
    if bands is None:
        return None
    bands = [bands] if isinstance(bands, str) else bands
    try:
        bands = list(bands)
    except TypeError:
        raise ValueError(f"bands must be a band name or a list of them, got {bands!r}") from None
    if not bands or not all(isinstance(b, str) for b in bands):
        raise ValueError(f"bands must be a band name or a non-empty list of them, got {bands!r}")
    return bands


def check_run_options(*, read_batch_rows, long_batch_rows, prefetch, resume, continue_on_error,
                      progress, return_rejects) -> None:
    """Check the options of ``embed`` beyond ``BatchEmbedder``'s."""
    positive_int("read_batch_rows", read_batch_rows)
    positive_int("long_batch_rows", long_batch_rows, optional=True)
    positive_int("prefetch", prefetch)
    for name, value in (("resume", resume), ("continue_on_error", continue_on_error),
                        ("progress", progress), ("return_rejects", return_rejects)):
        _flag(name, value)


def resolve_device(device):
    """``device`` (None: CUDA when available, else the CPU) as a ``torch.device`` that exists
    on this machine."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a device; use 'cpu', 'cuda' or "
                         f"'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: embedding runs on 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible" + (
                       f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
                       if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
            raise ValueError(f"device {device!r}: {why}; use device 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
