"""`moebench bench-overhead MODEL --tasks T`: pruned_moe method=none vs hf wall time (`moebench.measure.overhead`)."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from moebench.measure.overhead import compare_overhead


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench-overhead`."""
    parser.add_argument("model", help="hub id, local folder or testbed model name")
    parser.add_argument("--tasks", default="testbed_logic_quick", help="lm-eval tasks, comma-separated")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder (packaged tasks are found)")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval limit per task")
    parser.add_argument("--reps", type=int, default=3, help="runs of each model (default 3)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32")


def run(args: argparse.Namespace) -> int:
    """Alternate hf and pruned_moe runs; print times, medians, the ratio and whether scores agree."""
    r = compare_overhead(args.model, args.tasks.split(","), args.reps, args.include_path, args.batch_size,
                         args.limit, args.device, args.dtype)
    rows = [(k, " ".join(f"{t:.2f}" for t in v), f"{r['medians'][k]:.2f}") for k, v in r["times"].items()]
    print(f"moebench bench-overhead {args.model}: tasks {args.tasks}, batch size {args.batch_size}, "
          f"{args.reps} runs each after one warm-up, device {r['device']}")
    print(tabulate(rows, headers=["model", "wall s per run (load + evaluate)", "median s"]))
    ratio = r["ratio"]
    print(f"pruned_moe method=none / hf wall time: {ratio:.3f}x (target <= 1.03: "
          f"{'met' if ratio <= 1.03 else 'missed'}); scores identical: {'yes' if r['same'] else 'NO'}")
    return 0 if r["same"] else 1
