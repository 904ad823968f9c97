"""The installed package, as users and CI get it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_unbuilt_source_tree_uses_the_installed_kernels():
    # Ray workers (and `python` started in the repo root) import the checkout's sources, which
    # hold no compiled module; they must still run the installed C++ kernels, or their results
    # differ in the last bits from the driver's.
    import astromer_fast

    if Path(astromer_fast.__file__).resolve().parent == REPO / "astromer_fast":
        pytest.skip("the package is installed from this tree (editable): nothing is shadowed")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import astromer_fast; "
            "from astromer_fast.kernels import _ext; print(astromer_fast.__file__); "
            "print(_ext.cpu_ext() is not None, _ext.cpu_ext_error())")
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    where, ok = r.stdout.strip().splitlines()
    assert Path(where).resolve().parent == REPO / "astromer_fast"
    assert ok.startswith("True"), ok
