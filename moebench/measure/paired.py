"""Paired speed: a variant timed against its reference in one process, on the same inputs, interleaved.

The one definition of a speed ratio in moebench (the grid's cells and `moebench bench` both use it):

    speedup_i = t_reference,i / t_variant,i        for repetition i (the same inputs for both)
    speedup   = median_i speedup_i
    lo, hi    = a 95% confidence interval of that median: order statistics x_(k) and x_(n+1-k), k the
                largest with P(Binomial(n, 1/2) < k) <= 0.025 (distribution-free, the sign test's);
                for 6-8 repetitions the smallest and largest ratio, for 9-11 the second smallest and largest
                (5 or fewer cannot reach 95%: their range covers 93.8% at 5; hence 6 by default)

A ratio differs measurably from 1 only when its interval excludes 1.

Repetitions alternate the sides and reverse the order every other repetition (ref, var, var, ref,
ref, var, ...), so slow drifts of the machine's speed hit both sides alike and cancel in each pair.
Each side is warmed up first; within a repetition a side runs ``best_of`` times back to back and its
fastest run counts, with the garbage collector off (short disturbances drop out). A side may switch
something on only while it is timed (``Side.setup``: the experts kernel, skipping off), outside the
timed region.

Prefill: one forward over ``batch x prompt_len`` tokens without KV cache (``best_of`` runs per
repetition, the fastest kept). Decode: greedy decoding one step at a time (`DecodeSession`: one
forward of one new token per sequence with the KV cache, as generation runs the model), the sides
alternating at every step, so a slow spell of the machine falls on both; per repetition a side's
figure is the median of its ``new_tokens - 1`` steps.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from moebench.measure.speed import DecodeSession, _ids, _sync, summary
from moebench.method.apply import Applied

BEST_OF = 3  # prefill runs per side and repetition, the fastest kept (ours: at 1, one run in five was an outlier
#              on a 2-core VM); decode alternates the sides at every step instead


@dataclass
class Side:
    """One side of a paired measurement: a name, the model as it runs (`Applied`), and what to switch
    on while it is timed (a context-manager factory, or None)."""

    name: str
    runner: Applied
    setup: Callable[[], AbstractContextManager] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.runner.model.parameters()).device

    def active(self) -> AbstractContextManager:
        return self.setup() if self.setup is not None else nullcontext()


def interleaved(sides: list[Side], work: Callable[[Side], object], reps: int, warmup: int,
                best_of: int = BEST_OF) -> dict[str, list[float]]:
    """Seconds of ``work(side)`` per side and repetition: warm-up per side, then alternating, order
    reversed every other repetition. Each repetition runs ``work`` ``best_of`` times back to back and
    keeps the fastest (the run least disturbed by the machine); Python's garbage collector is off
    while timing, as in `timeit`. Only ``work`` is inside the timed region."""
    if reps < 1 or best_of < 1:
        raise ValueError(f"paired timing needs reps >= 1 and best_of >= 1 (got {reps}, {best_of})")
    for side in sides:
        with side.active():
            for _ in range(warmup):
                work(side)
    times = {side.name: [] for side in sides}
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                with side.active():
                    times[side.name].append(min(_once(side, work) for _ in range(best_of)))
    finally:
        if collecting:
            gc.enable()
    return times


def _once(side: Side, work) -> float:
    _sync(side.device)
    start = time.perf_counter()
    work(side)
    _sync(side.device)
    return time.perf_counter() - start


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``level`` confidence interval of the median of ``values`` (order statistics; with
    fewer than 6 values the coverage falls below ``level``: 5 give 93.8%, and the interval is their range)."""
    ordered, n = sorted(values), len(values)
    alpha, k, below = (1 - level) / 2, 1, 0.0
    while k < (n + 1) // 2:  # largest k with P(B < k) <= alpha, B ~ Binomial(n, 1/2)
        below += math.comb(n, k - 1) / 2 ** n
        if below + math.comb(n, k) / 2 ** n > alpha:
            break
        k += 1
    return ordered[k - 1], ordered[n - k]


def summarise_ratios(ratios: list[float]) -> dict:
    """``speedup`` (median), ``speedup_lo`` / ``speedup_hi`` (its 95% interval), ``speedup_min`` / ``_max``,
    ``pairs`` and the ``ratios`` themselves."""
    if not ratios:
        raise ValueError("no ratios to summarise")
    lo, hi = median_interval(ratios)
    return {"speedup": statistics.median(ratios), "speedup_lo": lo, "speedup_hi": hi, "speedup_min": min(ratios),
            "speedup_max": max(ratios), "pairs": len(ratios), "ratios": list(ratios)}


