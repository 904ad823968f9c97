"""tools/continue_pretraining.py on the CPU with a few steps, always into a temporary copy (the
packaged model is never modified by a test)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astromer_fast.embedding.standardize import STATS_NAME, load_stats
from astromer_fast.weights import from_pretrained
from astromer_fast.weights.pretrained import file_sha256

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def kit_table(n, seed, split=None):
    rng = np.random.default_rng(seed)
    rows = {"id": [], "band": [], "label": [], "split": [], "lightcurve": []}
    for i in range(n):
        t = np.sort(rng.uniform(0, 400, 80)) + 50000
        m = 17 + rng.uniform(0.2, 1) * np.sin(2 * np.pi * t / rng.uniform(0.3, 50)) \
            + 0.05 * rng.normal(size=80)
        rows["id"].append(f"o{i}")
        rows["band"].append("r")
        rows["label"].append("x")
        rows["split"].append(split or ("test" if i % 4 == 0 else "train"))
        rows["lightcurve"].append([{"time": float(a), "mag": float(b), "magerr": 0.05}
                                   for a, b in zip(t, m)])
    return pa.table(rows)


@pytest.fixture
def kit(tmp_path):
    d = tmp_path / "data"
    (d / "pretrain").mkdir(parents=True)
    pq.write_table(kit_table(80, 0), d / "eros1.parquet")
    pq.write_table(kit_table(120, 1, split="all"), d / "pretrain" / "more.parquet")
    return d


def run(model_dir, data, out, *extra):
    from continue_pretraining import main

    return main(["--model-dir", str(model_dir), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--max-steps", "3", "--batch-size", "16",
                 "--stats-curves", "24", *extra])


def test_continue_a_copy_twice_and_account_for_compute(kit, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "README.md").write_text("# tiny\n\nA card.\n")
    before = file_sha256(model_dir / "model.safetensors")
    assert run(model_dir, kit, tmp_path / "out1") == 0
    doc = json.loads((model_dir / "training_log.json").read_text())
    (s,) = doc["sessions"]
    # 3 batches of at most 16 (batches group similar lengths, so some are short)
    assert s["steps"] == 3 and 3 <= s["windows"] <= 48 and s["train_seconds"] > 0
    assert doc["total_windows"] == s["windows"]
    assert np.isfinite(doc["current"]["heldout_r2"])
    changed = file_sha256(model_dir / "model.safetensors") != before
    assert changed == s["kept"] == (s["val_loss_after"] < s["val_loss_before"])
    if changed:  # new weights come with statistics of their own
        load_stats(from_pretrained(model_dir))
    card = (model_dir / "README.md").read_text()
    assert card.startswith("# tiny") and "## Training so far" in card
    assert f"{s['windows']:,} windows" in card

    assert run(model_dir, kit, tmp_path / "out2") == 0
    doc = json.loads((model_dir / "training_log.json").read_text())
    total = sum(x["windows"] for x in doc["sessions"])
    assert len(doc["sessions"]) == 2 and doc["total_windows"] == total
    card = (model_dir / "README.md").read_text()
    assert card.count("## Training so far") == 1 and f"{total:,} windows" in card


def test_continue_the_packaged_model_on_real_data(shared_data, tmp_path):
    from astromer_fast.weights.packaged import packaged_model_path

    if not (shared_data / "eros1.parquet").is_file():
        pytest.skip("eros1.parquet is absent")
    packaged = packaged_model_path(None)
    sha = file_sha256(packaged / "model.safetensors")
    model_dir = tmp_path / "astromer2-base"   # a copy: the packaged folder stays as shipped
    shutil.copytree(packaged, model_dir)
    assert run(model_dir, shared_data, tmp_path / "out", "--files", "macho.parquet",
               "--stats-curves", "16", "--threads", "1") == 0
    doc = json.loads((model_dir / "training_log.json").read_text())
    first, new = doc["sessions"]
    assert first["device"] == "NVIDIA H200" and 3 <= new["windows"] <= 48
    assert doc["total_windows"] == first["windows"] + new["windows"]
    assert doc["current"]["heldout"].startswith("eros1.parquet split test, 1458 curves")
    assert file_sha256(packaged / "model.safetensors") == sha
    if new["kept"]:
        load_stats(from_pretrained(model_dir))
    assert (model_dir / STATS_NAME).is_file()
