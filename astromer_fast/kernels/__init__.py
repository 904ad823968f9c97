"""Fused kernels of astromer_fast, with backend selection (cuda / triton / cpu / torch).

The compiled extensions and Triton are loaded lazily: importing this package never fails because
one of them is missing; asking for an unavailable backend explains what is missing.
"""

from astromer_fast.kernels.backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    resolve_backend,
)
from astromer_fast.kernels.input_embedding import input_embedding, input_embedding_reference
from astromer_fast.kernels.masked_attention import masked_attention, masked_attention_reference
from astromer_fast.kernels.weighted_rmse import weighted_rmse, weighted_rmse_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "input_embedding",
    "input_embedding_reference",
    "masked_attention",
    "masked_attention_reference",
    "resolve_backend",
    "weighted_rmse",
    "weighted_rmse_reference",
]
