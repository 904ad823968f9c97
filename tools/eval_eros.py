#!/usr/bin/env python
"""The few-label classification protocol on EROS-1 (the data kit's ``eros1.parquet``): band b, band
r, and both bands concatenated per star; macro F1 at 20 and 100 samples per class for

  (a) the packaged default model (or ``--model``),
  (b) the released Astromer 1 weights (``--astromer1``),
  (c) the hand-crafted feature baseline,

each through the same classifier (γ-weighted layer means, and the last-block mean as a second
row per model), trained on the ``train`` split and scored on the whole ``test`` split.

    python tools/eval_eros.py --out out/eval_eros                   # CPU, no finetuning
    python tools/eval_eros.py --device cuda --finetune-steps 500 --spc 20 100 500

Writes ``OUT/eros1_table.md`` (and ``.json``), and a full report per setting in ``OUT/<setting>/``.
Per-curve embeddings of unfinetuned models are cached in ``OUT/cache`` (keyed by weights and
preprocessing), so a rerun, or a rerun with more SPC, only embeds what it has not seen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def main(argv=None) -> int:
    data_dir = Path(os.environ.get("ASTROMER_FAST_SHARED_DATA", DEFAULT_DATA))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(data_dir / "eros1.parquet"))
    p.add_argument("--model", default=None, help="encoder (a); default: the packaged model")
    p.add_argument("--astromer1", default=str(data_dir / "official_weights" /
                                              "astromer1_macho_a0.zip"),
                   help="released Astromer 1 checkpoint (b); '' to skip")
    p.add_argument("--spc", type=int, nargs="+", default=[20, 100])
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--finetune-batch-size", type=int, default=64)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=["b", "r", "both"],
                   choices=["b", "r", "both"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--out", default="out/eval_eros")
    args = p.parse_args(argv)

    from astromer_fast.evaluation import ClassifierSettings, EvalSettings, evaluate

    if not Path(args.data).is_file():
        print(f"{args.data}: not found (set ASTROMER_FAST_SHARED_DATA or --data)",
              file=sys.stderr)
        return 2
    models = [args.model]
    if args.astromer1:
        if not Path(args.astromer1).exists():
            print(f"{args.astromer1}: not found; pass --astromer1 '' to skip it", file=sys.stderr)
            return 2
        models.append(args.astromer1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(spc=tuple(args.spc), folds=args.folds, seed=args.seed,
                            finetune_steps=args.finetune_steps,
                            finetune_batch_size=args.finetune_batch_size,
                            finetune_lr=args.finetune_lr, device=args.device,
                            batch_size=args.batch_size, figures=not args.no_figures,
                            classifier=ClassifierSettings())
    results = {}
    t0 = time.perf_counter()
    for name in args.settings:
        print(f"=== EROS-1, {'bands b+r concatenated' if name == 'both' else 'band ' + name}")
        bands = ["b", "r"] if name == "both" else [name]
        results[name] = evaluate(args.data, "label", models=models, out=out / name,
                                 split_col="split", bands=bands, concat_bands=(name == "both"),
                                 settings=settings, cache_dir=out / "cache")
    seconds = time.perf_counter() - t0

    first = next(iter(results.values()))
    methods = first.methods
    spcs = list(args.spc)
    header = ["method"] + [f"{n} · {s} SPC" for n in results for s in spcs]
    lines = ["# EROS-1 few-label classification: macro F1 (mean ± std over "
             f"{args.folds} folds)", "",
             f"Machine: {machine()}; device {first.settings['device']}. "
             f"Finetuning: {args.finetune_steps or 'none'}"
             f"{' steps per SPC and fold' if args.finetune_steps else ''}. "
             f"Total {seconds / 60:.1f} min.", "",
             "Training: the `train` split, SPC samples per class per fold; test: the whole "
             "`test` split (" + ", ".join(f"{n}: {r.dataset['n_test_scored']}"
                                          for n, r in results.items()) +
             " samples). `both`: one sample per star, b and r embeddings concatenated.", "",
             "Encoders: " + "; ".join(f"{k} = `{v['source']}` ({v['config']['name']}, weights "
                                      f"{v['weights'][:12]})"
                                      for k, v in first.dataset["encoders"].items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = {}
    for m in methods:
        cells = []
        for n, r in results.items():
            summ = r.summary()
            for s in spcs:
                mean, std = summ.get(m, {}).get(s, (float("nan"), float("nan")))
                cells.append(f"{mean:.3f} ± {std:.3f}")
                table.setdefault(m, {})[f"{n}/{s}"] = [mean, std]
        lines.append("| " + " | ".join([m] + cells) + " |")
    lines += ["", "Full reports (per-class F1, confusion matrices, γ, figures): " +
              ", ".join(f"[{n}]({n}/report.md)" for n in results), ""]
    text = "\n".join(lines)
    (out / "eros1_table.md").write_text(text)
    (out / "eros1_table.json").write_text(json.dumps(
        {"machine": machine(), "settings": vars(args), "seconds": seconds,
         "macro_f1": table}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
