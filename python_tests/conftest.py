import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests that compare embeddings with the float32 model (by hand, across engines, across runs) pin
# the CPU precision to float32; the bfloat16 default is tested against float32, with its own
# tolerances, in test_fused_cpu.py.
os.environ.setdefault("ASTROMER_FAST_PRECISION", "fp32")
# A CUDA embed reads the cached GPU calibration but never starts one during the tests (a child
# process of its own, minutes on a fresh GPU); bench/gpu_check.sh calibrates before its tests.
os.environ.setdefault("ASTROMER_FAST_CALIBRATE", "0")


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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved random model for the tests that run many windows: 32 channels, one block."""
    import torch

    from astromer_fast import Astromer, AstromerConfig

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tiny")
    Astromer(AstromerConfig(n_blocks=1, d_model=32, n_heads=2, dff=64)).save_pretrained(d)
    return d


@pytest.fixture
def run_triton_interpreted(tmp_path):
    """Runs a test script in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton.jit
    runs, hence a subprocess) and returns the JSON value its last stdout line prints; the script
    gets this folder as sys.argv[1] to import the test module's helpers. Skips without triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable")

    def run(script: str):
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.pop("ASTROMER_FAST_BACKEND", None)
        here = os.path.dirname(os.path.abspath(__file__))
        # cwd outside the repository so the subprocess imports the same (installed) package as pytest.
        proc = subprocess.run([sys.executable, "-c", script, here], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
