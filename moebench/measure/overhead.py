"""`moebench bench-overhead MODEL --tasks T`: wall time of ``pruned_moe`` with ``method=none`` vs ``hf``.

Both models run the same lm-eval task in one process, alternating (hf, pruned_moe, hf, ...) so
drift in machine load falls on both; each run loads the model and evaluates, as the lm-eval
command line does. Prints every run's seconds, the medians and their ratio, and checks that the
two give the same scores (``method=none`` must be the unpruned model exactly). The target is a
ratio <= 1.03 (pruned_moe costs at most 3% more wall time).
"""

from __future__ import annotations

import argparse
import statistics
import time

from tabulate import tabulate


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


def _evaluate(kind: str, pretrained: str, args, task_manager) -> tuple[float, dict]:
    import lm_eval

    model_args = f"pretrained={pretrained},dtype={args.dtype},device={args.device}"
    if kind == "pruned_moe":
        model_args += ",method=none"
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=kind, model_args=model_args, tasks=args.tasks.split(","),
                                  batch_size=args.batch_size, limit=args.limit, task_manager=task_manager,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - start
    scores = {task: {k: v for k, v in values.items() if isinstance(v, float) and "stderr" not in k}
              for task, values in out["results"].items()}
    return seconds, scores


def run(args: argparse.Namespace) -> int:
    """Alternate hf and pruned_moe runs; print times, medians, the ratio and whether scores agree."""
    from lm_eval.tasks import TaskManager

    from moebench.moe.checkpoint import default_device, resolve
    from moebench.eval.plugin import register
    from moebench.tasks import task_dir

    if args.reps < 1:
        raise ValueError(f"--reps {args.reps} must be >= 1")
    register()
    args.device = args.device or default_device()
    pretrained = resolve(args.model)
    manager = TaskManager(include_path=[task_dir()] + ([args.include_path] if args.include_path else []))
    _evaluate("hf", pretrained, args, manager)  # warm-up: imports, task data, file caches
    times: dict[str, list[float]] = {"hf": [], "pruned_moe": []}
    scores: dict[str, dict] = {}
    for rep in range(args.reps):
        for kind in (("hf", "pruned_moe") if rep % 2 == 0 else ("pruned_moe", "hf")):
            seconds, scores[kind] = _evaluate(kind, pretrained, args, manager)
            times[kind].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["pruned_moe"] / medians["hf"]
    rows = [(k, " ".join(f"{t:.2f}" for t in v), f"{medians[k]:.2f}") for k, v in times.items()]
    print(f"moebench bench-overhead {args.model}: tasks {args.tasks}, batch size {args.batch_size}, "
          f"{args.reps} runs each after one warm-up, device {args.device}")
    print(tabulate(rows, headers=["model", "wall s per run (load + evaluate)", "median s"]))
    same = scores["hf"] == scores["pruned_moe"]
    print(f"pruned_moe method=none / hf wall time: {ratio:.3f}x (target <= 1.03: "
          f"{'met' if ratio <= 1.03 else 'missed'}); scores identical: {'yes' if same else 'NO'}")
    return 0 if same else 1
