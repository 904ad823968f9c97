"""Models shipped inside the package, under ``astromer_fast/weights/models/<name>/``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "astromer2-base"


def packaged_models() -> list[str]:
    root = resources.files("astromer_fast.weights") / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def packaged_model_path(name: str | None) -> Path | None:
    """Directory of a packaged model, or None when ``name`` is not a packaged model's name.
    ``None`` means the default model; asking for it when none is shipped is an error."""
    from astromer_fast.weights.pretrained import WeightsError

    wanted = DEFAULT_MODEL if name is None else str(name)
    if wanted in packaged_models():
        return Path(str(resources.files("astromer_fast.weights") / "models" / wanted))
    if name is None:
        raise WeightsError(f"the default model {DEFAULT_MODEL!r} is not installed with this copy "
                           f"of astromer_fast; pass model=<directory or checkpoint>")
    return None
