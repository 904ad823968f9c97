"""``astromer-fast pretrain`` and ``astromer-fast finetune``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from astromer_fast.training.trainer import TrainSettings

_EPILOG = """\
outputs in OUT:
  config.json + model.safetensors   the best model so far (lowest validation loss); load it with
                                    astromer_fast.from_pretrained(OUT) or --model OUT
  checkpoint/                       the latest resumable state (weights, optimizer, scheduler,
                                    RNG, position); rerun the same command with --resume
  metrics.csv, learning_curve.png   step, lr, train/validation loss, validation RMSE and R²

multi-GPU (data parallel, same command on 1 or N GPUs):
  torchrun --nproc_per_node 4 -m astromer_fast pretrain DATA -o OUT ...
"""


def _add_common(p, defaults: TrainSettings):
    p.add_argument("data", nargs="+", help="Parquet files, globs or directories (any layout "
                   "`astromer-fast embed` reads; column options below)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/checkpoint (same data and settings)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g = p.add_argument_group("budget (whichever comes first)")
    g.add_argument("--epochs", type=int, default=defaults.max_epochs, dest="max_epochs")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps)
    g.add_argument("--max-minutes", type=float, default=defaults.max_minutes)
    g.add_argument("--patience", type=int, default=defaults.patience,
                   help="validations without improvement before stopping (default %(default)s)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=defaults.batch_size)
    o.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    o.add_argument("--optimizer", choices=["adam", "adamw"], default=defaults.optimizer)
    o.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    o.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    o.add_argument("--schedule", choices=["cosine", "constant"], default=defaults.schedule)
    o.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    o.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="arithmetic of the model (default auto: bf16 on CUDA and on CPUs with "
                   "native bfloat16, else fp32)")
    o.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="same as --precision bf16")
    o.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="same as --precision fp32")
    o.add_argument("--no-cpu-fused", dest="cpu_fused", action="store_false", default=True,
                   help="on the CPU, train the plain model with the kernel backends instead of "
                   "the fused encoder passes")
    o.add_argument("--gpu-path", choices=["fused", "plain"], default=None,
                   help="the encoder of a CUDA training step: the fused training forward "
                   "(weights cast once per step, larger GEMMs) or the plain model under autocast "
                   "(default: $ASTROMER_FAST_GPU_TRAIN_PATH, else plain)")
    o.add_argument("--cuda-graphs", action="store_true", default=False,
                   help="replay forward, loss and backward from one CUDA graph per batch shape "
                   "(eager steps where a capture fails; not yet run on a GPU)")
    o.add_argument("--backend", default=None, help="kernel backend: cuda, triton, cpu, torch, sdpa "
                   "(default: fastest available)")
    o.add_argument("--seed", type=int, default=defaults.seed)
    v = p.add_argument_group("validation and checkpoints")
    v.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    v.add_argument("--val-every", type=int, default=defaults.val_every, help="steps")
    v.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps")
    t = p.add_argument_group("masking (SPEC section 4)")
    t.add_argument("--probed-frac", type=float, default=defaults.probed_frac)
    t.add_argument("--same-frac", type=float, default=defaults.same_frac)
    t.add_argument("--random-frac", type=float, default=defaults.random_frac)
    c = p.add_argument_group("input columns")
    for name in ("id", "band", "lc", "time", "mag", "err"):
        c.add_argument(f"--{name}-col", default=None)
    c.add_argument("--band", action="append", default=None, help="train on this band only "
                   "(repeatable)")
    c.add_argument("--exclude-split", default="test", help="leave out rows whose `split` column "
                   "equals this (default: test; '' for none)")
    c.add_argument("--min-obs", type=int, default=5)


def _settings(args) -> TrainSettings:
    precision = getattr(args, "precision", None)
    if precision not in (None, "auto"):
        if args.bf16 is not None and args.bf16 != (precision == "bf16"):
            flag = "--bf16" if args.bf16 else "--no-bf16"
            raise ValueError(f"--precision {precision} contradicts {flag}")
        args.bf16 = precision == "bf16"
    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in vars(args).items() if k in names})


def _layout_kw(args) -> dict:
    kw = {}
    for name in ("id", "band", "lc", "time", "mag", "err"):
        v = getattr(args, f"{name}_col")
        if v is not None:
            kw["lightcurve_col" if name == "lc" else f"{name}_col"] = v
    return kw


def _log(msg):
    print(msg, flush=True)


def _pretrain(args) -> int:
    from astromer_fast.training.data import CurveFilter
    from astromer_fast.training.pretrain import pretrain

    s = _settings(args)
    if not (s.max_epochs or s.max_steps or s.max_minutes):
        print("astromer-fast pretrain: give a budget: --epochs, --max-steps or --max-minutes",
              file=sys.stderr)
        return 2
    flt = None if args.no_paper_filter else CurveFilter(rule=args.filter_rule)
    r = pretrain(args.data, args.output, model=args.model, settings=s, resume=args.resume,
                 curve_filter=flt, exclude_split=args.exclude_split or None, bands=args.band,
                 min_obs=args.min_obs, device=args.device, log=_log, **_layout_kw(args))
    _log(json.dumps({"stopped": r.stopped, "best": r.best}))
    return 0


def _finetune(args) -> int:
    from astromer_fast.training.data import load_training_curves
    from astromer_fast.training.pretrain import finetune

    s = _settings(args)
    data = load_training_curves(args.data, exclude_split=args.exclude_split or None,
                                bands=args.band, min_obs=args.min_obs, curve_filter=None,
                                log=_log, **_layout_kw(args))
    r = finetune(args.model, data, s, args.output, resume=args.resume, device=args.device,
                 log=_log)
    _log(json.dumps({"stopped": r.stopped, "best": r.best}))
    return 0


def add_parsers(sub):
    from astromer_fast.training.pretrain import FINETUNE_DEFAULTS

    pre_defaults = TrainSettings()
    p = sub.add_parser(
        "pretrain", help="pretrain Astromer with the masked-reconstruction objective",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Masked-reconstruction pretraining (SPEC section 4): one random "
        "200-observation window per curve per epoch, official cleaning, the paper's "
        "noise-curve filter, 50% probed (20% same, 20% of the rest random, the rest masked), "
        "official weighted RMSE, Adam(0.9, 0.98, 1e-9) with warm-up and cosine decay.")
    _add_common(p, pre_defaults)
    p.add_argument("--model", default=None, help="start from these weights (packaged name, "
                   "save_pretrained folder or released checkpoint); default: a fresh Astromer 2")
    p.add_argument("--no-paper-filter", action="store_true",
                   help="keep noise-like curves (the paper drops them)")
    p.add_argument("--filter-rule", choices=["any", "all"], default="any",
                   help="keep a curve when any (default) or all of |kurtosis|>10, |skew|>1, "
                   "std>0.1 hold")
    p.set_defaults(func=_pretrain, max_minutes=None)

    f = sub.add_parser(
        "finetune", help="continue the masked objective on your (labelled) curves",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Finetune a pretrained model on your curves with the same masked objective "
        "(as the paper does before classification). Labels are not used.")
    _add_common(f, TrainSettings(**FINETUNE_DEFAULTS))
    f.add_argument("--model", default=None,
                   help="weights to start from (default: the packaged default model)")
    f.set_defaults(func=_finetune)
