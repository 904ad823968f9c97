"""Kernel backend selection.

Backends, fastest first:

* ``cuda``   - hand-written CUDA kernels in ``astromer_fast._C_cuda`` (CUDA tensors)
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
  which is how the tests run them without a GPU)
* ``cpu``    - C++ kernels in ``astromer_fast._C`` (CPU tensors)
* ``torch``  - plain PyTorch, any device and dtype; also the reference the others are tested against

``resolve_backend(device)`` picks the fastest one available for ``device``. The environment variable
``ASTROMER_FAST_BACKEND`` (or an explicit ``requested=``/``backend=`` argument, which wins) forces
one; forcing a backend that cannot run on that device raises ``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import os

import torch

from astromer_fast.kernels import _ext

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "ASTROMER_FAST_BACKEND"

_AUTO = ("", "auto", "default", "none")
_TRUTHY = ("1", "true", "yes", "on")

_triton_state: tuple[bool, str | None] | None = None

# What a CUDA tensor gets when no backend is asked for, per op: the fastest backend that passed its
# GPU tests in the H200 run of 2026-11-30 (bench/RESULTS.md). There the Triton input embedding ran
# at 10.6x eager and passed; torch's SDPA with the key mask beat both attention kernels (the CUDA
# kernel is scalar fp32, 0.06x SDPA bf16; the Triton kernel stalled beyond L = 1, not yet
# understood); the weighted-RMSE kernels ran but the run ended before their GPU tests, and the op
# is a negligible share of a training step, so the reference stays the default there.
# "sdpa" is torch.nn.functional.scaled_dot_product_attention with the rule's additive mask: an
# automatic choice only (forcing "torch" always gives the reference math, the test oracle).
CUDA_DEFAULTS = {"input_embedding": "triton", "masked_attention": "sdpa",
                 "weighted_rmse": "torch"}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run on the given device in this installation."""


def _triton_importable() -> tuple[bool, str | None]:
    global _triton_state
    if _triton_state is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_state = (True, None)
        except Exception as exc:  # ImportError, or a broken install raising something else
            _triton_state = (False, f"triton cannot be imported ({type(exc).__name__}: {exc})")
    return _triton_state


def triton_interpret_enabled() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def unavailable_reason(backend: str, device: torch.device | str | None) -> str | None:
    """None if ``backend`` can run on ``device``, else a human-readable reason."""
    device = _as_device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "torch":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        if _ext.cuda_ext() is None:
            return (
                "the CUDA extension astromer_fast._C_cuda is not available "
                f"({_ext.cuda_ext_error()}); it is built only when nvcc is found at install "
                "time (reinstall with ASTROMER_FAST_CUDA=1 to make that an error)"
            )
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        if _ext.cpu_ext() is None:
            return (
                "the C++ extension astromer_fast._C is not available "
                f"({_ext.cpu_ext_error()}); install the package (pip install .) to build it"
            )
        return None
    # triton
    ok, why = _triton_importable()
    if not ok:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpret_enabled():
            return None
        return "backend 'triton' runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return f"backend 'triton' does not support tensors on {device}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device``, fastest first."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def requested_backend(requested: str | None = None) -> str | None:
    """The explicitly requested backend (argument, else ``ASTROMER_FAST_BACKEND``), or None for auto."""
    if requested is None:
        requested = os.environ.get(ENV_VAR)
    if requested is None:
        return None
    name = str(requested).strip().lower()
    if name in _AUTO:
        return None
    if name not in BACKENDS:
        raise ValueError(
            f"unknown astromer_fast backend {requested!r}"
            + (f" (from ${ENV_VAR})" if requested == os.environ.get(ENV_VAR) else "")
            + f"; choose one of {', '.join(BACKENDS)} or 'auto'"
        )
    return name


def resolve_backend(device: torch.device | str | None, requested: str | None = None) -> str:
    """The backend to use for tensors on ``device``.

    ``requested`` (else ``$ASTROMER_FAST_BACKEND``) forces a backend; None/"auto" picks the fastest
    available one: on CUDA ``cuda`` > ``triton`` > ``torch``, on CPU ``cpu`` > ``torch``. The Triton
    interpreter is never chosen automatically: it is orders of magnitude slower than ``torch``.
    """
    device = _as_device(device)
    name = requested_backend(requested)
    if name is not None:
        why = unavailable_reason(name, device)
        if why is not None:
            raise BackendUnavailableError(f"astromer_fast backend {name!r} is unavailable: {why}")
        return name
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for cand in order:
        if unavailable_reason(cand, device) is None:
            return cand
    return "torch"


def pick_backend(op: str, device: torch.device | str | None, dtype: torch.dtype,
                 requested: str | None = None) -> str:
    """The backend one call of ``op`` runs on: the requested one (argument, else
    ``$ASTROMER_FAST_BACKEND``); else ``torch`` for float64 (the kernels compute in float32);
    else the per-op default on CUDA (``CUDA_DEFAULTS``, possibly the pseudo-backend ``"sdpa"``);
    else the fastest available for ``device``."""
    name = requested_backend(requested)
    if name is None and dtype == torch.float64:
        name = "torch"
    if name is None:
        name = op_default(op, device)
        if name == "sdpa":
            return name
    return resolve_backend(device, name)


def op_default(op: str, device: torch.device | str | None) -> str | None:
    """The per-op default for ``device`` (see ``CUDA_DEFAULTS``), or None for the generic order.
    Only consulted when no backend was requested (argument or environment)."""
    device = _as_device(device)
    if device.type != "cuda":
        return None
    name = CUDA_DEFAULTS.get(op)
    if name == "sdpa":
        return name
    return name if name is not None and unavailable_reason(name, device) is None else None
