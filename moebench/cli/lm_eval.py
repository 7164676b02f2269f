"""`moebench lm-eval ARGS...`: lm-eval's own command line with ``--model pruned_moe`` registered.

Every argument goes to lm-eval unchanged (``-h`` too), e.g.

    moebench lm-eval --model pruned_moe --model_args pretrained=M,method=reap,ratio=0.5,calib=c4 --tasks arc_easy

The same as the ``lm_eval`` command where moebench's install hook is active; this shim also works
where it is not (``python -S``, a source checkout on ``PYTHONPATH``, an unusual installer).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Take every remaining argument as lm-eval's."""
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="lm-eval arguments, e.g. --model pruned_moe --model_args ... --tasks ...")
    # No argument is this parser's option: `--model`, `-h`, ... all belong to lm-eval.
    parser.prefix_chars = "\0"


def run(args: argparse.Namespace) -> int:
    """Register ``pruned_moe``, then run lm-eval's command line with the arguments."""
    from moebench.eval.plugin import register

    register()
    from lm_eval.__main__ import cli_evaluate

    from moebench.eval.args import repeated_in_command_line

    repeated = repeated_in_command_line(args.lm_eval_args)
    if repeated:  # before lm-eval merges the string (keeping the last value) and loads anything
        raise ValueError(repeated)
    saved = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
