"""Continue pretraining the packaged model for the minutes a GPU lease can spare, then measure it
on the held-out EROS-1 test split and update its model card with the total compute so far.

    python tools/continue_pretraining.py --minutes 6                      # on a GPU lease
    python tools/continue_pretraining.py --model-dir /tmp/copy --max-steps 3 --device cpu  # a test

What it does, in order:

1. Reads the model folder (default: the packaged ``astromer2-base`` of this checkout) and its
   ``training_log.json`` (created from the card's first run when absent).
2. Trains it with the recipe ``tools/recipe_study.py`` selected (``bench/recipe_study.json``;
   the study's baseline when absent) on the data kit's curves, EROS-1 test split left out,
   through the package's trainer (``astromer_fast.training.train``: the fused CPU path on a CPU,
   bf16 autocast on CUDA). A short probe measures steps/s so the cosine decay spans the budget.
   Optimizer state: the packaged model keeps none (it would double the package), so each lease
   starts Adam afresh with a short warm-up; ``--resume`` continues an interrupted run of this
   script exactly (weights, optimizer, schedule) from ``OUT/checkpoint``.
3. Compares the new weights with the old on the same validation windows (curves of the
   pretraining files, never the EROS-1 test split): the folder is updated only when the
   validation loss went down, so a lease can never make the model worse.
4. Measures probed RMSE/R² on the EROS-1 test split (``--f1``: also the few-label macro F1 at 20
   labels per class, r band), recomputes ``embedding_stats.safetensors`` for new weights, and
   rewrites the card's "Training so far" section and ``training_log.json`` (every session, total
   windows and device seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "astromer_fast" / "weights" / "models" / "astromer2-base"
LOG_NAME = "training_log.json"
CARD_START = "<!-- training-so-far: written by tools/continue_pretraining.py -->"
CARD_END = "<!-- end of training-so-far -->"

# The packaged model's first run (its card): one H200, bf16, 152 s of training.
FIRST_SESSION = {"date": "2026-11-30", "what": "pretraining from scratch (tools/train_default.py)",
                 "device": "NVIDIA H200", "train_seconds": 152.0, "steps": 4728,
                 "windows": 2405028, "heldout_r2": 0.092, "heldout_rmse": 0.2647, "kept": True}


def log(msg):
    print(msg, flush=True)


def selected_recipe() -> dict:
    path = REPO / "bench" / "recipe_study.json"
    if path.is_file():
        return json.loads(path.read_text())["selected"]
    return {"name": "baseline (no study found)", "lr": 1e-3, "warmup_windows": 6400,
            "batch_size": 128, "windows": "random", "curve_filter": "any", "probed_frac": 0.5}


def kit_files(data: Path, only=None) -> list:
    files = sorted(data.glob("*.parquet")) + sorted(data.glob("pretrain/*.parquet"))
    if only:
        files = [f for f in files if f.name in set(only)]
        if not files:
            raise SystemExit(f"none of {only} found in {data}")
    return files


def heldout_windows(path: Path, split: str):
    from astromer_fast.training import load_training_curves
    from astromer_fast.training.data import epoch_windows

    tbl = pq.read_table(path)
    tbl = tbl.filter(pc.equal(tbl["split"], split))
    test = load_training_curves(None, table=tbl, exclude_split=None, curve_filter=None)
    return epoch_windows(test.curves, 0), len(test)


def probe_rate(model, data, s, device, steps: int) -> float:
    """Training steps per second on this device (a throwaway copy of the model)."""
    from astromer_fast.training import train

    marks = []
    train(copy.deepcopy(model), data, None, None, device=device, log=None,
          settings=replace(s, max_steps=steps, val_every=10 ** 9, warmup_steps=1,
                           max_minutes=None),
          on_step=lambda st: marks.append(time.perf_counter()))
    skip = len(marks) // 3  # the first steps compile kernels and warm caches
    if len(marks) - skip < 2:
        return float("nan")
    return (len(marks) - 1 - skip) / max(marks[-1] - marks[skip], 1e-9)


def few_label_f1(model_dir: Path, data: Path, device) -> dict:
    """Macro F1 at 20 labels per class, EROS-1 r band, 3 folds, γ-weighted and features."""
    from astromer_fast.evaluation.run import EvalSettings, evaluate

    s = EvalSettings(spc=(20,), folds=3, figures=False, device=str(device))
    res = evaluate(str(data / "eros1.parquet"), "label", models=[str(model_dir)], bands=["r"],
                   settings=s, log=None)
    return {m: {"mean": v[20][0], "std": v[20][1]} for m, v in res.summary().items()}


def write_card(model_dir: Path, doc: dict):
    sessions = doc["sessions"]
    rows = ["| date | what | device | training s | windows | held-out R² | kept |",
            "|---|---|---|---|---|---|---|"]
    for x in sessions:
        r2 = x.get("heldout_r2")
        rows.append(f"| {x['date']} | {x['what']} | {x['device']} | {x['train_seconds']:.0f} | "
                    f"{x['windows']:,} | {'' if r2 is None else f'{r2:.3f}'} | "
                    f"{'yes' if x.get('kept') else 'no (validation loss not lower)'} |")
    cur = doc["current"]
    f1 = ""
    if cur.get("f1_20spc_r"):
        f1 = "; few-label macro F1 (EROS-1 r, 20 per class): " + ", ".join(
            f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in cur["f1_20spc_r"].items())
    section = f"""{CARD_START}
