"""Command line: ``astromer-fast embed``, ``astromer-fast convert``, ``astromer-fast info``."""

from __future__ import annotations

import argparse
import functools
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _embed(args):
    if args.engine == "ray":
        try:
            from astromer_fast.distributed.ray import embed_files
        except ImportError as e:  # reported like a bad argument: a message, not a traceback
            raise ValueError(str(e)) from e
        # Same options and outputs as the local run; the actors each run the local code.
        run = functools.partial(embed_files, address=args.address, actors=args.actors,
                                num_gpus_per_actor=args.num_gpus_per_actor)
    elif args.address or args.actors or args.num_gpus_per_actor is not None:
        raise ValueError("--address, --actors and --num-gpus-per-actor need --engine ray")
    else:
        from astromer_fast.embedding import embed as run
    from astromer_fast.embedding.columns import Columns

    columns = Columns(id=args.id_col, time=args.time_col, mag=args.mag_col, err=args.err_col,
                      band=args.band_col, lightcurve=args.lc_col, layout=args.layout)
    summary = run(args.inputs, args.output, model=args.model, batch_size=args.batch_size,
                  device=args.device, window_mode=args.window_mode, min_obs=args.min_obs,
                  columns=columns, bands=args.band, layers=args.layers,
                  per_window=args.per_window, read_batch_rows=args.read_rows,
                  resume=args.resume, continue_on_error=args.continue_on_error,
                  progress=not args.quiet, precision=args.precision,
                  standardize=args.standardize)
    if args.quiet:  # otherwise already said, when the input was redone
        for src, why in summary.redone:
            print(f"redone {src}: {why}", file=sys.stderr)
    for src, why in summary.failed:
        print(f"FAILED {why[len('error: '):] if why.startswith('error: ') else src}",
              file=sys.stderr)
    return 1 if summary.failed else 0


def _convert(args):
    from astromer_fast.weights import load_official_checkpoint

    model = load_official_checkpoint(args.checkpoint, require_head=not args.no_head)
    model.save_pretrained(args.output, metadata={"converted_from": str(args.checkpoint)})
    print(f"{args.checkpoint} -> {args.output} ({model.config.name}, "
          f"{model.num_parameters():,} parameters)")
    return 0


def _calibrate(args):
    import torch

    from astromer_fast.kernels import calibration

    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"calibrate needs a CUDA device, got {args.device!r}"
                         + ("" if torch.cuda.is_available() else " (torch sees no CUDA device)"))
    model = None
    if args.model is not None:
        from astromer_fast.model import Astromer

        model = Astromer.from_pretrained(args.model)

    def log(row):
        took = f"{row['seconds'] * 1e3:9.2f} ms" if row["seconds"] is not None else "        -"
        cos = f"{row['min_cosine']:.5f}" if "min_cosine" in row else "-"
        print(f"  {row['candidate']:18s} width {row['width']:4d}  {took}  min cosine {cos}"
              + (f"  {row['error'][:120]}" if "error" in row else ""), flush=True)

    widths = tuple(int(w) for w in args.widths.split(","))
    result = calibration.calibrate(device, model, widths=widths, batch=args.batch, log=log)
    print(f"choice: {result['candidate']} -> {calibration.cache_path(result['key'])}")
    return 0


