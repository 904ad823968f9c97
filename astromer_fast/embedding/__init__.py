"""Survey-scale embedding of light curves: ``embed`` (Parquet or Arrow in, Parquet or Arrow out)."""

from astromer_fast.embedding.embed import REJECTS_SCHEMA, EmbedSummary, embed, expand_inputs
from astromer_fast.embedding.stream import InputFileError

__all__ = ["REJECTS_SCHEMA", "EmbedSummary", "InputFileError", "embed", "expand_inputs"]
