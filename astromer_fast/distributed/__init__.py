"""Embedding beyond one process, with the single-process code on every worker.

``astromer_fast.distributed.ray`` (``pip install 'astromer-fast[ray]'``): ``RayEmbedder`` for Ray
Data ``map_batches`` on GPU actor pools, and ``embed_files`` (``astromer-fast embed --engine
ray``). ``astromer_fast.distributed.dask`` (``pip install 'astromer-fast[dask]'``):
``embed_partition`` for ``map_partitions`` on (nested-)pandas and LSDB, and ``embed_files``.

Neither engine is imported here (nor anywhere in the core): the names below load their module on
first use, so ``import astromer_fast.distributed`` works without Ray or Dask installed.
"""

from __future__ import annotations

import importlib

from astromer_fast.distributed._core import combined_schema, split_rejects

_LAZY = {
    "RayEmbedder": ("ray", "RayEmbedder"),
    "embed_ray": ("ray", "embed_files"),
    "embed_dask": ("dask", "embed_files"),
    "embed_partition": ("dask", "embed_partition"),
    "partition_meta": ("dask", "partition_meta"),
    "embed_dataframe": ("dask", "embed_dataframe"),
    "embed_catalog": ("dask", "embed_catalog"),
}

__all__ = ["combined_schema", "split_rejects", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
