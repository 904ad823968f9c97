"""Downstream evaluation: the paper's few-label classification protocol."""
