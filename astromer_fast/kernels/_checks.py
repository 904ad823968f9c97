"""Argument checks shared by the ops (input_embedding, masked_attention, weighted_rmse).

Each raises with the op's name first, so the messages read the same whichever op raised them.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor


def check_backend(op: str, backend: str, backends: Sequence[str]) -> None:
    if backend not in backends:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {backends}")


def check_float32(op: str, backend: str, named: Iterable[Tuple[str, Optional[Tensor]]]) -> None:
    """The compiled and Triton kernels read these (name, tensor) pairs as float32; None is skipped."""
    for name, x in named:
        if x is not None and x.dtype != torch.float32:
            raise TypeError(f"{op}: backend {backend!r} needs float32 {name}, got {x.dtype}")


def check_same_device(op: str, ref_name: str, ref: Tensor,
                      named: Iterable[Tuple[str, Optional[Tensor]]]) -> None:
    """Every (name, tensor) pair that is not None is on ``ref``'s device."""
    for name, x in named:
        if x is not None and x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")
