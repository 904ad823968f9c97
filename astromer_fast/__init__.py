"""astromer_fast: a fast, faithful implementation of the Astromer 2 light-curve transformer."""

__version__ = "0.1.0"

from astromer_fast.model import Astromer, AstromerConfig  # noqa: E402
from astromer_fast.weights import (  # noqa: E402
    from_pretrained,
    load_model,
    load_official_checkpoint,
    save_pretrained,
)
from astromer_fast.embedding import Columns, Embedder, embed  # noqa: E402

__all__ = [
    "Astromer",
    "AstromerConfig",
    "Columns",
    "Embedder",
    "embed",
    "from_pretrained",
    "load_model",
    "load_official_checkpoint",
    "save_pretrained",
    "__version__",
]
