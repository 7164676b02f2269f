"""`moebench collect RESULTS_DIR`: (re)derive the tidy runs and scores tables from the cell folders."""

from __future__ import annotations

import argparse

from moebench.grid.results import write_tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench collect`."""
    parser.add_argument("results_dir", help="a study's results folder (results/<study>) or a folder of studies")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="write tables even when cells differ in lm-eval or task versions (flagged)")


def run(args: argparse.Namespace) -> int:
    """Write runs/scores as CSV and Parquet and print their paths."""
    for name, path in sorted(write_tables(args.results_dir, args.allow_mixed).items()):
        print(f"{name}: {path}")
    return 0
