"""`moebench calibrate MODEL --calib C`: collect and cache the calibration statistics once."""

from __future__ import annotations

import argparse
import time

from moebench.calib.stats import GROUPS
from moebench.cli.common import add_calibration_arguments, load, request_from
from moebench.method.pipeline import statistics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench calibrate`."""
    add_calibration_arguments(parser)
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"statistic groups to collect (default all: {','.join(GROUPS)})")


def run(args: argparse.Namespace) -> int:
    """Collect (or find in the cache) the requested statistic groups and print where they are."""
    if not args.calib:
        raise ValueError("give a calibration source with --calib, e.g. --calib c4 or --calib testbed:mix")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    model, tokenizer = load(args)
    request = request_from(args, model)
    start = time.perf_counter()
    stats = statistics(model, tokenizer, request, groups)
    layer = next(iter(stats.values()))
    print(f"statistics for {len(stats)} MoE layers, groups {', '.join(groups)} "
          f"({int(layer['tokens'].item()) if 'tokens' in layer else '?'} tokens) in {time.perf_counter() - start:.1f}s")
    # where they are: `statistics` printed the cache folder (to stderr, with whether they were there already)
    return 0
