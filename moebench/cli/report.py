"""`moebench report RESULTS_DIR`: a study's tidy tables -> ``reports/<study>/`` (see `moebench.report.build`)."""

from __future__ import annotations

import argparse

from moebench.report.build import build_report
from moebench.report.domains import parse_overrides
from moebench.report.tables import MetricSpec, load_studies


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that define average accuracy (shared with `moebench leaderboard`)."""
    parser.add_argument("--metric", default="acc", help="task metric averaged into accuracy (default: acc)")
    parser.add_argument("--filter", default="none", help="lm-eval filter of that metric (default: none)")
    parser.add_argument("--task-metric", action="append", default=[], metavar="TASK=METRIC",
                        help="use another metric for one task, e.g. arc_challenge=acc_norm (repeatable)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to average (default: every leaf task "
                        "reporting the metric)")


def metric_spec(args: argparse.Namespace) -> MetricSpec:
    """The `MetricSpec` the options describe."""
    overrides = {}
    for item in args.task_metric:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise ValueError(f"--task-metric {item!r} must look like TASK=METRIC")
        overrides[task] = metric
    tasks = tuple(sorted(t for t in args.tasks.split(",") if t))
    return MetricSpec(args.metric, args.filter, overrides, tasks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench report`."""
    parser.add_argument("results_dir", help="results/<study> (with tables/) or a folder of studies")
    parser.add_argument("--out", default="reports", help="reports root; each study writes <out>/<study>/")
    add_metric_arguments(parser)
    parser.add_argument("--domain-tasks", action="append", default=[], metavar="SOURCE=TASK[,TASK]",
                        help="domain tasks of a calibration source, replacing the naming rule (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Build a report per study found under ``results_dir``."""
    spec, overrides = metric_spec(args), parse_overrides(args.domain_tasks)
    for study in load_studies(args.results_dir):
        paths = build_report(study, args.out, spec, overrides)
        print(f"{study.name}: {paths['report.md']} ({len(paths['figures']) // 2} figures), {paths['report.pdf']}")
    return 0
