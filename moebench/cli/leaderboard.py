"""`moebench leaderboard`: regenerate ``reports/leaderboard.md`` and ``.html`` from every study's results."""

from __future__ import annotations

import argparse

from moebench.cli.report import add_metric_arguments, metric_spec
from moebench.report.leaderboard import write_leaderboard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench leaderboard`."""
    parser.add_argument("results_dir", nargs="?", default="results", help="folder of study results (default: results)")
    parser.add_argument("--out", default="reports", help="folder for leaderboard.md and leaderboard.html")
    add_metric_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Regenerate the leaderboard files and print their paths."""
    for path in write_leaderboard(args.results_dir, args.out, metric_spec(args)):
        print(path)
    return 0
