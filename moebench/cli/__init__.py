"""The `moebench` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `moebench --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moebench.cli.demo", "the whole pipeline on the embedded testbed: grid, tables, report, findings"),
    "inspect": ("moebench.cli.inspect", "show the MoE structure of a model (hub id, local folder or testbed name)"),
    "zoo": ("moebench.cli.zoo", "the embedded testbed models: list, train"),
    "methods": ("moebench.cli.methods", "list the registered pruning methods with their parameters and papers"),
    "calibrate": ("moebench.cli.calibrate", "collect and cache calibration statistics for a model"),
    "prune": ("moebench.cli.prune", "prune a model with a method and save a checkpoint plus plan.json"),
    "lm-eval": ("moebench.cli.lm_eval", "lm-eval's command line with --model pruned_moe registered"),
    "recover": ("moebench.cli.recover", "train a pruned checkpoint to recover accuracy: LoRA, router distillation"),
    "env": ("moebench.cli.env", "create the Python environment of lm-eval's vLLM backend (moebench env vllm)"),
    "grid": ("moebench.cli.grid", "run a study (models x methods x ratios x calibration sets): run, status"),
    "collect": ("moebench.cli.collect", "derive the tidy runs/scores tables from a results folder"),
    "bench": ("moebench.cli.bench", "measure prefill/decode speed: unpruned, pruned, with dynamic skipping"),
    "bench-overhead": ("moebench.cli.bench_overhead",
                       "wall time of lm-eval with pruned_moe method=none vs hf on one task"),
    "bench-kernel": ("moebench.cli.bench_kernel", "experts kernel speed vs transformers' default at real widths"),
    "bench-naee": ("moebench.cli.bench_naee", "benchmark NAEE enumeration: cached recombination vs naive re-forward"),
    "bench-beam": ("moebench.cli.bench_beam", "time NAEE's beam search per layer at real widths and 16-128 experts"),
    "bench-scale": ("moebench.cli.bench_scale",
                    "memory and time of sequential calibration + streaming prune on a model with real layer shapes"),
    "report": ("moebench.cli.report", "a study's tables -> reports/<study>/: report.md, report.pdf, figures, LaTeX"),
    "leaderboard": ("moebench.cli.leaderboard", "regenerate reports/leaderboard.md and .html from all results"),
}


class _Version(argparse.Action):
    """``--version``: print `version_line` unwrapped and exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """``moebench X (torch Y, transformers Z, lm-eval W, python V)``, read without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import moebench

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"moebench {moebench.__version__} (torch {of('torch')}, transformers {of('transformers')}, "
            f"lm-eval {of('lm_eval')}, python {platform.python_version()})")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="moebench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print moebench's version and those of torch, transformers and lm-eval")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moebench` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as err:  # bad input: say what and why, no traceback
        print(f"moebench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
