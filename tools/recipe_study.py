"""Which pretraining recipe buys the most held-out reconstruction per unit of compute?

A reduced-scale study, run on the CPU before any GPU time is spent: 2-block Astromer 2 models
(the base model's width, a third of its depth) trained from scratch through the package's own
loop (``astromer_fast.training.train``, the fused CPU path) on the pretraining curves of the data
kit (EROS-1 test split left out), each recipe differing from a baseline in one knob: peak learning
rate, warm-up, batch size, window sampling, curve filter, masking. Every run gets the same budget
of training windows, so the compute is nearly equal; its CPU time is measured and reported too.
The score is the probed R² on the EROS-1 test split (never trained on), and R² per CPU-minute.

    nice python tools/recipe_study.py --data ../shared/data --windows 60000 --out runs/recipe

writes ``bench/RECIPE_STUDY.md`` (the table, the selected recipe) and
``bench/recipe_study_curves.png`` (validation R² against windows seen, every recipe), and
``OUT/results.json``. One thread: the machine this was made for is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from astromer_fast import Astromer, AstromerConfig
from astromer_fast.data import Curves
from astromer_fast.data.preprocess import offsets_from_lengths
from astromer_fast.training import CurveFilter, TrainSettings, load_training_curves, train
from astromer_fast.training.data import TrainingCurves, epoch_windows, filter_mask
from astromer_fast.training.trainer import evaluate

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Recipe:
    """What a run varies; everything else is TrainSettings' defaults."""

    name: str
    lr: float = 1e-3
    warmup_windows: int = 6400        # warm-up measured in windows, so batch sizes compare
    batch_size: int = 128
    windows: str = "random"           # "random": one random window per curve per epoch;
    #                                   "chunks": every 200-observation piece of a curve is a
    #                                   curve of its own (long curves weigh more)
    curve_filter: str = "any"         # the paper filter's rule, or "none"
    probed_frac: float = 0.5
    curriculum_probed: float | None = None   # first half of the budget at this probed fraction
    note: str = ""
    extra: dict = field(default_factory=dict)


BASELINE = Recipe("baseline", note="TrainSettings defaults (lr 1e-3), batch 128")
RECIPES = [
    BASELINE,
    replace(BASELINE, name="lr 5e-4", lr=5e-4, note="half the peak learning rate"),
    replace(BASELINE, name="lr 2e-3", lr=2e-3, note="twice the peak learning rate"),
    replace(BASELINE, name="warm-up ÷4", warmup_windows=1600, note="a quarter of the warm-up"),
    replace(BASELINE, name="batch 64", batch_size=64, note="twice the steps, same windows"),
    replace(BASELINE, name="batch 256", batch_size=256, note="half the steps, same windows"),
    replace(BASELINE, name="chunked windows", windows="chunks",
            note="every 200-observation piece of a curve sampled, not one random window"),
    replace(BASELINE, name="no curve filter", curve_filter="none",
            note="noise-like curves kept"),
    replace(BASELINE, name="probed 30% → 50%", curriculum_probed=0.3,
            note="first half of the budget at 30% probed, then 50%"),
]


