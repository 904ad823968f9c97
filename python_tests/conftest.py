import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or ASTROMER_FAST_SHARED_DATA."""
    env = os.environ.get("ASTROMER_FAST_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real data not available: {d} is absent (set ASTROMER_FAST_SHARED_DATA)")
    return d
