"""Kernel backend selection.

Backends, fastest first:

* ``cuda``   - hand-written CUDA kernels in ``astromer_fast._C_cuda`` (CUDA tensors)
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
  which is how the tests run them without a GPU)
* ``cpu``    - C++ kernels in ``astromer_fast._C`` (CPU tensors)
* ``torch``  - plain PyTorch, any device and dtype; also the reference the others are tested against

and one name that is not a kernel library: ``sdpa`` - plain PyTorch, with the attention through
``torch.nn.functional.scaled_dot_product_attention`` and the mask rule's additive bias (the
other ops run their ``torch`` implementation). It is how SDPA is asked for, by argument or by
``$ASTROMER_FAST_BACKEND``, and the automatic attention on CUDA (``CUDA_DEFAULTS``).

``resolve_backend(device)`` picks the fastest one available for ``device``. The environment variable
``ASTROMER_FAST_BACKEND`` (or an explicit ``requested=``/``backend=`` argument, which wins) forces
one; forcing a backend that cannot run on that device raises ``BackendUnavailableError`` saying why.
"""

from __future__ import annotations

import os

import torch

from astromer_fast.kernels import _ext

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "torch")
SDPA = "sdpa"
ENV_VAR = "ASTROMER_FAST_BACKEND"

_AUTO = ("", "auto", "default", "none")
_TRUTHY = ("1", "true", "yes", "on")

_triton_state: tuple[bool, str | None] | None = None

# What a CUDA tensor gets when no backend is asked for, per op: the fastest implementation that
# passed its GPU tests (bench/RESULTS.md holds the runs). Attention goes through torch's SDPA
# because it beat both of our attention kernels there; the weighted RMSE keeps the reference
# because its kernels have not passed their GPU tests yet and the op is a negligible share of a
# training step. Forcing "torch" always gives the reference math, the test oracle.
CUDA_DEFAULTS = {"input_embedding": "triton", "masked_attention": SDPA,
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
    """The explicitly requested backend (argument, else ``ASTROMER_FAST_BACKEND``), or None for
    auto. ``"sdpa"`` is accepted (see the module docstring)."""
    if requested is None:
        requested = os.environ.get(ENV_VAR)
    if requested is None:
        return None
    name = str(requested).strip().lower()
    if name in _AUTO:
        return None
    if name not in BACKENDS + (SDPA,):
        raise ValueError(
            f"unknown astromer_fast backend {requested!r}"
            + (f" (from ${ENV_VAR})" if requested == os.environ.get(ENV_VAR) else "")
            + f"; choose one of {', '.join(BACKENDS + (SDPA,))} or 'auto'"
        )
    return name


def resolve_backend(device: torch.device | str | None, requested: str | None = None) -> str:
    """The kernel backend to use for tensors on ``device``.

    ``requested`` (else ``$ASTROMER_FAST_BACKEND``) forces a backend; None/"auto" picks the fastest
    available one: on CUDA ``cuda`` > ``triton`` > ``torch``, on CPU ``cpu`` > ``torch``. The Triton
    interpreter is never chosen automatically: it is orders of magnitude slower than ``torch``.
    ``"sdpa"`` resolves to ``torch`` here: only the attention op has an SDPA implementation, and
    :func:`pick_backend` gives it that.
    """
    device = _as_device(device)
    name = requested_backend(requested)
    if name == SDPA:
        return "torch"
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
    """The implementation one call of ``op`` runs: the requested one (argument, else
    ``$ASTROMER_FAST_BACKEND``); else ``torch`` for float64 (the kernels compute in float32);
    else the per-op default on CUDA (``CUDA_DEFAULTS``); else the fastest available for
    ``device``. ``"sdpa"`` is returned for ``masked_attention`` only (other ops: ``torch``)."""
    name = requested_backend(requested)
    if name is None and dtype == torch.float64:
        name = "torch"
    if name is None:
        name = op_default(op, device)
    if name == SDPA:
        return SDPA if op == "masked_attention" else "torch"
    return resolve_backend(device, name)


def op_default(op: str, device: torch.device | str | None) -> str | None:
    """The per-op default for ``device`` (see ``CUDA_DEFAULTS``), or None for the generic order.
    Only consulted when no backend was requested (argument or environment)."""
    device = _as_device(device)
    if device.type != "cuda":
        return None
    name = CUDA_DEFAULTS.get(op)
    if name == SDPA:
        return name
    return name if name is not None and unavailable_reason(name, device) is None else None
