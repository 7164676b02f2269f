"""`moebench bench-naee MODEL`: NAEE by recombination vs naive re-forward enumeration.

Both search the same subsets with the same loss on the same calibration tokens, after one untimed
warm-up of each; the command checks that they keep the same experts and prints the measured times
and their ratio. The ratio grows with expert size: the naive search runs the experts once per
subset, the recombination only re-runs the router and reads per-token Gram matrices.
"""

from __future__ import annotations

import argparse
import time

import torch

from moebench.cli.common import add_calibration_arguments, load, request_from
from moebench.method.registry import resolve_budget
from moebench.moe.view import MoEView
from moebench.method.pipeline import plan_from_stats, statistics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-naee`."""
    add_calibration_arguments(parser)
    parser.set_defaults(samples=16, calib="testbed:mix")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="fraction of experts removed (default 0.5: r=4 of 8, C(8,4) = 70 subsets per layer)")


def run(args: argparse.Namespace) -> int:
    """Time both enumerations layer by layer and print the speed ratio."""
    from moebench.methods.naee import naive_exhaustive

    torch.manual_seed(0)
    model, tokenizer = load(args)
    view = MoEView(model)
    if max(view.experts_per_layer.values()) > 16:
        raise ValueError("bench-naee compares exhaustive enumerations: use a model with <= 16 experts per layer")
    request = request_from(args, model, method="naee", ratio=args.ratio)
    t0 = time.perf_counter()
    stats = statistics(model, tokenizer, request, ["outputs"], progress=True)
    collect_s = time.perf_counter() - t0
    budget = resolve_budget(view, ratio=args.ratio)
    first = view.layers[0]  # warm-up of both searches (kernels, allocator), not timed
    plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=args.ratio)
    naive_exhaustive(first, stats[first.index], budget[first.index])
    t0 = time.perf_counter()
    plan = plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=args.ratio)
    recombine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {layer.index: naive_exhaustive(layer, stats[layer.index], budget[layer.index]) for layer in view.layers}
    naive_s = time.perf_counter() - t0
    same = naive == plan.keep
    tokens = stats[view.indices[0]]["inputs"].shape[0]
    print(f"NAEE exhaustive search, {len(view.layers)} layers, keep {sorted(set(budget.values()))} of "
          f"{sorted(set(view.experts_per_layer.values()))}, {tokens} cached tokens per layer")
    print(f"  recombination (cached outputs): {recombine_s:8.3f} s  (+ {collect_s:.3f} s one calibration pass, "
          "shared with every ratio)")
    print(f"  naive re-forward per subset:    {naive_s:8.3f} s")
    print(f"  speed ratio naive / recombination: {naive_s / recombine_s:.1f}x "
          f"({naive_s / (recombine_s + collect_s):.1f}x counting the pass)")
    print(f"  same kept sets: {'yes' if same else 'NO'}")
    return 0 if same else 1
