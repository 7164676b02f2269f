"""Prefill and decode speed of one model unpruned, pruned, and with dynamic skipping (`moebench bench`).

Every row is timed in this process, interleaved with what it is compared with, and its speedup is
the paired ratio of `moebench.measure.paired` (the same definition as a grid cell's): the median
over repetitions of the compared-with time / the row's time, with its 95% interval.

- ``unpruned``: transformers' default experts kernel; the reference (1 by definition).
- ``unpruned, moebench kernel``: the same model in moebench's kernel, against ``unpruned`` (what the
  kernel alone costs or gains).
- ``<method> <budget>``: the model pruned (or merged), against an unpruned copy in the same kernel.
- ``... + skip naee``: dynamic skipping, against the same model with its skip rules paused, in the
  same (moebench's) kernel; the line below the table states the ideal speedup 1 / (1 - f x s)
  implied by the realised skip rate s and the experts' measured share f of forward time.
- A select method adds per-request selection, selection with offloading and static pruning at the
  same ratio (`moebench.measure.select_bench`).

The unpruned copy (for pruned, merged and offloaded rows) doubles the model's memory while the bench
runs. Timing holds this machine's timing slot (`moebench.measure.load`), and the load record says
whether other processes used the cores meanwhile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from tabulate import tabulate

from moebench.measure.load import CpuLoad, Slot
from moebench.measure.paired import Side, paired_speed
from moebench.measure.speed import expert_share, weight_bytes
from moebench.method.apply import apply, unchanged
from moebench.method.pipeline import PlanRequest, make_plan, statistics
from moebench.method.registry import get_method
from moebench.moe.kernels import KERNEL_NAME, experts_kernel, register
from moebench.moe.skipping import disable_skipping, enable_skipping, naee_betas, skip_report, skipping_paused


@dataclass(frozen=True)
class BenchSettings:
    """What is timed: batch, prompt length, new tokens, repetitions after warm-up."""

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    reps: int = 6  # the fewest whose range is a 95% interval of the median ratio
    warmup: int = 2


class Bench:
    """Paired measurements of variants of one model, collected as table rows.

    ``base`` is the request with the calibration settings (method ``none``); variants derive theirs.
    """

    def __init__(self, model, tokenizer, base: PlanRequest, settings: BenchSettings):
        self.model, self.tokenizer, self.base_request, self.settings = model, tokenizer, base, settings
        self.rows: list[dict] = []
        self.default_kernel = model.config._experts_implementation
        self.slot, self.loads = Slot(), []

    def compare(self, reference: Side, variants: list[tuple[Side, dict]], reference_row: dict | None = None
                ) -> dict[str, dict]:
        """Time ``reference`` and each variant interleaved; add a row per variant (``extra``: its other
        columns), first one for the reference itself when ``reference_row`` gives its columns (speedup 1 by
        definition), and return the measurements by side name."""
        a = self.settings
        with self.slot.exclusive(), CpuLoad() as load:
            got = paired_speed([reference, *(s for s, _ in variants)], a.batch, a.prompt_len, max(a.new_tokens, 2),
                               a.reps, a.warmup)
        self.loads.append(load.record())
        if reference_row is not None:
            self.rows.append({"variant": reference.name, "vs": reference.name, **reference_row, **got[reference.name],
                              "ratio": None})
        for side, extra in variants:
            self.rows.append({"variant": side.name, "vs": reference.name, **extra, **got[side.name],
                              "ratio": got["ratios"][side.name]})
        return got

    def betas(self):
        request = replace(self.base_request, method="naee")
        return naee_betas(statistics(self.model, self.tokenizer, request, ["routing"], progress=False))

    def columns(self, model, kernel_name: str | None = None) -> dict:
        """The non-speed columns of a row of ``model`` as it is now."""
        return {**weight_bytes(model), "kernel": kernel_name or model.config._experts_implementation,
                "skip_rate": 0.0}

    def skip_pair(self, label: str, model) -> str:
        """Skipping on ``model`` against the same model with its rules paused (moebench's kernel both); returns
        the ideal-vs-measured line."""
        register()
        with experts_kernel(model, KERNEL_NAME):
            share = expert_share(model, self.settings.batch, self.settings.prompt_len)
        enable_skipping(model, self.betas())
        runner = unchanged(model)
        plain = Side(f"{label}, moebench kernel, no skip", runner, lambda: skipping_paused(model))
        skipped = Side(f"{label} + skip naee", runner)
        got = self.compare(plain, [(skipped, self.columns(model))])
        self.rows[-1]["skip_rate"] = s = skip_report(model)["skip_rate"]
        disable_skipping(model)  # the previous kernel is back
        ideal = 1.0 / (1.0 - share * s)
        measured = got["ratios"][skipped.name]["prefill"]["speedup"]
        return (f"{label}: skip rate {s:.3f} of routed pairs, experts' share of prefill time {share:.3f} -> "
                f"ideal speedup {ideal:.3f}x, measured {measured:.3f}x = {measured / ideal:.2f} of ideal "
                "(prefill, paired with skipping paused)")

    def table(self) -> str:
        rows = []
        for r in self.rows:
            ratio = r["ratio"]
            rows.append((r["variant"], r["kernel"], f"{r['expert_bytes'] / 1e6:.2f}", f"{r['parameters'] / 1e6:.2f}",
                         f"{r['prefill']['tokens_per_s']:.0f}", f"{r['decode']['tokens_per_s']:.1f}",
                         _x(ratio, "prefill"), _x(ratio, "decode"), r["vs"] if ratio else "-", f"{r['skip_rate']:.3f}"))
        return tabulate(rows, headers=["variant", "kernel", "expert MB", "params M", "prefill tok/s", "decode tok/s",
                                       "prefill x [95%]", "decode x [95%]", "paired with", "skip rate"])

    def load_line(self) -> str:
        """How busy the machine was while timing, at worst over the comparisons (`moebench.measure.load`)."""
        if not self.loads:
            return ""
        r, others = self.loads[0], [x["others_cpu"] for x in self.loads if x["others_cpu"] is not None]
        other = f"at most {max(others):.2f} cores" if others else "not measured"
        loaded = sum(bool(x["under_load"]) for x in self.loads)
        verdict = (f" -> UNDER LOAD in {loaded} of {len(self.loads)} comparisons: their ratios are not to be trusted"
                   if loaded else "")
        averages = [v for x in self.loads for v in (x["load_before"], x["load_after"]) if v is not None]
        average = f", load average {min(averages):.2f}-{max(averages):.2f}" if averages else ""
        return (f"machine while timing: {r['threads']} threads of {r['cpu_cores']} cores, other processes {other}"
                f"{average}{verdict}")


def _x(ratio: dict | None, stage: str) -> str:
    if not ratio:
        return "1.00x"
    r = ratio[stage]
    return f"{r['speedup']:.2f}x [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]"


def bench_variants(model, tokenizer, base: PlanRequest, settings: BenchSettings, method: str | None = None,
                   skip: str = "none") -> tuple[Bench, list[str]]:
    """Measure unpruned (both kernels), then ``base``'s method (pruned, merged or selected), each with skipping
    if asked. Returns the bench (its rows and table) and the lines to print below the table."""
    bench = Bench(model, tokenizer, base, settings)
    register()
    runner = unchanged(model)
    unpruned = Side("unpruned", runner)
    in_kernel = Side("unpruned, moebench kernel", runner, lambda: experts_kernel(model, KERNEL_NAME))
    bench.compare(unpruned, [(in_kernel, bench.columns(model, KERNEL_NAME))], reference_row=bench.columns(model))
    lines = [bench.skip_pair("unpruned", model)] if skip == "naee" else []
    if method and get_method(method).kind == "select":  # select / offload variants
        from moebench.measure.select_bench import measure_select

        lines += measure_select(bench, replace(base, method=method))
    elif method:
        reference = copy.deepcopy(model)  # unpruned, timed beside the pruned model
        request = replace(base, method=method)
        apply(model, make_plan(model, tokenizer, request))  # pruned, or merged for merge methods
        label = f"{method} {base.ratio if base.ratio is not None else f'keep {base.keep}'}"
        bench.compare(Side("unpruned", unchanged(reference)), [(Side(label, unchanged(model)), bench.columns(model))])
        del reference
        if skip == "naee":
            lines.append(bench.skip_pair(label, model))
    lines.append(bench.load_line())
    return bench, lines
