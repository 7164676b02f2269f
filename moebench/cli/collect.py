"""`moebench collect RESULTS_DIR`: (re)derive the tidy runs and scores tables from the cell folders."""

from __future__ import annotations

import argparse
import sys

from moebench.grid.runner import collect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench collect`."""
    parser.add_argument("results_dir", help="a study's results folder (results/<study>) or a folder of studies")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="write tables even when cells differ in lm-eval or task versions (flagged)")
    parser.add_argument("--skip-broken", action="store_true",
                        help="write the tables without finished cells whose files are broken (named on stderr)")


def run(args: argparse.Namespace) -> int:
    """Write runs/scores as CSV and Parquet and print their paths; broken cells are named by path."""
    paths, broken = collect(args.results_dir, args.allow_mixed, args.skip_broken)
    for folder, problem in sorted(broken.items()):
        print(f"skipped broken cell {folder}: {problem} (its DONE was removed: the next grid run redoes it)",
              file=sys.stderr)
    for name, path in sorted(paths.items()):
        print(f"{name}: {path}")
    print_results(args.results_dir)
    return 0


def print_results(results_dir: str) -> None:
    """The results table of each study under ``results_dir`` (`moebench.results.results_table`)."""
    from moebench.report.tables import load_studies
    from moebench.results import load, results_table

    for study in load_studies(results_dir):
        print(f"\n{study.name}: {len(study.runs)} cells (average accuracy over its tasks; decode speedup paired "
              "against the unpruned model, 95% interval)")
        print(results_table(load(results_dir, study.name).summary()))
    print("\nAll columns: moebench.results.load(...).summary(); figures and the report: moebench report")