def _info(args):
    import torch

    import astromer_fast
    from astromer_fast.kernels import available_backends
    from astromer_fast.kernels._ext import CPU_WORKERS_ENV, ISA_ENV, cpu_ext, cpu_workers, cuda_ext
    from astromer_fast.weights.packaged import packaged_models

    print(f"astromer_fast {astromer_fast.__version__}, torch {torch.__version__}")
    for name, mod in (("_C", cpu_ext()), ("_C_cuda", cuda_ext())):
        print(f"  {name}: {mod.build_info() if mod is not None else 'not available'}")
    print(f"  backends (cpu): {available_backends(torch.device('cpu'))}")
    if cpu_ext() is not None:
        w = cpu_workers()
        where = (f"torch's OpenMP pool ({w['runtime']})" if w["workers"] == "torch"
                 else f"own std::threads ({w['why']})")
        print(f"  C++ kernels' worker threads: {where}, {torch.get_num_threads()} threads "
              f"(${CPU_WORKERS_ENV})")
        from astromer_fast.model.fused_cpu import PRECISION_ENV, cpu_isa_info, resolve_precision

        isa = cpu_isa_info()
        print(f"  CPU: {isa['model'] or 'unknown model'}; features {isa['features']}; fused "
              f"kernels at ISA level {isa['active']} (${ISA_ENV}); CPU precision "
              f"{resolve_precision()} (${PRECISION_ENV})")
    if torch.cuda.is_available():
        from astromer_fast.kernels import backends
        from astromer_fast.kernels.masked_attention import CUDA_ATTENTION_ENV, _cuda_attention_kernel

        print(f"  backends (cuda): {available_backends(torch.device('cuda'))}")
        print(f"  per-op defaults (cuda): {backends.CUDA_DEFAULTS}")
        from astromer_fast.kernels import calibration

        key = calibration.calibration_key("cuda")
        cached = calibration.load(key)
        print(f"  GPU path calibration: "
              + (f"{cached.get('candidate') or 'failed: ' + str(cached.get('error'))[:200]}"
                 + (" (first round only: the calibration was stopped)"
                    if cached.get("complete") is False else "")
                 if cached else "none (astromer-fast calibrate)")
              + f" [{calibration.cache_path(key)}]")
        print(f"  cuda backend's attention kernels: {_cuda_attention_kernel()} (${CUDA_ATTENTION_ENV})")
    print(f"  packaged models: {packaged_models() or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astromer-fast",
                                description="Astromer 2 light-curve embeddings, fast.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed Parquet light curves into one vector per curve",
                       description="Write OUT/<stem>.parquet (id, band, n_obs, n_windows, "
                       "embedding) and OUT/<stem>.rejects.parquet (id, band, n_obs, reason) per "
                       "input, atomically, never replacing an input or a file astromer-fast did "
                       "not write, one run per OUT at a time (lock: OUT/.astromer-fast.lock). "
                       "Layouts (nested list<struct>, struct of lists, "
                       "parallel lists, long table) and common column names (hmjd/mjd/"
                       "midpointMjdTai, psfMag/magpsf, sigmapsf/psfMagErr, band/filter/fid) "
                       "are detected; the --*-col options override.")
    e.add_argument("inputs", nargs="+", help="Parquet files, globs or directories")
    e.add_argument("-o", "--output", required=True, help="output directory")
    e.add_argument("--model", default=None, help="packaged model name, save_pretrained "
                   "directory or released TensorFlow checkpoint (default: the packaged model)")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--batch-size", type=_positive_int, default=256,
                   help="windows per model call")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="arithmetic of the model (default auto: $ASTROMER_FAST_PRECISION, else "
                   "bf16 on CPUs with native bfloat16 and on CUDA, else fp32)")
    e.add_argument("--read-rows", type=_positive_int, default=4096,
                   help="curves per record batch read (bounds memory; default 4096)")
    e.add_argument("--window-mode", choices=["overlap", "nonoverlap"], default="overlap")
    e.add_argument("--min-obs", type=_positive_int, default=5,
                   help="curves with fewer valid observations are rejected (default 5)")
    e.add_argument("--layout", choices=["nested", "struct_of_lists", "lists", "long"],
                   default=None, help="force a layout (default: detected)")
    e.add_argument("--id-col", default=None)
    e.add_argument("--band-col", default=None, help="band column or field ('' for none)")
    e.add_argument("--lc-col", default=None,
                   help="the list<struct> or struct-of-lists column")
    e.add_argument("--time-col", default=None)
    e.add_argument("--mag-col", default=None)
    e.add_argument("--err-col", default=None, help="error column or field ('' for none)")
    e.add_argument("--band", action="append", default=None,
                   help="embed only this band (repeatable)")
    e.add_argument("--layers", action="store_true",
                   help="also write the (n_blocks+1, D) per-layer means (gamma-weighted input)")
    e.add_argument("--per-window", action="store_true", help="one row per window")
    std = e.add_mutually_exclusive_group()
    std.add_argument("--standardize", dest="standardize", action="store_const", const="whiten",
                     default=False,
                     help="centre and whiten the vectors with the mean and whitening matrix "
                     "stored with the model (from its pretraining curves): the vectors to use "
                     "for cosine similarity and nearest-neighbour search")
    std.add_argument("--standardize-channels", dest="standardize", action="store_const",
                     const="channels",
                     help="only centre and scale every channel by its spread (same statistics)")
    e.add_argument("--resume", action="store_true",
                   help="skip inputs whose outputs exist, are complete and were made from the "
                   "same input with the same options and weights; redo the others, saying why")
    e.add_argument("--continue-on-error", action="store_true",
                   help="report an unreadable file and go on with the others")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    e.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: a pool of Ray actors (pip install "
                   "'astromer-fast[ray]'), the same output files")
    e.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto': the one `ray start` runs here; default: "
                   "RAY_ADDRESS, else a new local cluster)")
    e.add_argument("--num-gpus-per-actor", type=float, default=None,
                   help="GPUs per Ray actor (default 1 when the cluster has GPUs, else 0)")
    e.add_argument("--actors", type=_positive_int, default=None,
                   help="Ray actors (default: one per GPU, or one per CPU without GPUs)")
    e.set_defaults(func=_embed)

    c = sub.add_parser("convert", help="convert a released TensorFlow checkpoint to safetensors")
    c.add_argument("checkpoint", help=".zip as released, the folder inside it, or its prefix")
    c.add_argument("output", help="directory to write model.safetensors + config.json into")
    c.add_argument("--no-head", action="store_true",
                   help="accept a checkpoint without the regression head (classifiers)")
    c.set_defaults(func=_convert)

    from astromer_fast.training.cli import add_parsers as add_training_parsers

    add_training_parsers(sub)

    from astromer_fast.evaluation.cli import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)

    k = sub.add_parser("calibrate", help="time the GPU paths on this GPU and cache the fastest "
                       "that matches float32 (embed's default on CUDA)")
    k.add_argument("--device", default="cuda")
    k.add_argument("--model", default=None, help="model directory (default: the packaged model)")
    k.add_argument("--widths", default=",".join(str(w) for w in (48, 112, 200)))
    k.add_argument("--batch", type=int, default=1024, help="windows per timed call")
    k.set_defaults(func=_calibrate)

    i = sub.add_parser("info", help="versions, compiled kernels, backends, packaged models")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:
        print(f"astromer-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
