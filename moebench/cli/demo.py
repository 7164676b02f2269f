"""`moebench demo`: the whole pipeline on the embedded testbed, offline, in minutes on a laptop CPU.

Runs the packaged study (`demo_study.yaml`) as a resumable grid into ``results/demo``, writes the
tidy tables, the report into ``reports/demo`` and the leaderboard into ``reports/``, and states
the findings F1-F5 with their numbers (also in ``reports/demo/findings.md``).
"""

from __future__ import annotations

import argparse
import os
import time
from importlib.resources import files

import yaml

from moebench.grid.runner import run_grid, study_root
from moebench.grid.spec import parse_study

SPEC = "demo_study.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench demo`."""
    parser.add_argument("--results", default="results", help="results folder (default ./results)")
    parser.add_argument("--reports", default="reports", help="reports folder (default ./reports)")
    parser.add_argument("--parallel", type=int, default=None, help="cells at once (default: the spec's, 2)")
    parser.add_argument("--spec", default=None,
                        help="run this study YAML instead of the packaged demo study (e.g. a smaller one)")


def demo_spec(path: str | None = None) -> dict:
    """The packaged demo study spec, or the study YAML at ``path``."""
    if path is None:
        return yaml.safe_load(files("moebench.testbed").joinpath(SPEC).read_text())
    if not os.path.isfile(path):
        raise SystemExit(f"moebench demo: --spec {path!r} is not a file; give a study YAML (see `moebench grid`)")
    with open(path) as f:
        return yaml.safe_load(f)


def run(args: argparse.Namespace) -> int:
    """Run the demo grid, then the report, leaderboard and findings."""
    from moebench.cli import main as cli_main
    from moebench.report.findings import findings
    from moebench.report.tables import load_studies

    start = time.perf_counter()
    spec = demo_spec(args.spec)
    if args.parallel:
        spec["executor"] = {**spec.get("executor", {}), "parallel": args.parallel}
    if spec.get("executor", {}).get("parallel", 1) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per cell process, no oversubscription
    study = parse_study(spec)
    root = study_root(args.results, study)
    print(f"moebench demo: {len(study.cells)} cells on {', '.join(spec['models'])} -> {root}")
    summary = run_grid(study, root)
    print(f"grid: {summary['done']} cells run now, {summary['skipped']} already done, {len(summary['failed'])} failed")
    if summary["failed"]:
        for folder in summary["failed"]:
            print(f"  failed: {folder} (see failure.json)")
        return 1
    cli_main(["report", root, "--out", args.reports])
    cli_main(["leaderboard", args.results, "--out", args.reports])
    lines = findings(load_studies(root)[0])
    out = os.path.join(args.reports, study.name, "findings.md")
    with open(out, "w") as f:
        f.write("# Findings on the embedded testbed\n\n" + "\n\n".join(f"- {line}" for line in lines) + "\n")
    print("\n".join(lines))
    print(f"report: {os.path.join(args.reports, study.name, 'report.pdf')}; findings: {out}; "
          f"{time.perf_counter() - start:.0f}s in all")
    return 0
