"""`moebench prune MODEL --method M --ratio R --calib C --out DIR`: plan, prune, save.

``DIR`` appears complete or not at all: the files are written into a temporary sibling folder
that is renamed into place at the end (`moebench.moe.checkpoint.save_folder`).
"""

from __future__ import annotations

import argparse
import os
import time

from moebench.cli.common import add_calibration_arguments, load, parse_params, request_from
from moebench.method.pipeline import prepare
from moebench.method.registry import get_method
from moebench.moe.checkpoint import save_folder, save_pruned
from moebench.moe.view import MoEView
from moebench.util import check_new_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench prune`."""
    add_calibration_arguments(parser)
    parser.add_argument("--method", required=True, help="a registered method (moebench methods lists them)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of routed experts removed (0.5 = half)")
    budget.add_argument("--keep", type=int, help="experts kept per MoE layer")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of the method (repeatable)")
    parser.add_argument("--out", required=True, help="output folder: checkpoint + plan.json")


def run(args: argparse.Namespace) -> int:
    """Make the method's plan, prune physically, save checkpoint, tokenizer and plan.json."""
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise ValueError(f"{args.out} already holds a checkpoint; choose an empty --out folder")
    for leftover in check_new_folder(os.path.abspath(args.out)):  # before any work
        print(f"removed {leftover}, left by an interrupted run")
    spec = get_method(args.method)
    if spec.kind != "prune" or spec.is_identity:
        raise ValueError(f"moebench prune writes one static checkpoint; method {args.method} is "
                         f"{'the unpruned model' if spec.is_identity else f'a {spec.kind} method'}: evaluate it "
                         f"with lm_eval --model pruned_moe --model_args ...,method={args.method} instead")
    model, tokenizer = load(args)
    before = MoEView(model).expert_bytes()
    request = request_from(args, model, method=args.method, ratio=args.ratio, keep=args.keep,
                           params=parse_params(args.param))
    start = time.perf_counter()
    plan = prepare(model, tokenizer, request).plan
    save_folder(args.out, {"checkpoint": lambda d: save_pruned(model, d, shown_as=args.out),
                           "tokenizer": tokenizer.save_pretrained,
                           "plan.json": lambda d: plan.save(os.path.join(d, "plan.json"))})
    after = MoEView(model).expert_bytes()
    print(f"{plan.method}: kept {sorted(set(plan.experts_kept().values()))} experts per layer; expert bytes "
          f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB; planned in {time.perf_counter() - start:.1f}s")
    print(f"saved to {args.out} (plan.json beside the checkpoint)")
    return 0
