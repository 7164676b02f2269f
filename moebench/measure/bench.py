"""`moebench bench MODEL`: prefill and decode speed of a model unpruned, pruned, and with skipping.

A select method (``--method premoe_taer|prep``) adds per-request selection, selection with expert
offloading and static pruning at the same ratio (`moebench.measure.select_bench`).

All variants run in one process on the same inputs (warm-up, then repetitions; median and p90).
With ``--skip naee`` it also prints the ideal skipping speedup implied by the measured skip rate s
and the experts' measured share f of forward time, 1 / (1 - f * s), beside the measured one.
"""

from __future__ import annotations

import argparse

from tabulate import tabulate

from moebench.cli.common import add_calibration_arguments, load, parse_params, request_from
from moebench.moe.kernels import KERNEL_NAME, register
from moebench.method.registry import get_method
from moebench.measure.speed import decode_speed, expert_share, prefill_speed, weight_bytes
from moebench.moe.ops import prune
from moebench.method.pipeline import make_plan, statistics
from moebench.moe.skipping import disable_skipping, enable_skipping, naee_betas, skip_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of `moebench bench`."""
    add_calibration_arguments(parser)
    parser.add_argument("--method", default=None, help="also measure the model pruned by this method")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None)
    budget.add_argument("--keep", type=int, default=None)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--skip", choices=["none", "naee"], default="none", help="also measure dynamic skipping")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)


class _Bench:
    """Measures variants of one model in place and collects table rows."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.rows, self.base = [], None

    def measure(self, name: str, skip: bool = False) -> dict:
        a = self.args
        if skip:
            enable_skipping(self.model, self.betas())  # fresh counters for this variant
        pre = prefill_speed(self.model, a.batch, a.prompt_len, a.reps, a.warmup)
        dec = decode_speed(self.model, a.batch, min(32, a.prompt_len), a.new_tokens, a.reps, 1)
        result = {"variant": name, **weight_bytes(self.model), "prefill": pre, "decode": dec,
                  "skip_rate": skip_report(self.model)["skip_rate"] if skip else 0.0}
        self.base = self.base or result
        self.rows.append(result)
        return result

    def betas(self):
        request = request_from(self.args, self.model, method="naee")
        return naee_betas(statistics(self.model, self.tokenizer, request, ["routing"], progress=False))

    def skip_pair(self, label: str) -> str:
        """Measure skipping against the same kernel without skipping; return the ideal-vs-measured line."""
        register()
        self.model.set_experts_implementation(KERNEL_NAME)
        plain = self.measure(f"{label}, moebench kernel")
        share = expert_share(self.model, self.args.batch, self.args.prompt_len)
        skipped = self.measure(f"{label} + skip naee", skip=True)
        disable_skipping(self.model)
        s = skipped["skip_rate"]
        ideal = 1.0 / (1.0 - share * s)
        measured = skipped["prefill"]["tokens_per_s"] / plain["prefill"]["tokens_per_s"]
        return (f"{label}: skip rate {s:.3f} of routed pairs, experts' share of prefill time {share:.3f} -> "
                f"ideal speedup {ideal:.3f}x, measured {measured:.3f}x = {measured / ideal:.2f} of ideal")

    def table(self) -> str:
        rows = []
        for r in self.rows:
            rows.append((r["variant"], f"{r['expert_bytes'] / 1e6:.2f}", f"{r['parameters'] / 1e6:.2f}",
                         f"{r['prefill']['tokens_per_s']:.0f}", f"{r['prefill']['tokens_per_s_p90']:.0f}",
                         f"{r['decode']['tokens_per_s']:.1f}", f"{r['decode']['tokens_per_s_p90']:.1f}",
                         f"{r['prefill']['tokens_per_s'] / self.base['prefill']['tokens_per_s']:.2f}x",
                         f"{r['decode']['tokens_per_s'] / self.base['decode']['tokens_per_s']:.2f}x",
                         f"{r['skip_rate']:.3f}"))
        return tabulate(rows, headers=["variant", "expert MB", "params M", "prefill tok/s", "p90",
                                       "decode tok/s", "p90", "prefill x", "decode x", "skip rate"])


def run(args: argparse.Namespace) -> int:
    """Measure the requested variants and print the table (and skipping's ideal-vs-measured)."""
    if args.method and args.ratio is None and args.keep is None:
        raise ValueError("--method needs a budget: --ratio R or --keep K")
    if args.skip == "naee" and not args.calib:
        raise ValueError("--skip naee needs calibration for its thresholds: give --calib, e.g. testbed:mix")
    model, tokenizer = load(args)
    default_kernel = model.config._experts_implementation
    bench = _Bench(model, tokenizer, args)
    bench.measure("unpruned")
    lines = [bench.skip_pair("unpruned")] if args.skip == "naee" else []
    if args.method and get_method(args.method).kind == "select":  # select / offload variants
        from moebench.measure.select_bench import measure_select

        lines += measure_select(bench, request_from(args, model, method=args.method, ratio=args.ratio,
                                                    keep=args.keep, params=parse_params(args.param)))
    elif args.method:
        model.set_experts_implementation(default_kernel)
        request = request_from(args, model, method=args.method, ratio=args.ratio, keep=args.keep,
                               params=parse_params(args.param))
        prune(model, make_plan(model, tokenizer, request).keep)
        bench.measure(f"{args.method} {args.ratio if args.ratio is not None else f'keep {args.keep}'}")
        if args.skip == "naee":
            lines.append(bench.skip_pair(args.method))
    print(f"moebench bench {args.model}: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.reps} reps after {args.warmup} warm-up; device {next(model.parameters()).device}")
    print(bench.table())
    for line in lines:
        print(line)
    return 0

