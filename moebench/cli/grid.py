"""`moebench grid run|status SPEC` and `moebench collect RESULTS_DIR`."""

from __future__ import annotations

import argparse

from moebench.grid.guard import holder
from moebench.grid.results import verify_cell
from moebench.grid.runner import run_grid, status, study_root
from moebench.grid.spec import load_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench grid`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("run", "run every unfinished cell, then write the tidy tables"),
                         ("status", "count done / failed / pending cells")):
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("spec", help="study spec (YAML)")
        p.add_argument("--results", default="results", help="results folder (default ./results)")
    run_p = sub.choices["run"]
    run_p.add_argument("--executor", choices=["local", "slurm"], default=None, help="override the spec's executor")
    run_p.add_argument("--parallel", type=int, default=None, help="cells at once for the local executor")


def run(args: argparse.Namespace) -> int:
    """Run or report on a study."""
    study = load_study(args.spec)
    root = study_root(args.results, study)
    if args.action == "status":
        states = status(study, root)
        print(f"{study.name}: {len(study.cells)} cells: " + ", ".join(f"{len(v)} {k}" for k, v in states.items()))
        for folder in states["running"]:
            print(f"  running elsewhere: {folder} ({holder(folder)})")
        for folder in states["failed"]:
            print(f"  failed: {folder} (see failure.json)")
        for folder in states["broken"]:
            print(f"  broken: {folder}: {verify_cell(folder)} (the next grid run redoes it)")
        return 0
    executor = None
    if args.executor or args.parallel:
        from moebench.grid.executors import make_executor

        options = dict(study.spec.get("executor") or {})
        spec_kind = options.pop("kind", "local")
        kind = args.executor or spec_kind
        if kind != spec_kind:  # the spec's options belong to its own executor
            options = {}
        if args.parallel:
            options["parallel"] = args.parallel
        executor = make_executor(kind, **options)
    summary = run_grid(study, root, executor)
    print(f"{study.name}: {summary['cells']} cells: {summary['done']} done now, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed, {len(summary['elsewhere'])} running elsewhere")
    for folder, problem in sorted(summary["reopened"].items()):
        print(f"  redone: {folder} held broken results ({problem})")
    for folder in summary["elsewhere"]:
        print(f"  running elsewhere: {folder} ({summary['holders'][folder]}); left to that run")
    for folder in summary["failed"]:
        print(f"  failed: {folder} (see failure.json)")
    for name, path in sorted(summary["tables"].items()):
        print(f"  table {name}: {path}")
    if summary["tables"]:
        from moebench.cli.collect import print_results

        print_results(root)
    return 1 if summary["failed"] else 0
