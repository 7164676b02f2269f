"""`moebench demo`: the whole pipeline on the embedded testbed, offline, in minutes on a laptop CPU.

Runs the packaged study (`demo_study.yaml`) as a resumable grid into ``demo-run/results/demo``
(a folder of its own, so a fresh clone really runs the pipeline rather than finding the committed
``results/demo``), writes the tidy tables, the report into ``demo-run/reports/demo`` and the
leaderboard into ``demo-run/reports/``, states the findings F1-F7 with their numbers (also in
``findings.md``) and the elapsed time. The first line says how many cells are already finished
there and will be reused. ``--results results --reports reports`` regenerates the committed ones.
"""

from __future__ import annotations

import argparse
import os
import time
from importlib.resources import files

import yaml

from moebench.grid.runner import run_grid, status, study_root
from moebench.grid.spec import parse_study
from moebench.util import atomic_write_text

SPEC = "demo_study.yaml"
DEFAULT_OUT = "demo-run"  # not results/: the committed leaderboard stays as it is


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench demo`."""
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder of this run: <out>/results and <out>/reports (default ./{DEFAULT_OUT})")
    parser.add_argument("--results", default=None, help="results folder (default <out>/results)")
    parser.add_argument("--reports", default=None, help="reports folder (default <out>/reports)")
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
    """Run the demo grid, then the report, leaderboard and findings; say what was reused and the time taken."""
    start = time.perf_counter()
    spec = demo_spec(args.spec)
    if args.parallel:
        spec["executor"] = {**spec.get("executor", {}), "parallel": args.parallel}
    if spec.get("executor", {}).get("parallel", 1) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per cell process, no oversubscription
    study = parse_study(spec)
    results = args.results or os.path.join(args.out, "results")
    reports = args.reports or os.path.join(args.out, "reports")
    root = study_root(results, study)
    print(first_line(len(study.cells), len(status(study, root)["done"]), spec["models"], root))
    summary = run_grid(study, root)
    print(f"grid: {summary['done']} cells run now, {summary['skipped']} already done, {len(summary['failed'])} failed")
    if summary["failed"]:
        for folder in summary["failed"]:
            print(f"  failed: {folder} (see failure.json)")
        print(f"elapsed: {elapsed(time.perf_counter() - start)}")
        return 1
    write_reports(study.name, root, results, reports)
    print(f"elapsed: {elapsed(time.perf_counter() - start)}")
    return 0


def first_line(cells: int, done: int, models: list[str], root: str) -> str:
    """What this run will do: every cell, or the ones an earlier run left unfinished (said plainly)."""
    head = f"moebench demo: {cells} cells on {', '.join(models)} -> {root}"
    if done == 0:
        return f"{head} (a fresh run)"
    return (f"{head}: {done} of {cells} cells are already finished there (an earlier run) and are reused, "
            f"{cells - done} run now; to run all again, remove {root} or give another --out")


def write_reports(name: str, root: str, results: str, reports: str) -> None:
    """The study's report, the leaderboard of every study under ``results``, and the findings."""
    from moebench.cli import main as cli_main
    from moebench.report.findings import findings
    from moebench.report.tables import load_studies

    cli_main(["report", root, "--out", reports])
    cli_main(["leaderboard", results, "--out", reports])
    lines = findings(load_studies(root)[0])
    out = os.path.join(reports, name, "findings.md")
    atomic_write_text(out, "# Findings on the embedded testbed\n\n" + "\n\n".join(f"- {line}" for line in lines) + "\n",
                      root=reports)
    print("\n".join(lines))
    print(f"report: {os.path.join(reports, name, 'report.pdf')}; findings: {out}")


def elapsed(seconds: float) -> str:
    """``12 min 05 s`` (or ``42 s``)."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
