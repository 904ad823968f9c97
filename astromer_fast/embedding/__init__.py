"""Embedding light curves: ``Embedder`` (numpy arrays in, numpy out) and ``embed`` (Parquet or
Arrow in, Parquet or Arrow out), one pipeline behind both."""

from astromer_fast.embedding.embed import REJECTS_SCHEMA, EmbedSummary, embed, expand_inputs
from astromer_fast.embedding.columns import Columns
from astromer_fast.embedding.embedder import Embedder
from astromer_fast.embedding.stream import InputFileError

__all__ = ["REJECTS_SCHEMA", "Columns", "EmbedSummary", "Embedder", "InputFileError", "embed",
           "expand_inputs"]