def ratio_summary(reference: list[float], variant: list[float]) -> dict:
    """`summarise_ratios` of the per-repetition ratios reference time / variant time."""
    if len(reference) != len(variant) or not reference:
        raise ValueError(f"paired ratios need as many reference as variant times (got {len(reference)} and "
                         f"{len(variant)})")
    return summarise_ratios([r / max(v, 1e-12) for r, v in zip(reference, variant, strict=True)])


@torch.no_grad()
def paired_prefill(sides: list[Side], batch: int, length: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of one prefill forward ``[batch, length]`` per side and repetition (same ids for all)."""
    ids = _ids(sides[0].runner.model, batch, length)
    return interleaved(sides, lambda s: s.runner.forward(ids.to(s.device)), reps, warmup)


@torch.no_grad()
def paired_decode(sides: list[Side], batch: int, prompt: int, new_tokens: int, reps: int,
                  warmup: int) -> dict[str, list[float]]:
    """Seconds per decode step per side and repetition, the sides alternating at every step.

    Each repetition starts a `DecodeSession` per side on the same prompts (not timed), then times
    ``new_tokens - 1`` decode steps of every side in turn (order reversed at every step), so a slow
    spell of the machine falls on both sides; a side's figure is the median of its steps.
    """
    if new_tokens < 2:
        raise ValueError(f"decode speed needs new_tokens >= 2 (got {new_tokens}): the first new token comes "
                         "from the prompt's forward, decode steps are the rest")
    ids = _ids(sides[0].runner.model, batch, prompt, seed=1)
    times = {side.name: [] for side in sides}
    collecting = gc.isenabled()
    try:
        for rep in range(warmup + reps):
            sessions = {}
            for side in sides:
                with side.active():
                    sessions[side.name] = DecodeSession(side.runner, ids.to(side.device))
                    sessions[side.name].start()
            gc.collect()
            gc.disable()
            steps = {side.name: [] for side in sides}
            for step in range(new_tokens - 1):
                for side in (sides if (rep + step) % 2 == 0 else sides[::-1]):
                    with side.active():
                        steps[side.name].append(_once(side, lambda s, live=sessions: live[s.name].step()))
            if collecting:
                gc.enable()
            if rep >= warmup:
                for name, values in steps.items():
                    times[name].append(statistics.median(values))
    finally:
        if collecting:
            gc.enable()
    return times


@contextmanager
def long_lived_frozen():
    """For the block, every object alive now is left out of the garbage collector's scans (`gc.freeze`).

    The timing loops collect garbage before each repetition and then time with the collector off, as
    `timeit` does. A full collection scans every tracked object: in a process holding torch,
    transformers and lm-eval that is ~0.2 s of a CPU core, spent between repetitions while no other
    work may run (the timing slot). After one full collection here, the objects that outlive the
    timing (model, libraries) are frozen, and each repetition's collection scans only what the timing
    itself made; what is timed does not change."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def paired_speed(sides: list[Side], batch: int = 1, prompt_len: int = 128, new_tokens: int = 32, reps: int = 6,
                 warmup: int = 2) -> dict:
    """Prefill and decode of every side, interleaved; ``sides[0]`` is the reference.

    Returns ``{side name: {"prefill": summary, "decode": summary}}`` (tokens/s, see
    `moebench.measure.speed.summary`; decode per step), ``"times"``: ``{side name: {"prefill": [s],
    "decode": [s per step]}}`` and ``"ratios"``: ``{side name: {"prefill": ratio_summary, "decode":
    ratio_summary}}`` of the reference's times over each other side's.
    """
    with long_lived_frozen():
        pre = paired_prefill(sides, batch, prompt_len, reps, warmup)
        dec = paired_decode(sides, batch, min(32, prompt_len), new_tokens, reps, min(warmup, 1))
    out = {s.name: {"prefill": summary(pre[s.name], batch * prompt_len), "decode": summary(dec[s.name], batch)}
           for s in sides}
    out["times"] = {s.name: {"prefill": pre[s.name], "decode": dec[s.name]} for s in sides}
    ref = sides[0].name
    out["ratios"] = {s.name: {"prefill": ratio_summary(pre[ref], pre[s.name]),
                              "decode": ratio_summary(dec[ref], dec[s.name])} for s in sides[1:]}
    return out

