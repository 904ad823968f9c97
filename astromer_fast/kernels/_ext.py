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
                mod = _from_installed_copy(name)
                hit = (mod, None) if mod is not None else (None, exc)
            if name == "_C" and hit[0] is not None:
                _choose_cpu_workers(hit[0])
                _limit_isa(hit[0])
            _cache[name] = hit
    return hit


def _from_installed_copy(name: str) -> ModuleType | None:
    """The compiled module of the installed distribution, when this package was imported from an
    unbuilt source tree that shadows it. That happens to Ray workers, which put the driver's
    working directory first on sys.path: run from a checkout, they would import the sources and
    silently fall back to other kernels (different rounding) from the driver. Only a
    distribution of the same version is used."""
    import importlib.util
    from importlib import metadata
    from pathlib import Path

    from astromer_fast import __version__

    try:
        dist = metadata.distribution("astromer-fast")
    except metadata.PackageNotFoundError:
        return None
    if dist.version != __version__:
        return None
    here = Path(__file__).resolve().parent.parent
    for f in dist.files or []:
        if len(f.parts) == 2 and f.parts[0] == "astromer_fast" and f.name.startswith(name + ".") \
                and f.suffix in (".so", ".pyd"):
            path = Path(f.locate()).resolve()
            if not path.is_file() or path.parent == here:
                continue
            try:
                spec = importlib.util.spec_from_file_location(f"astromer_fast.{name}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return mod
            except ImportError:
                return None
    return None


# ------------------------------------------------------------------------------------------------
# Where the C++ kernels' worker threads come from (csrc/cpu/parallel.h): torch's own OpenMP pool,
# so that they neither fight torch's workers, which spin for milliseconds after every GEMM, for
# the cores, nor start threads per call; or std::thread, when torch has no OpenMP pool to lend.
# ------------------------------------------------------------------------------------------------
CPU_WORKERS_ENV = "ASTROMER_FAST_CPU_WORKERS"
_cpu_workers: dict = {"workers": "threads", "runtime": None, "why": "the C++ extension is not loaded"}


def _libtorch_cpu_path() -> str | None:
    """The file of the libtorch_cpu this process loaded (Linux: from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if "/libtorch_cpu." in path:
                    return path
    except OSError:
        pass
    return None


def _choose_cpu_workers(ext: ModuleType) -> None:
    import os

    import torch  # noqa: F401  (its libraries, and so its OpenMP runtime, must be loaded first)

    want = os.environ.get(CPU_WORKERS_ENV, "").strip().lower() or "torch"
    if want not in ("torch", "threads"):
        raise ValueError(f"${CPU_WORKERS_ENV} must be 'torch' or 'threads', got {want!r}")
    if want == "threads":
        ext.detach_openmp()
        _cpu_workers.update(workers="threads", runtime=None, why=f"${CPU_WORKERS_ENV}=threads")
        return
    lib = _libtorch_cpu_path()
    try:
        if lib is None:
            raise RuntimeError("libtorch_cpu is not among this process's loaded libraries")
        runtime = ext.attach_openmp(lib)
        _cpu_workers.update(workers="torch", runtime=runtime, why=None)
    except (RuntimeError, AttributeError) as exc:  # no OpenMP in this torch build; old extension
        _cpu_workers.update(workers="threads", runtime=None,
                            why=f"torch's OpenMP pool cannot be used: {exc}")


ISA_ENV = "ASTROMER_FAST_CPU_ISA"


def _limit_isa(ext: ModuleType) -> None:
    """``$ASTROMER_FAST_CPU_ISA`` caps the vector instructions of the fused-block kernels
    (baseline, avx2, avx512, avx512_bf16); a level above the CPU's is an error, not ignored."""
    import os

    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want and hasattr(ext, "set_cpu_isa"):
        try:
            ext.set_cpu_isa(want)
        except ValueError as exc:
            raise ValueError(f"${ISA_ENV}={want!r}: {exc}") from None


def cpu_workers() -> dict:
    """Where the C++ kernels' worker threads come from: ``workers`` ("torch": torch's OpenMP
    pool, or "threads": std::thread), ``runtime`` (the OpenMP library) and ``why`` (why not torch's
    pool, or None)."""
    cpu_ext()
    return dict(_cpu_workers)


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


# ------------------------------------------------------------------------------------------------
# What the ops' kernel runners share: the extension or a RuntimeError that says why it is missing,
# and tensors as the raw addresses the raw-pointer bindings take.
# ------------------------------------------------------------------------------------------------
def require_cpu_ext() -> ModuleType:
    """``astromer_fast._C``, or RuntimeError with the reason it cannot be imported."""
    ext = cpu_ext()
    if ext is None:
        raise RuntimeError(f"astromer_fast._C is not available: {cpu_ext_error()}")
    return ext


def require_cuda_ext() -> ModuleType:
    """``astromer_fast._C_cuda``, or RuntimeError with the reason it cannot be imported."""
    ext = cuda_ext()
    if ext is None:
        raise RuntimeError(f"astromer_fast._C_cuda is not available: {cuda_ext_error()}")
    return ext


def ptr(x) -> int:
    """The tensor's data address for the bindings; 0 (a null pointer) for None."""
    return 0 if x is None else x.data_ptr()


def cuda_device_and_stream(x) -> tuple[int, int]:
    """(device index, current cudaStream_t as int) to launch a CUDA kernel on x's device."""
    import torch

    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return dev, torch.cuda.current_stream(x.device).cuda_stream
