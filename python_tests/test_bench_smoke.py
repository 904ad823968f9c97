"""The benchmark scripts still run (tiny sizes; their figures are not checked: benchmarks are
not timed tests). Each runs as a user runs it, from the repository root, in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, f"bench/{script}", *args, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_model_runs_every_cpu_variant(tmp_path):
    result, text = run("bench_model.py", "--device", "cpu", "--data", "random", "--windows", "6",
                       "--length", "40", "--batch", "3", "--rounds", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if r["error"]], rows
    assert "PyTorch bf16 + SDPA" in rows and "PyTorch fp32 + SDPA" in rows
    fused = [r for name, r in rows.items() if name.startswith("astromer_fast fused")]
    assert len(fused) == 2 and all(r["min_cos"] > 0.999 for r in fused)
    assert all(r["embed_windows_per_s"] > 0 and r["train_windows_per_s"] > 0 for r in fused)
    assert "vs bf16" in text


def test_bench_embed_runs_on_generated_curves(tmp_path):
    result, _ = run("bench_embed.py", "--device", "cpu", "--data", "generated", "--curves", "12",
                    "--min-len", "20", "--max-len", "300", "--repeats", "1",
                    "--naive-curves", "2", tmp_path=tmp_path)
    names = [r["what"] for r in result["rows"]]
    assert "model only, PyTorch bf16 + SDPA" in names and "model only, PyTorch fp32 + SDPA" in names
    assert result["curves"] == 12 and result["pipeline_over_pytorch_bf16_sdpa"] > 0


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "eros1.parquet").is_file(),
                    reason="shared data not available: ../shared/data/eros1.parquet is absent")
def test_bench_model_on_real_eros_windows(tmp_path):
    result, _ = run("bench_model.py", "--device", "cpu", "--data", "eros", "--windows", "8",
                    "--batch", "4", "--rounds", "1", "--no-train", "--skip", "explicit|C\\+\\+",
                    tmp_path=tmp_path)
    assert result["data"] == "eros" and result["windows"] == 8
    assert not [r for r in result["rows"] if r["error"]]


def test_bench_host_runs_both_host_paths(tmp_path):
    result, text = run("bench_host.py", "--curves", "300", "--python-curves", "200",
                       "--overhead-curves", "40", "--threads", "1,2", "--max-len", "120",
                       tmp_path=tmp_path)
    rows = result["rows"]
    kinds = {(r["what"], r["host"]) for r in rows}
    assert kinds == {("host", "python"), ("host", "cpp"), ("pipeline", "python"),
                     ("pipeline", "cpp"), ("overhead", "cpp")}, kinds
    host = [r for r in rows if r["what"] != "overhead"]
    assert all(r["obs_per_s_per_core"] > 0 and r["peak_rss_mb"] > 0 for r in host)
    assert {r["curves"] for r in rows if r["what"] == "host" and r["host"] == "cpp"} == {200, 300}
    assert "M obs/s/core" in text and "machine:" in text


def test_bench_train_runs_every_training_variant(tmp_path):
    result, text = run("bench_train.py", "--device", "cpu", "--steps", "2", "--warmup", "1",
                       "--batch-size", "8", "--blocks", "1", tmp_path=tmp_path)
    rows = {r["variant"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r], rows
    assert list(rows)[0] == "plain model + SDPA (backend sdpa)"
    assert "fused training forward (gpu_path fused)" in rows
    assert all(r["windows_per_s"] > 0 and r["ratio_vs_sdpa"] > 0 for r in rows.values())
    assert "vs sdpa" in text
