"""Lazy, failure-tolerant access to the compiled extensions.

``astromer_fast._C`` (CPU) and ``astromer_fast._C_cuda`` (CUDA) are optional at run time: a source
checkout without a build, or a wheel built without nvcc, must still work through the Triton and
PyTorch backends. A failed import is remembered (module -> None) together with the error, so that
forcing a backend can say *why* it is unavailable instead of a bare "not available".
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_lock = threading.Lock()
_cache: dict[str, tuple[ModuleType | None, BaseException | None]] = {}


def _load(name: str) -> tuple[ModuleType | None, BaseException | None]:
    hit = _cache.get(name)
    if hit is not None:
        return hit
    with _lock:
        hit = _cache.get(name)
        if hit is None:
            try:
                hit = (importlib.import_module(f"astromer_fast.{name}"), None)
            except ImportError as exc:  # missing file, or an unloadable one (ABI, libraries)
                hit = (None, exc)
            _cache[name] = hit
    return hit


def cpu_ext() -> ModuleType | None:
    """The ``astromer_fast._C`` module, or None if it cannot be imported."""
    return _load("_C")[0]


def cuda_ext() -> ModuleType | None:
    """The ``astromer_fast._C_cuda`` module, or None if it cannot be imported."""
    return _load("_C_cuda")[0]


def cpu_ext_error() -> BaseException | None:
    """Why ``astromer_fast._C`` could not be imported (None if it could)."""
    return _load("_C")[1]


def cuda_ext_error() -> BaseException | None:
    """Why ``astromer_fast._C_cuda`` could not be imported (None if it could)."""
    return _load("_C_cuda")[1]
