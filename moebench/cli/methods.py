"""`moebench methods`: the registered methods, their kind, statistics, parameters and papers."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from moebench.method.registry import load_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`moebench methods` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print one row per registered method, then what each implementation follows and what is moebench's own."""
    rows = []
    methods = sorted(load_methods().items())
    for name, spec in methods:
        params = ", ".join(f"{p.name}={p.default!r}" for p in spec.params.values()) or "-"
        rows.append((name, spec.kind, ",".join(spec.needs) or "none (data-free)", params, spec.paper[:70]))
    print(tabulate(rows, headers=["method", "kind", "statistics", "parameters", "paper"]))
    print()
    print(tabulate([(name, spec.source or "-") for name, spec in methods],
                   headers=["method", "implementation (authors' code, paper, reconstruction; moebench's choices)"]))
    return 0