## Training so far

Total: **{doc['total_windows']:,} windows** in **{doc['total_train_seconds']:.0f} s** of training
over {len(sessions)} session(s) (`training_log.json`). Current weights: held-out EROS-1 test split
probed RMSE {cur['heldout_rmse']:.4f} mag, R² **{cur['heldout_r2']:.3f}**{f1}.

{chr(10).join(rows)}
{CARD_END}
"""
    card = model_dir / "README.md"
    text = card.read_text() if card.is_file() else f"# {model_dir.name}\n"
    if CARD_START in text:
        head, rest = text.split(CARD_START, 1)
        tail = rest.split(CARD_END, 1)[1] if CARD_END in rest else ""
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)


def main(argv=None):
    from astromer_fast.training import CurveFilter, TrainSettings, load_training_curves, train
    from astromer_fast.training.data import epoch_windows
    from astromer_fast.training.trainer import evaluate, uses_bf16
    from astromer_fast.weights import from_pretrained

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (wall clock)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="a step budget instead of the probe (tests)")
    p.add_argument("--model-dir", default=str(PACKAGED),
                   help="model folder to continue and update (default: the packaged model)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--files", nargs="*", default=None,
                   help="train on these file names of the kit only (default: all)")
    p.add_argument("--heldout", default=None, help="held-out Parquet (default DATA/eros1.parquet)")
    p.add_argument("--heldout-split", default="test")
    p.add_argument("--out", default="runs/continue_pretraining")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of this script from OUT/checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 512 on CUDA, the recipe's on the CPU")
    p.add_argument("--stats-curves", type=int, default=4000,
                   help="curves for the embedding statistics of new weights")
    p.add_argument("--f1", action="store_true",
                   help="also measure few-label macro F1 (EROS-1 r, 20 per class)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_begin = time.perf_counter()
    model_dir = Path(a.model_dir)
    data_dir = Path(a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    log_path = model_dir / LOG_NAME
    doc = (json.loads(log_path.read_text()) if log_path.is_file() else
           {"sessions": [FIRST_SESSION] if model_dir.resolve().name == "astromer2-base" else []})

    recipe = selected_recipe()
    batch = a.batch_size or (512 if device.type == "cuda" else int(recipe["batch_size"]))
    s = TrainSettings(batch_size=batch, lr=float(recipe["lr"]),
                      warmup_steps=max(1, int(recipe["warmup_windows"]) // batch),
                      probed_frac=float(recipe["probed_frac"]), val_fraction=0.03,
                      val_every=200, patience=None, checkpoint_every=1000, seed=len(doc["sessions"]))
    flt = None if recipe["curve_filter"] == "none" else CurveFilter(rule=recipe["curve_filter"])
    files = kit_files(data_dir, a.files)
    data = load_training_curves(files, exclude_split="test", curve_filter=flt, log=log)
    if recipe.get("windows") == "chunks":
        sys.path.insert(0, str(REPO / "tools"))
        from recipe_study import chunk_curves

        data = chunk_curves(data)
    tr, va = data.split(s.val_fraction, 0)  # the same validation curves every session
    val_w = epoch_windows(va.curves, 12345)
    bf16 = uses_bf16(s, device)

    start = from_pretrained(model_dir).to(device)
    before_val = evaluate(start, val_w, s, device, bf16)
    heldout_path = Path(a.heldout) if a.heldout else data_dir / "eros1.parquet"
    held_w, n_held = heldout_windows(heldout_path, a.heldout_split)

    if a.max_steps:
        steps = a.max_steps
    else:
        rate = probe_rate(start, tr, s, device, 30 if device.type == "cuda" else 6)
        left = a.minutes * 60 - (time.perf_counter() - t_begin)
        steps = max(10, int(rate * left * 0.9))  # validations take a few percent
        log(f"probe: {rate:.2f} steps/s; budget {steps} steps")
    s = replace(s, max_steps=steps, val_every=max(1, min(s.val_every, steps // 4 or 1)),
                max_minutes=None if a.max_steps else a.minutes * 1.5)
    t0 = time.perf_counter()
    res = train(start, tr, va, out, settings=s, resume=a.resume, device=device, log=log,
                metadata={"continued_from": str(model_dir), "recipe": recipe})
    train_seconds = time.perf_counter() - t0

    new = from_pretrained(out).to(device) if (out / "model.safetensors").is_file() else res.model
    after_val = evaluate(new, val_w, s, device, bf16)
    kept = after_val["loss"] < before_val["loss"]
    current = new if kept else from_pretrained(model_dir).to(device)
    held = evaluate(current, held_w, s, device, device.type == "cuda")
    session = {"date": time.strftime("%Y-%m-%d"), "what": f"continued, recipe {recipe['name']}",
               "device": (torch.cuda.get_device_name() if device.type == "cuda"
                          else platform.processor() or platform.machine()),
               "train_seconds": round(train_seconds, 1),
               "steps": res.history[-1]["step"] if res.history else 0,
               "windows": res.history[-1]["windows"] if res.history else 0,
               "settings": asdict(s), "val_loss_before": before_val["loss"],
               "val_loss_after": after_val["loss"], "heldout_r2": held["r2"],
               "heldout_rmse": held["rmse"], "kept": kept}
    if kept:
        meta = dict(new.pretrained_info.get("metadata", {}) if hasattr(new, "pretrained_info")
                    else {})
        meta["continued"] = {"sessions": len(doc["sessions"]) + 1,
                             "windows_total": sum(x["windows"] for x in doc["sessions"])
                             + session["windows"]}
        new.cpu().save_pretrained(model_dir, metadata=meta)
        sys.path.insert(0, str(REPO / "tools"))
        from embedding_stats import write_stats

        write_stats(model_dir, data_dir, a.stats_curves, seed=0, files=files)
    doc["sessions"].append(session)
    doc["total_windows"] = sum(x["windows"] for x in doc["sessions"])
    doc["total_train_seconds"] = round(sum(x["train_seconds"] for x in doc["sessions"]), 1)
    doc["current"] = {"heldout_r2": held["r2"], "heldout_rmse": held["rmse"],
                      "heldout": f"{heldout_path.name} split {a.heldout_split}, {n_held} curves"}
    if a.f1:
        doc["current"]["f1_20spc_r"] = few_label_f1(model_dir, data_dir, device)
    log_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_card(model_dir, doc)
    log(json.dumps({k: session[k] for k in ("train_seconds", "steps", "windows", "kept",
                                            "val_loss_before", "val_loss_after", "heldout_r2")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
