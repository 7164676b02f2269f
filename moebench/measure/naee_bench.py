"""NAEE by recombination vs naive re-forward enumeration (`moebench bench-naee`).

Both search the same subsets with the same loss on the same calibration tokens, after one untimed
warm-up of each; `compare_naee` checks that they keep the same experts and returns the measured
times. The ratio grows with expert size: the naive search runs the experts once per subset, the
recombination only re-runs the router and reads per-token Gram matrices.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from moebench.method.pipeline import PlanRequest, plan_from_stats, statistics
from moebench.method.registry import resolve_budget
from moebench.moe.view import MoEView


def compare_naee(model, tokenizer, request: PlanRequest, ratio: float) -> dict:
    """Time both exhaustive enumerations layer by layer; returns times, kept sets and a summary."""
    from moebench.methods.naee import naive_exhaustive

    torch.manual_seed(0)
    view = MoEView(model)
    if max(view.experts_per_layer.values()) > 16:
        raise ValueError("bench-naee compares exhaustive enumerations: use a model with <= 16 experts per layer")
    request = replace(request, method="naee", ratio=ratio)
    t0 = time.perf_counter()
    stats = statistics(model, tokenizer, request, ["outputs"], progress=True)
    collect_s = time.perf_counter() - t0
    budget = resolve_budget(view, ratio=ratio)
    first = view.layers[0]  # warm-up of both searches (kernels, allocator), not timed
    plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=ratio)
    naive_exhaustive(first, stats[first.index], budget[first.index])
    t0 = time.perf_counter()
    plan = plan_from_stats(view, "naee", {"search": "exhaustive"}, budget, stats, ratio=ratio)
    recombine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {layer.index: naive_exhaustive(layer, stats[layer.index], budget[layer.index]) for layer in view.layers}
    naive_s = time.perf_counter() - t0
    return {"layers": len(view.layers), "keep": sorted(set(budget.values())),
            "experts": sorted(set(view.experts_per_layer.values())),
            "tokens": stats[view.indices[0]]["inputs"].shape[0], "collect_s": collect_s,
            "recombine_s": recombine_s, "naive_s": naive_s, "same": naive == plan.keep}
