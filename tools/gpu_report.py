"""Issue 15's goal table from one ``bench/gpu_check.sh`` run: each ratio, its goal, met or missed.

    python tools/gpu_report.py RESULTS        # RESULTS: results.tgz, or the folder it unpacks to

Reads what the script writes: ``fused_model_padded.json`` and ``fused_model_eros.json``
(``bench_model``: the default GPU path's row against eager bf16 SDPA and torch.compile
max-autotune bf16), ``bench_train.json`` (the fused training step against eager bf16 SDPA), the
cached ``calibration-*.json`` (what the default path is) and ``gpu.txt`` (the GPU). A quantity the
run did not reach is "not measured", never a guess. Prints Markdown for ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_ROW = "astromer_fast default GPU path (calibrated), CUDA graphs"
EAGER_BF16 = "PyTorch bf16 + SDPA"
COMPILED_BF16 = "torch.compile max-autotune bf16 + SDPA"
EMBED_GOALS = ((COMPILED_BF16, 1.5), (EAGER_BF16, 2.5))
TRAIN_REFERENCE = "plain model + SDPA (backend sdpa)"
TRAIN_CANDIDATES = ("fused training forward (gpu_path fused)", "fused + CUDA graphs (cuda_graphs)",
                    "astromer_fast default kernels")
TRAIN_GOAL = 1.5


def _json(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rate(rows: list[dict], variant: str, key: str) -> float | None:
    for r in rows:
        if r.get("variant") == variant and not r.get("error"):
            v = r.get(key)
            return float(v) if v is not None and math.isfinite(float(v)) and v > 0 else None
    return None


def _line(what: str, ours: float | None, base: float | None, goal: float, unit: str) -> str:
    if ours is None or base is None:
        return f"| {what} | {_fmt(ours)} | {_fmt(base)} | not measured | >= {goal}x | - |"
    ratio = ours / base
    return (f"| {what} | {ours:,.0f} {unit} | {base:,.0f} {unit} | {ratio:.2f}x | >= {goal}x | "
            f"{'met' if ratio >= goal else 'missed'} |")


def _fmt(x: float | None) -> str:
    return "not measured" if x is None else f"{x:,.0f}"


def report(folder: Path) -> str:
    """The Markdown report of the results under ``folder``."""
    out = []
    gpu = (folder / "gpu.txt").read_text().strip() if (folder / "gpu.txt").exists() else ""
    out.append(f"GPU: {gpu.splitlines()[1] if len(gpu.splitlines()) > 1 else 'unknown'}")
    cal = next(iter(sorted(folder.glob("calibration-*.json"))), None)
    if cal is not None:
        c = json.loads(cal.read_text())
        state = "" if c.get("complete", True) else " (first round only: the calibration stopped)"
        out.append(f"default GPU path (calibration): {c.get('candidate') or 'none passed'}{state}")
    else:
        out.append("default GPU path: no calibration cached (the plain path)")
    out += ["", "| quantity | ours | denominator | ratio | goal | |", "|---|---|---|---|---|---|"]
    for name, label in (("fused_model_padded.json", "200-padded"),
                        ("fused_model_eros.json", "EROS-1 real lengths")):
        rows = (_json(folder, name) or {}).get("rows", [])
        ours = _rate(rows, DEFAULT_ROW, "embed_windows_per_s")
        for base_name, goal in EMBED_GOALS:
            out.append(_line(f"embed, {label}, vs {base_name}", ours,
                             _rate(rows, base_name, "embed_windows_per_s"), goal, "windows/s"))
    train = (_json(folder, "bench_train.json") or {}).get("rows", [])
    base = _rate(train, TRAIN_REFERENCE, "windows_per_s")
    for name in TRAIN_CANDIDATES:
        out.append(_line(f"training step, {name}, vs eager bf16 SDPA",
                         _rate(train, name, "windows_per_s"), base, TRAIN_GOAL, "windows/s"))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.tgz from gpu_check.sh, or the folder it unpacks to")
    a = p.parse_args(argv)
    path = Path(a.results)
    if not path.exists():
        print(f"{path}: no such file or folder", file=sys.stderr)
        return 2
    if path.is_file():
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
            print(report(Path(tmp)))
    else:
        print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
