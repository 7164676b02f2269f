"""`moebench calibrate MODEL --calib C`: collect and cache the calibration statistics once.

By default it collects the cheap groups (routing, norms, logits: one forward pass over the tokens, enough
for frequency, soft activation, EAN, REAP and PreMoE); ``--methods`` collects what the named methods need
instead, ``--groups`` names groups (``all``: every group, including the dense ``expert_means``, which runs
every expert on every token). It says first which methods the collected groups serve.
"""

from __future__ import annotations

import argparse
import time

from moebench.calib.cache import CHEAP_GROUPS
from moebench.calib.stats import GROUPS
from moebench.cli.common import add_calibration_arguments, load, request_from
from moebench.method.pipeline import statistics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench calibrate`."""
    add_calibration_arguments(parser)
    parser.add_argument("--methods", default=None,
                        help="collect what these methods need, comma-separated (e.g. reap,naee; see moebench methods)")
    parser.add_argument("--groups", default=None,
                        help=f"statistic groups to collect, comma-separated, or 'all' ({','.join(GROUPS)}). Default: "
                             f"what --methods need, else the cheap groups {','.join(CHEAP_GROUPS)}")


def chosen_groups(methods: str | None, groups: str | None) -> list[str]:
    """The groups to collect from ``--methods`` / ``--groups`` (both: the union); refuses unknown names."""
    from moebench.method.registry import get_method
    from moebench.util import did_you_mean

    wanted: list[str] = []
    for name in _names(methods):
        wanted += get_method(name).needs_for() or []  # unknown methods raise with suggestions
    if groups and groups.strip().lower() == "all":
        wanted += GROUPS
    else:
        for group in _names(groups):
            if group not in GROUPS:
                raise ValueError(f"--groups: unknown statistic group {group!r}{did_you_mean(group, GROUPS)}; "
                                 f"groups: {', '.join(GROUPS)} (or all)")
            wanted.append(group)
    if not methods and not groups:
        wanted = list(CHEAP_GROUPS)
    if not wanted:  # only data-free methods named
        raise ValueError(f"--methods {methods}: these methods need no calibration statistics")
    return [g for g in GROUPS if g in wanted]


def served_methods(groups: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(methods the groups serve, {method: groups it still lacks})`` over the registered methods that calibrate."""
    from moebench.method.registry import load_methods

    served, lacking = [], {}
    for name, spec in sorted(load_methods().items()):
        needs = spec.needs_for()
        if not needs:
            continue
        missing = [g for g in needs if g not in groups]
        if missing:
            lacking[name] = missing
        else:
            served.append(name)
    return served, lacking


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Collect (or find in the cache) the chosen statistic groups and say which methods they serve."""
    if not args.calib:
        raise ValueError("give a calibration source with --calib, e.g. --calib c4 or --calib testbed:mix")
    groups = chosen_groups(args.methods, args.groups)
    served, lacking = served_methods(groups)
    print(f"calibrate: collecting {', '.join(groups)}: what {', '.join(served) or 'no method'} need", flush=True)
    if lacking:
        others = "; ".join(f"{name}: {', '.join(g)}" for name, g in lacking.items())
        print(f"  other methods need more ({others}): add --methods NAME, or --groups all", flush=True)
    model, tokenizer = load(args)
    request = request_from(args, model)
    start = time.perf_counter()
    stats = statistics(model, tokenizer, request, groups)
    layer = next(iter(stats.values()))
    print(f"statistics for {len(stats)} MoE layers, groups {', '.join(groups)} "
          f"({int(layer['tokens'].item()) if 'tokens' in layer else '?'} tokens) in {time.perf_counter() - start:.1f}s")
    # where they are: `statistics` printed the cache folder (to stderr, with whether they were there already)
    return 0
