"""Prefill and decode speed of one model unpruned, pruned, and with dynamic skipping (`moebench bench`).

A select method adds per-request selection, selection with expert offloading and static pruning at
the same ratio (`moebench.measure.select_bench`).

All variants run in one process on the same inputs (warm-up, then repetitions; median and p90).
The unpruned model is measured with transformers' default experts kernel and with the moebench
kernel (the one skipping needs).
With skipping it also states the ideal skipping speedup implied by the measured skip rate s and the
experts' measured share f of forward time, 1 / (1 - f * s), beside the measured one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tabulate import tabulate

from moebench.measure.speed import decode_speed, expert_share, prefill_speed, weight_bytes
from moebench.method.apply import apply
from moebench.method.pipeline import PlanRequest, make_plan, statistics
from moebench.method.registry import get_method
from moebench.moe.kernels import KERNEL_NAME, register
from moebench.moe.skipping import disable_skipping, enable_skipping, naee_betas, skip_report


@dataclass(frozen=True)
class BenchSettings:
    """What is timed: batch, prompt length, new tokens, repetitions after warm-up."""

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    reps: int = 5
    warmup: int = 2


class Bench:
    """Measures variants of one model in place and collects table rows.

    ``base`` is the request with the calibration settings (method ``none``); variants derive theirs.
    """

    def __init__(self, model, tokenizer, base: PlanRequest, settings: BenchSettings):
        self.model, self.tokenizer, self.base_request, self.settings = model, tokenizer, base, settings
        self.rows, self.base = [], None

    def measure(self, name: str, skip: bool = False) -> dict:
        a = self.settings
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
        request = replace(self.base_request, method="naee")
        return naee_betas(statistics(self.model, self.tokenizer, request, ["routing"], progress=False))

    def skip_pair(self, label: str) -> str:
        """Measure skipping against the same kernel without skipping; return the ideal-vs-measured line."""
        register()
        self.model.set_experts_implementation(KERNEL_NAME)
        plain = self.measure(f"{label}, moebench kernel")
        share = expert_share(self.model, self.settings.batch, self.settings.prompt_len)
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


def bench_variants(model, tokenizer, base: PlanRequest, settings: BenchSettings, method: str | None = None,
                   skip: str = "none") -> tuple[Bench, list[str]]:
    """Measure unpruned, then ``base``'s method (pruned or selected), each with skipping if asked.

    Returns the bench (its rows and table) and the lines to print below the table.
    """
    default_kernel = model.config._experts_implementation
    bench = Bench(model, tokenizer, base, settings)
    bench.measure("unpruned")
    if skip == "naee":  # the moebench kernel without and with skipping
        lines = [bench.skip_pair("unpruned")]
    else:  # both kernels, so skipping's kernel is known to cost nothing by itself
        register()
        model.set_experts_implementation(KERNEL_NAME)
        bench.measure("unpruned, moebench kernel")
        lines = []
    model.set_experts_implementation(default_kernel)
    if method and get_method(method).kind == "select":  # select / offload variants
        from moebench.measure.select_bench import measure_select

        lines += measure_select(bench, replace(base, method=method))
    elif method:
        request = replace(base, method=method)
        apply(model, make_plan(model, tokenizer, request))  # pruned, or merged for merge methods
        bench.measure(f"{method} {base.ratio if base.ratio is not None else f'keep {base.keep}'}")
        if skip == "naee":
            lines.append(bench.skip_pair(method))
    return bench, lines
