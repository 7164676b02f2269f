"""`moebench bench MODEL`: prefill and decode speed unpruned, pruned, with skipping (`moebench.measure.bench`)."""

from __future__ import annotations

import argparse

from moebench.cli.common import add_calibration_arguments, load, parse_params, request_from
from moebench.measure.bench import BenchSettings, bench_variants
from moebench.moe.checkpoint import check_device, sequential_needed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench`."""
    add_calibration_arguments(parser)
    parser.add_argument("--method", default=None, help="also measure the model pruned by this method")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None)
    budget.add_argument("--keep", type=int, default=None)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--skip", choices=["none", "naee"], default="none", help="also measure dynamic skipping")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=6,
                        help="paired repetitions (default 6: the fewest whose range is a 95%% interval of the median)")
    parser.add_argument("--warmup", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    """Measure the requested variants and print the table (and skipping's ideal-vs-measured)."""
    if args.method and args.ratio is None and args.keep is None:
        raise ValueError("--method needs a budget: --ratio R or --keep K")
    if args.skip == "naee" and not args.calib:
        raise ValueError("--skip naee needs calibration for its thresholds: give --calib, e.g. --calib testbed:mix")
    if getattr(args, "sequential", None):
        raise ValueError("moebench bench times the model in memory; --sequential (a model opened layer by layer) "
                         "cannot be timed")
    args.sequential = False  # never a layer-by-layer skeleton: timing one would time nothing
    why = sequential_needed(args.model, check_device(args.device), args.revision)
    if why:
        raise ValueError(f"moebench bench needs the whole model in memory: {why.split(';')[0]}; bench on a device "
                         "with more memory, or a smaller model of the same family")
    model, tokenizer = load(args)
    base = request_from(args, model, ratio=args.ratio, keep=args.keep, params=parse_params(args.param))
    settings = BenchSettings(args.batch, args.prompt_len, args.new_tokens, args.reps, args.warmup)
    bench, lines = bench_variants(model, tokenizer, base, settings, args.method, args.skip)
    print(f"moebench bench {args.model}: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.reps} reps after {args.warmup} warm-up; device {next(model.parameters()).device}")
    print(bench.table())
    for line in lines:
        print(line)
    return 0