def chunk_curves(data: TrainingCurves, window: int = 200) -> TrainingCurves:
    """Each curve of n observations cut into max(1, n // window) consecutive pieces of nearly
    equal length, every piece a training curve of its own: a 1,200-observation MACHO curve then
    gives six windows per epoch instead of one."""
    c = data.curves
    pieces, owner = [], []
    for i, n in enumerate(c.lengths):
        k = max(1, int(n) // window)
        sizes = np.full(k, n // k)
        sizes[: n - sizes.sum()] += 1
        pieces.append(sizes)
        owner.append(np.full(k, i))
    lengths = np.concatenate(pieces).astype(np.int64)
    owner = np.concatenate(owner)
    curves = Curves(c.time, c.mag, c.err, offsets_from_lengths(lengths))
    return TrainingCurves(curves, data.ids[owner], data.sources[owner], data.files,
                          dict(data.counts, chunks=len(lengths)))


def held_out_windows(data_dir: Path):
    tbl = pq.read_table(data_dir / "eros1.parquet")
    tbl = tbl.filter(pc.equal(tbl["split"], "test"))
    test = load_training_curves(None, table=tbl, exclude_split=None, curve_filter=None)
    return epoch_windows(test.curves, 0), len(test)


def run_recipe(r: Recipe, data_any, data_none, val, held, a, log):
    data = data_none if r.curve_filter == "none" else data_any
    if r.windows == "chunks":
        data = chunk_curves(data)
    steps = max(1, a.windows // r.batch_size)
    warm = max(1, r.warmup_windows // r.batch_size)
    val_every = max(1, steps // a.validations)
    base = TrainSettings(batch_size=r.batch_size, lr=r.lr, warmup_steps=warm, max_steps=steps,
                         val_every=val_every, patience=None, checkpoint_every=10 ** 9,
                         seed=a.seed, probed_frac=r.probed_frac, val_max_windows=a.val_windows)
    torch.manual_seed(a.seed)
    model = Astromer(AstromerConfig.astromer2(n_blocks=a.blocks))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    history = []
    if r.curriculum_probed is not None:
        first = replace(base, max_steps=steps // 2, probed_frac=r.curriculum_probed)
        res = train(model, data, val, None, settings=first, log=None)
        history += res.history
        # The second phase continues the same weights with a fresh optimizer, no second warm-up
        # and the rest of the cosine: the trainer's public entry point, not a patched loop.
        # At half-way the cosine stands at (0.1 + 0.9 / 2) of the peak; the second phase decays
        # from there to the same floor as a one-phase run.
        mid = base.min_lr_ratio + (1 - base.min_lr_ratio) / 2
        second = replace(base, max_steps=steps - steps // 2, warmup_steps=0, seed=a.seed + 1,
                         lr=base.lr * mid, min_lr_ratio=base.min_lr_ratio / mid)
        res = train(res.model, data, val, None, settings=second, log=None)
        done = history[-1]["windows"] if history else 0
        history += [dict(row, step=row["step"] + steps // 2, windows=row["windows"] + done)
                    for row in res.history]
    else:
        res = train(model, data, val, None, settings=base, log=None)
        history = res.history
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    dev = torch.device("cpu")
    met = evaluate(res.model, held, replace(base, probed_frac=0.5), dev, False)
    out = dict(recipe=asdict(r), steps=steps, warmup_steps=warm, cpu_s=round(cpu, 1),
               wall_s=round(wall, 1), windows=history[-1]["windows"] if history else 0,
               heldout_r2=met["r2"], heldout_rmse=met["rmse"], heldout_loss=met["loss"],
               val_r2=history[-1].get("val_r2") if history else None,
               r2_per_cpu_min=met["r2"] / max(cpu / 60, 1e-9),
               history=[{k: row.get(k) for k in ("step", "windows", "train_loss", "val_loss",
                                                 "val_r2")} for row in history])
    log(f"{r.name:<22} held-out R² {met['r2']:+.4f}  RMSE {met['rmse']:.4f}  "
        f"cpu {cpu:.0f} s  wall {wall:.0f} s")
    return out


def select(results):
    """Best held-out R²; a recipe within 0.005 of it that took less CPU wins (per unit of
    compute)."""
    best = max(results, key=lambda x: x["heldout_r2"])
    close = [x for x in results if x["heldout_r2"] >= best["heldout_r2"] - 0.005]
    return min(close, key=lambda x: x["cpu_s"])


def write_report(results, chosen, a, meta, png):
    rows = []
    for x in sorted(results, key=lambda x: -x["heldout_r2"]):
        r = x["recipe"]
        rows.append(f"| {r['name']}{' **(selected)**' if x is chosen else ''} | {r['note']} | "
                    f"{x['steps']} | {x['cpu_s']:.0f} | {x['heldout_r2']:+.4f} | "
                    f"{x['heldout_rmse']:.4f} | {x['val_r2'] if x['val_r2'] is None else round(x['val_r2'], 4)} | "
                    f"{x['r2_per_cpu_min']:+.4f} |")
    c = chosen["recipe"]
    base = next(x for x in results if x["recipe"]["name"] == "baseline")
    text = f"""# Pretraining recipe study (reduced scale, CPU)

Made by `tools/recipe_study.py` on {meta['date']}: {meta['machine']}, **one thread**, `nice`d, on a
2-core machine shared with other jobs, so times are **CPU time** (`time.process_time`), not wall
time. torch {meta['torch']}, fused CPU training path, precision {meta['precision']}.

**Setup.** Astromer 2 with {a.blocks} blocks (d_model 256, 4 heads, dff 512: the base model's
width), trained from scratch, seed {a.seed}, on the data kit's pretraining curves
({meta['train_curves']:,} curves after cleaning and the paper filter; the EROS-1 test split left
out), {a.windows:,} training windows per run (so every run costs about the same), cosine decay
over the run. Validation: {meta['val_curves']:,} curves of the same files, fixed windows and
masks. **Held out**: the EROS-1 test split ({meta['heldout_curves']:,} curves, one random window
each, 50% probed as SPEC section 4), never trained on. Each recipe changes one knob of the
baseline (lr 1e-3, warm-up 6,400 windows, batch 128, one random window per curve per epoch,
paper filter "any", 50% probed).

| recipe | what changes | steps | CPU s | held-out R² | held-out RMSE (mag) | validation R² | held-out R² per CPU-min |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![validation R² against training windows]({png.name})

**Selected: {c['name']}** (held-out R² {chosen['heldout_r2']:+.4f} against the baseline's
{base['heldout_r2']:+.4f}). The rule: the best held-out R² at equal windows; a recipe within
0.005 of it that used less CPU time wins, since the GPU lease buys time, not windows.
`tools/continue_pretraining.py` uses it: lr {c['lr']:g}, warm-up {c['warmup_windows']:,} windows,
batch {c['batch_size']} (scaled up with the lease's device), windows "{c['windows']}", curve
filter "{c['curve_filter']}", probed {c['probed_frac']:.0%}.

How far to trust it: one seed, {a.windows:,} windows (minutes of CPU, not hours of GPU) and a
2-block model; differences under about 0.01 R² are within what another seed would move. The
packaged model is 6 blocks and has already seen 2.4 M windows, so what transfers is the
direction (which knobs matter), not the exact values.
"""
    (REPO / "bench" / "RECIPE_STUDY.md").write_text(text)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for x in results:
        h = [row for row in x["history"] if row.get("val_r2") is not None]
        ax.plot([row["windows"] for row in h], [row["val_r2"] for row in h], marker=".",
                label=x["recipe"]["name"])
    ax.set_xlabel("training windows seen")
    ax.set_ylabel("validation probed R²")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Recipe study: 2-block Astromer 2, CPU, equal windows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default="runs/recipe_study")
    p.add_argument("--windows", type=int, default=60_000, help="training windows per recipe")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--validations", type=int, default=6, help="validations per run")
    p.add_argument("--val-windows", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run only these recipe names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from OUT/results.json of a finished study")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(a.data)
    if a.report_only:
        saved = json.loads((out / "results.json").read_text())
        return report(saved["results"], saved["meta"], a, out)

    def log(msg):
        print(msg, flush=True)

    files = sorted(data_dir.glob("*.parquet")) + sorted(data_dir.glob("pretrain/*.parquet"))
    every = load_training_curves(files, exclude_split="test", curve_filter=None, log=log)
    rest, val = every.split(0.03, a.seed)
    keep_any = filter_mask(rest.curves, CurveFilter())
    data_any = rest.take(np.flatnonzero(keep_any))
    held, n_held = held_out_windows(data_dir)
    log(f"{len(data_any)} curves pass the paper filter, {len(rest)} without it; "
        f"{len(val)} validation; {n_held} held-out curves")

    done = {}
    partial = out / "results.json"
    if partial.exists():  # a study interrupted half-way continues where it stopped
        done = {x["recipe"]["name"]: x for x in json.loads(partial.read_text())["results"]}
    results = []
    for r in RECIPES:
        if a.only and r.name not in a.only:
            continue
        if r.name in done:
            results.append(done[r.name])
            continue
        results.append(run_recipe(r, data_any, rest, val, held, a, log))
        partial.write_text(json.dumps({"results": results}, indent=1))
    from astromer_fast.model.fused_cpu import resolve_precision

    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                torch=torch.__version__, precision=resolve_precision(None),
                train_curves=len(data_any), val_curves=len(val), heldout_curves=n_held)
    report(results, meta, a, out)


def report(results, meta, a, out):
    chosen = select(results)
    png = REPO / "bench" / "recipe_study_curves.png"
    plot(results, png)
    write_report(results, chosen, a, meta, png)
    (out / "results.json").write_text(json.dumps({"results": results, "meta": meta,
                                                  "selected": chosen["recipe"]}, indent=1))
    # What tools/continue_pretraining.py reads: the selected recipe and the table, no curves.
    summary = [{k: x[k] for k in ("steps", "cpu_s", "heldout_r2", "heldout_rmse", "val_r2",
                                  "r2_per_cpu_min")} | {"recipe": x["recipe"]["name"]}
               for x in results]
    (REPO / "bench" / "recipe_study.json").write_text(json.dumps(
        {"selected": chosen["recipe"], "windows_per_run": a.windows, "blocks": a.blocks,
         "meta": meta, "results": summary}, indent=1) + "\n")
    print(f"selected: {chosen['recipe']['name']}", flush=True)


if __name__ == "__main__":
    main()
