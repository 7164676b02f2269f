"""`moebench methods`: the registered methods, their kind, statistics, parameters and papers."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from moebench.method.registry import load_methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`moebench methods` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print one row per registered method."""
    rows = []
    for name, spec in sorted(load_methods().items()):
        params = ", ".join(f"{p.name}={p.default!r}" for p in spec.params.values()) or "-"
        rows.append((name, spec.kind, ",".join(spec.needs) or "none (data-free)", params, spec.paper[:70]))
    print(tabulate(rows, headers=["method", "kind", "statistics", "parameters", "paper"]))
    ours = [(name, spec.ours) for name, spec in sorted(load_methods().items()) if spec.ours]
    if ours:
        print("\nChoices of ours, where a paper leaves them open:")
        for name, text in ours:
            print(f"  {name}: {text}")
    return 0
