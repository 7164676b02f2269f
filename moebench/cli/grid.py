"""`moebench grid run|status SPEC`: run a study's unfinished cells, or say where it stands."""

from __future__ import annotations

import argparse
import sys

FILTER_HELP = ("key=value[,key=value]: model, method, ratio, calib, skip or a method parameter; wildcards allowed "
               "(e.g. method=reap,ratio=0.5); repeat to select either")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench grid`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("run", "run every unfinished cell, then write the tidy tables"),
                         ("status", "where the study stands: cells done / running / failed / broken / pending, "
                                    "named by method, ratio and calibration")):
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("spec", help="study spec (YAML)")
        p.add_argument("--results", default="results", help="results folder (default ./results)")
        p.add_argument("--only", action="append", metavar="FILTER", help="only the cells that match: " + FILTER_HELP)
    sub.choices["status"].add_argument("--all", action="store_true", help="list the finished cells too")
    run_p = sub.choices["run"]
    run_p.add_argument("--executor", choices=["local", "slurm"], default=None, help="override the spec's executor")
    run_p.add_argument("--parallel", type=int, default=None, help="cells at once for the local executor")
    run_p.add_argument("--dry-run", action="store_true",
                       help="print the cells that would run and the calibration passes; write nothing")
    run_p.add_argument("--retry-failed", action="store_true",
                       help="run only the cells that failed (or whose results are broken), not the pending ones")
    run_p.add_argument("--force", action="append", metavar="FILTER",
                       help="run the matching finished cells again (their results are replaced): " + FILTER_HELP)


def run(args: argparse.Namespace) -> int:
    """Run or report on a study."""
    from moebench.grid.select import FilterError

    try:
        return _status(args) if args.action == "status" else _run(args)
    except FilterError as error:
        print(f"moebench grid: {error}", file=sys.stderr)
        return 2


def _status(args: argparse.Namespace) -> int:
    """Counts and unfinished cells in spec terms, read from the study folder (no torch / lm-eval import)."""
    import os

    from moebench.grid.select import select
    from moebench.grid.status import format_status, study_status

    root, states, fast = study_status(args.spec, args.results)
    if args.only:
        every = [cell for cells in states.values() for cell in cells]
        keep = {id(cell) for cell in select(every, args.only)}
        states = {state: [c for c in cells if id(c) in keep] for state, cells in states.items()}
    print(format_status(os.path.basename(root), root, states, fast, args.all))
    return 0


def _run(args: argparse.Namespace) -> int:
    import os

    from moebench.grid.runner import dry_run, run_grid, study_root
    from moebench.grid.spec import load_study
    from moebench.grid.status import CellRow, failure_line, who_runs

    study = load_study(args.spec)
    root = study_root(args.results, study)
    if args.dry_run:
        print(dry_run(study, root, args.only, args.force, args.retry_failed))
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
    summary = run_grid(study, root, executor, only=args.only, force=args.force, retry_failed=args.retry_failed)
    label = _labels(study, root, CellRow)
    left = f", {len(summary['left'])} not selected" if summary["left"] else ""
    print(f"{study.name}: {summary['cells']} cells: {summary['done']} done now, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed, {len(summary['elsewhere'])} running elsewhere{left}")
    for folder in summary["forced"]:
        if folder in summary.get("stale", {}):
            print(f"  stale: {label(folder)} ran again ({summary['stale'][folder]})")
        else:
            print(f"  forced: {label(folder)} ran again")
    for folder, problem in sorted(summary["reopened"].items()):
        print(f"  redone: {label(folder)} held broken results ({problem})")
    for folder in summary["elsewhere"]:
        where = who_runs(folder, summary["holders"][folder])
        print(f"  running elsewhere: {label(folder)}: held by another run ({where}); left to it")
    for folder in summary["failed"]:
        print(f"  failed: {label(folder)}: {failure_line(folder)} (see {folder}/failure.json; "
              "`moebench grid run --retry-failed` runs only these)")
    if summary["tables"]:
        folders = sorted({os.path.dirname(path) for path in summary["tables"].values()})
        names = sorted({os.path.splitext(name)[0] for name in summary["tables"]})
        print(f"  tables: {', '.join(names)} (CSV and Parquet) in {', '.join(folders)}")
    if summary["tables"]:
        from moebench.cli.collect import print_results

        print_results(root)
    return 1 if summary["failed"] else 0


def _labels(study, root: str, row_class):
    """folder -> ``reap ratio 0.5 calib testbed:mix (model)  [cells/<id>]``."""
    from moebench.grid.index import index_row
    from moebench.grid.runner import cell_dir

    rows = {cell_dir(root, cell): row_class(cell.id, cell_dir(root, cell), index_row(cell, "")) for cell in study.cells}
    return lambda folder: f"{rows[folder].label()} [cells/{rows[folder].id}]" if folder in rows else folder
