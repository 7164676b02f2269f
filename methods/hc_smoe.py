"""HC-SMoE: retraining-free expert merging by clustering expert outputs (Chen et al.)."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.merging import agglomerate, frequency, group, kmeans, merge_plan, routing_groups
from moebench.method.registry import planner


@planner("hc_smoe", kind="merge", needs=("routing", "expert_means"),
         paper="Chen et al. 2024, 'Retraining-Free Merging of Sparse MoE via Hierarchical Clustering', "
               "arXiv 2410.08589 (ICML 2025); code: wazenmai/HC-SMoE",
         source="the authors' code: expert-output features, k-means++ as their published runs (their scripts' "
              "cluster='hirarchical' fell through to k-means), frequency-weighted merge, all E router rows kept "
              "(router=all); cluster=hierarchical: the paper's clustering; ours: the seed per layer (seed=0), "
              "weights summing to one (no 1e-7), router=dominant|average (one row per group)")
def hc_smoe(ctx, *, cluster: Literal["kmeans", "hierarchical"] = "kmeans",
            linkage: Literal["average", "single", "complete"] = "average",
            router: Literal["all", "dominant", "average"] = "all", seed: int = 0):
    """Cluster each layer's experts by their average outputs, merge each cluster by frequency.

    Features: o_e = mean over all calibration tokens x of E_e(x) (every expert on every token, not
    only routed ones, so the grouping does not depend on the router), ``[E, H]`` per layer.
    ``cluster=kmeans`` (default): the authors' k-means (k-means++ start, per-centre standardised
    distances; `moebench.method.merging.kmeans`), its random start drawn from a generator seeded by
    (``seed``, layer index), so a plan is reproducible. Their published runs used it: the scripts pass
    ``--cluster="hirarchical"``, which their code does not recognise, and fall through to k-means.
    ``cluster=hierarchical`` (the paper's method): agglomerative clustering of ||o_i - o_j||_2 with
    ``linkage`` (average: d(A, B) = mean over a in A, b in B of ||o_a - o_b||). Each cluster C becomes
    one expert W_C = sum_{i in C} f_i W_i / sum_{i in C} f_i, f_i the top-k selection counts (the
    authors' frequency-weighted merge, no permutation alignment). ``router=all`` (the authors' code):
    every router row kept, each member's slot dispatching to the merged expert; ``dominant`` / ``average``
    (ours): one router row per cluster, its most-selected expert's or the f-weighted average
    (`moebench.method.merging`). Per-layer budgets (uniform counts); with group-limited routing each
    routing group is clustered on its own.
    """
    groups = {}
    for layer in ctx.view.layers:
        s = ctx.stats[layer.index]
        means = s["output_sum"] / s["output_tokens"].clamp_min(1)
        freq = frequency(ctx, layer)
        per_group = ctx.budget[layer.index] // len(routing_groups(layer))
        generator = torch.Generator().manual_seed(seed * 100_003 + layer.index)
        groups[layer.index] = []
        for ids in routing_groups(layer):
            if cluster == "kmeans":
                clusters = kmeans(means[ids], per_group, generator)
            else:
                clusters = agglomerate(torch.cdist(means[ids], means[ids]), per_group, linkage)
            groups[layer.index] += [group(layer, [ids[i] for i in c], freq, router) for c in clusters]
    return merge_plan(ctx, groups, router)
