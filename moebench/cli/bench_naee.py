"""`moebench bench-naee MODEL`: NAEE by recombination vs naive re-forward (`moebench.measure.naee_bench`)."""

from __future__ import annotations

import argparse

from moebench.cli.common import add_calibration_arguments, load, request_from
from moebench.measure.naee_bench import compare_naee


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-naee`."""
    add_calibration_arguments(parser)
    parser.set_defaults(samples=16, calib="testbed:mix")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="fraction of experts removed (default 0.5: r=4 of 8, C(8,4) = 70 subsets per layer)")


def run(args: argparse.Namespace) -> int:
    """Time both enumerations layer by layer and print the speed ratio."""
    model, tokenizer = load(args)
    r = compare_naee(model, tokenizer, request_from(args, model), args.ratio)
    print(f"NAEE exhaustive search, {r['layers']} layers, keep {r['keep']} of {r['experts']}, "
          f"{r['tokens']} cached tokens per layer")
    print(f"  recombination (cached outputs): {r['recombine_s']:8.3f} s  (+ {r['collect_s']:.3f} s one calibration "
          "pass, shared with every ratio)")
    print(f"  naive re-forward per subset:    {r['naive_s']:8.3f} s")
    print(f"  speed ratio naive / recombination: {r['naive_s'] / r['recombine_s']:.1f}x "
          f"({r['naive_s'] / (r['recombine_s'] + r['collect_s']):.1f}x counting the pass)")
    print(f"  same kept sets: {'yes' if r['same'] else 'NO'}")
    return 0 if r["same"] else 1
