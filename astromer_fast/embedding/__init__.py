from astromer_fast.embedding.embed import EmbedSummary, embed, expand_inputs

__all__ = ["EmbedSummary", "embed", "expand_inputs"]
