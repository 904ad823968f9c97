"""tools/gpu_report.py: issue 15's goal table from a gpu_check.sh run, on made-up results."""

import json
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import gpu_report  # noqa: E402


def write_results(folder: Path, with_eros: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu.txt").write_text("name, memory.total\nNVIDIA H200, 143771 MiB\n")
    (folder / "calibration-abc.json").write_text(json.dumps(
        {"candidate": "fused-mlp:triton:1", "complete": True}))
    rows = [{"variant": gpu_report.DEFAULT_ROW, "embed_windows_per_s": 300000.0, "error": None},
            {"variant": gpu_report.EAGER_BF16, "embed_windows_per_s": 100000.0, "error": None},
            {"variant": gpu_report.COMPILED_BF16, "embed_windows_per_s": 250000.0,
             "error": None}]
    (folder / "fused_model_padded.json").write_text(json.dumps({"rows": rows}))
    if with_eros:
        eros = [dict(r, embed_windows_per_s=r["embed_windows_per_s"] / 2) for r in rows[:2]]
        (folder / "fused_model_eros.json").write_text(json.dumps({"rows": eros}))
    train = [{"variant": gpu_report.TRAIN_REFERENCE, "windows_per_s": 20000.0},
             {"variant": gpu_report.TRAIN_CANDIDATES[0], "windows_per_s": 32000.0},
             {"variant": gpu_report.TRAIN_CANDIDATES[1], "error": "RuntimeError: capture"}]
    (folder / "bench_train.json").write_text(json.dumps({"rows": train}))


def test_report_states_each_ratio_met_missed_or_not_measured(tmp_path):
    write_results(tmp_path / "run")
    text = gpu_report.report(tmp_path / "run")
    lines = text.splitlines()
    assert "NVIDIA H200" in lines[0] and "fused-mlp:triton:1" in lines[1]
    padded = [ln for ln in lines if "200-padded" in ln]
    assert "1.20x | >= 1.5x | missed" in padded[0] and "3.00x | >= 2.5x | met" in padded[1]
    eros = [ln for ln in lines if "EROS-1" in ln]
    assert "not measured" in eros[0] and "3.00x | >= 2.5x | met" in eros[1]
    train = [ln for ln in lines if "training step" in ln]
    assert "1.60x | >= 1.5x | met" in train[0]
    assert "not measured" in train[1] and "not measured" in train[2]


def test_report_reads_the_tarball_and_says_when_files_are_missing(tmp_path, capsys):
    write_results(tmp_path / "run", with_eros=False)
    tgz = tmp_path / "results.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "run", arcname=".")
    assert gpu_report.main([str(tgz)]) == 0
    out = capsys.readouterr().out
    assert sum("not measured" in ln for ln in out.splitlines() if "EROS-1" in ln) == 2
    assert gpu_report.main([str(tmp_path / "absent")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no calibration cached" in gpu_report.report(empty)
