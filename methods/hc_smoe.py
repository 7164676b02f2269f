"""HC-SMoE: retraining-free expert merging by hierarchical clustering of expert outputs (Chen et al.)."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.merging import agglomerate, frequency, group, merge_plan, routing_groups
from moebench.method.registry import planner


@planner("hc_smoe", kind="merge", needs=("routing", "expert_means"),
         paper="Chen et al. 2024, 'Retraining-Free Merging of Sparse MoE via Hierarchical Clustering', "
               "arXiv 2410.08589 (ICML 2025); code: wazenmai/HC-SMoE",
         source="ours: the router keeps one row per cluster, its most-selected expert's (router=dominant) or the "
              "frequency-weighted average (router=average); the authors keep all E rows pointing at shared weights")
def hc_smoe(ctx, *, linkage: Literal["average", "single", "complete"] = "average",
            router: Literal["dominant", "average"] = "dominant"):
    """Cluster each layer's experts by their average outputs, merge each cluster by frequency.

    Features: o_e = mean over all calibration tokens x of E_e(x) (every expert on every token, not
    only routed ones, so the grouping does not depend on the router), ``[E, H]`` per layer.
    Distance: ||o_i - o_j||_2. Hierarchical agglomerative clustering into the budget's number of
    clusters with ``linkage`` (the authors' scripts use average linkage: d(A, B) = mean over
    a in A, b in B of ||o_a - o_b||). Each cluster C becomes one expert
    W_C = sum_{i in C} f_i W_i / sum_{i in C} f_i, f_i the top-k selection counts (the authors'
    frequency-weighted merge, no permutation alignment). The merged expert takes the slot of the
    cluster's most-selected expert; its router row is that expert's row (``router=dominant``, ours)
    or the f-weighted average of the cluster's rows (``router=average``); see
    `moebench.method.merging` for why the router is reduced. Per-layer budgets (uniform counts);
    with group-limited routing each routing group is clustered on its own.
    """
    groups = {}
    for layer in ctx.view.layers:
        s = ctx.stats[layer.index]
        means = s["output_sum"] / s["output_tokens"].clamp_min(1)
        freq = frequency(ctx, layer)
        per_group = ctx.budget[layer.index] // len(routing_groups(layer))
        groups[layer.index] = []
        for ids in routing_groups(layer):
            clusters = agglomerate(torch.cdist(means[ids], means[ids]), per_group, linkage)
            groups[layer.index] += [group(layer, [ids[i] for i in c], freq, router) for c in clusters]
    return merge_plan(ctx, groups)
