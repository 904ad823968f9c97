"""``astromer-fast evaluate``: the few-label classification protocol on a labelled Parquet file,
written as a report folder."""

from __future__ import annotations

import argparse


def _evaluate(args) -> int:
    from astromer_fast.evaluation.classifier import ClassifierSettings
    from astromer_fast.evaluation.run import EvalSettings, evaluate

    models = [] if args.features_only else ([args.model] + list(args.baseline_model or []))
    settings = EvalSettings(
        spc=tuple(args.spc), folds=args.folds, seed=args.seed, val_fraction=args.val_fraction,
        test_spc=args.test_spc, finetune_steps=args.finetune_steps,
        finetune_batch_size=args.finetune_batch_size, finetune_lr=args.finetune_lr,
        cleaning=args.cleaning, window_mode=args.window_mode, min_obs=args.min_obs,
        batch_size=args.batch_size, device=args.device, features=not args.no_features,
        feature_set=args.feature_set,
        last_block=not args.no_last_block, figures=not args.no_figures, tsne_max=args.tsne_max,
        classifier=ClassifierSettings(lr=args.clf_lr, batch_size=args.clf_batch_size,
                                      max_epochs=args.clf_epochs, patience=args.clf_patience,
                                      standardize=not args.raw_embeddings))
    try:
        result = evaluate(args.data, args.label_col, models=models, out=args.out,
                          split_col=args.split_col or None, bands=args.band,
                          concat_bands=args.concat_bands, settings=settings,
                          cache_dir=args.cache_dir, id_col=args.id_col, band_col=args.band_col,
                          log=None if args.quiet else print)
    except (RuntimeError, ValueError) as e:  # e.g. finetuning or light-curve not installed
        import sys

        print(f"astromer-fast evaluate: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        from astromer_fast.evaluation.report import macro_f1_table

        print("\n".join(macro_f1_table(result)))
        print(f"report: {args.out}/report.md")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``astromer-fast`` sub-command parsers."""
    p = subparsers.add_parser(
        "evaluate", help="few-label classification protocol (paper Sect. 5) -> report folder",
        description="For each SPC (samples per class) and fold: draw SPC training samples per "
        "class (with replacement when a class is short), optionally finetune the encoder on them "
        "(masked reconstruction), freeze it, train the paper's gamma-weighted MLP classifier, and "
        "score the shared test set. Baselines: last-block mean embedding, extra models "
        "(--baseline-model, e.g. the released Astromer 1 weights) and hand-crafted features, all "
        "through the same classifier. Writes OUT/report.md, results.json, runs.csv and PNG "
        "figures; per-curve embeddings of unfinetuned models are cached in OUT/cache.")
    p.add_argument("data", help="Parquet file with one light curve per row and a label column")
    p.add_argument("--label-col", default="label")
    p.add_argument("--model", default=None, help="packaged name, save_pretrained directory or "
                   "released TensorFlow checkpoint (default: the packaged model)")
    p.add_argument("--baseline-model", action="append", default=None,
                   help="another encoder to compare (repeatable), e.g. astromer1_macho_a0.zip")
    p.add_argument("--features-only", action="store_true",
                   help="only the hand-crafted feature baseline (no encoder)")
    p.add_argument("--spc", type=int, nargs="+", default=[20, 100, 500],
                   help="samples per class (default: 20 100 500)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-col", default="split", help="train/test column ('' for none: a "
                   "stratified split by object is drawn; so is one when it holds no 'test')")
    p.add_argument("--test-spc", type=int, default=None,
                   help="cap the shared test set at this many samples per class (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each fold's distinct samples used for early stopping")
    p.add_argument("--band", action="append", default=None,
                   help="use only this band (repeatable)")
    p.add_argument("--concat-bands", action="store_true",
                   help="one sample per object: the embeddings of its bands concatenated")
    p.add_argument("--id-col", default=None)
    p.add_argument("--band-col", default=None)
    p.add_argument("-o", "--out", default="out/evaluation",
                   help="report folder (default: out/evaluation)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/cache)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="masked-reconstruction finetuning steps per SPC and fold (0: none)")
    p.add_argument("--finetune-batch-size", type=int, default=64)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--cleaning", choices=["official", "basic"], default="official")
    p.add_argument("--window-mode", choices=["overlap", "nonoverlap"], default="overlap")
    p.add_argument("--min-obs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256, help="windows per encoder call")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--clf-lr", type=float, default=1e-3)
    p.add_argument("--clf-batch-size", type=int, default=64)
    p.add_argument("--clf-epochs", type=int, default=200)
    p.add_argument("--clf-patience", type=int, default=20)
    p.add_argument("--raw-embeddings", action="store_true",
                   help="feed the layer means unstandardised, as the paper does")
    p.add_argument("--no-features", action="store_true", help="skip the feature baseline")
    p.add_argument("--feature-set", choices=["light-curve", "builtin"], default=None,
                   help="the feature baseline: the light-curve package's extractors "
                   "(default when installed: pip install light-curve) or the 16 builtin "
                   "statistics (numpy only; the fallback, with a message)")
    p.add_argument("--no-last-block", action="store_true",
                   help="skip the last-block-mean baseline")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--tsne-max", type=int, default=600,
                   help="test samples in the t-SNE figure (default 600)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_evaluate)
    return p
