"""Sub-MoE: expert merging in a shared subspace, as the REAP authors' code runs it (``--merge-method submoe``)."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from moebench.method.merging import frequency, group, merge_plan, minimum_keep, routing_groups
from moebench.method.registry import planner
from moebench.moe.subspace import full_ranks


def kmeans_cost(points: np.ndarray, k: int, rng: np.random.Generator) -> tuple[float, list[list[int]]]:
    """SciPy's k-means (k-means++ start, 10 steps) of ``points [n, d]`` into ``k`` clusters: the cost, sum over
    points of ||x - c_label(x)||_2, and the clusters (sorted). Ours: a cluster left empty takes the point
    farthest from its centre among clusters of two or more (that point's cost becomes 0)."""
    from scipy.cluster.vq import kmeans2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "One of the clusters is empty": repaired below
        centres, labels = kmeans2(points, k, minit="++", rng=rng)
    dist = np.linalg.norm(points - centres[labels], axis=1)
    clusters = [[i for i in range(len(points)) if labels[i] == j] for j in range(k)]
    for j in [j for j, c in enumerate(clusters) if not c]:
        far = max((dist[i], i, c) for c in range(k) if len(clusters[c]) > 1 for i in clusters[c])
        clusters[far[2]].remove(far[1])
        clusters[j], dist[far[1]] = [far[1]], 0.0
    return float(dist.sum()), sorted(sorted(c) for c in clusters)


def _tables(ctx, layer, seed: int):
    """Per number of merges m in each routing group: (cost summed over the routing groups, clusters)."""
    s = ctx.stats[layer.index]
    means = (s["output_sum"] / s["output_tokens"].clamp_min(1)).double()
    points = (means / means.norm(dim=1, keepdim=True).clamp_min(1e-300)).numpy()  # unit sphere: L2 ~ cosine
    ids_per_group = routing_groups(layer)
    memo = {}

    def at(m: int):
        if m not in memo:
            cost, clusters = 0.0, []
            for g, ids in enumerate(ids_per_group):
                k = len(ids) - m
                c, part = kmeans_cost(points[ids], k, np.random.default_rng([seed, layer.index, g, k]))
                cost, clusters = cost + c, clusters + [[ids[i] for i in p] for p in part]
            memo[m] = (cost, clusters)
        return memo[m]
    return at


@planner("sub_moe", kind="merge", needs=("routing", "expert_means"), global_budget=True,
         bounds={"layers": (1, None), "rank": (0, None)},
         paper="Li et al. 2025, 'Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace Expert Merging', "
               "arXiv 2506.23266 (AAAI 2026); code: CerebrasResearch/reap --merge-method submoe",
         source="the REAP authors' code (experiments/submoe_v2.sh; submoe.sh's similarity fails their own check): "
              "unit-normalised mean expert outputs, SciPy k-means++ per cluster count, merges shared greedily by "
              "k-means cost over pairs of layers (layers=2), frequency weights, the joint SVD with Vh reshaped "
              "(split=reshape), untruncated (rank=0), all E router rows kept; split=columns: the paper's V blocks; "
              "ours: the seeded k-means, empty clusters repaired, each layer keeps >= top_k, the budget's counts, "
              "the SVD in float64, biases averaged, rank > 0 truncation")
def sub_moe(ctx, *, layers: int = 2, split: Literal["reshape", "columns"] = "reshape", rank: int = 0, seed: int = 0):
    """Cluster experts by k-means on their mean outputs; merge each cluster by a joint SVD of its weights.

    Features: o_e / ||o_e||, o_e the mean output of expert e over all calibration tokens (every expert on
    every token). For m merges a layer is clustered by k-means into E - m clusters (SciPy ``kmeans2``, k-means++
    start, 10 steps; one run per m, seeded by (``seed``, layer, routing group, k)) with cost
    C(m) = sum_e ||o_e/||o_e|| - c(e)||_2. ``layers`` consecutive MoE layers share their budget's total: one
    merge at a time goes to the layer whose next count has the lowest C (C(m+1), not the increase; ties: the
    lower layer), a layer keeping at least top_k (`minimum_keep`); ``layers=1``: the budget's count per layer.
    With group-limited routing each routing group is clustered on its own and a step merges once in each.
    Merge of a cluster (f the top-k selection counts, w_i = f_i / sum f, uniform when unused): for gate, up
    and down, [W_d, W_others...] = U diag(S) Vh, W' = U diag(S) sum_i w_i V_i (`moebench.moe.subspace`; d
    the most-selected member, whose slot holds the result). ``split=reshape`` (the authors' code): V_i is Vh
    read row-major as [n, K, in]; ``split=columns`` (the paper): member i's own columns of Vh, which untruncated
    is exactly sum_i w_i W_i. ``rank`` > 0 keeps the top-``rank`` singular values (ours; 0: all, as the
    authors). Stored dense; the router keeps all E rows, each slot dispatching to its cluster's expert.
    """
    index = [layer.index for layer in sorted(ctx.view.layers, key=lambda layer_: layer_.index)]
    groups, ranks = {}, {}
    for start in range(0, len(index), layers):
        window = [ctx.view.layer(i) for i in index[start:start + layers]]
        tables = {layer.index: _tables(ctx, layer, seed) for layer in window}
        step = {layer.index: len(routing_groups(layer)) for layer in window}
        most = {layer.index: (layer.num_experts - minimum_keep(layer)) // step[layer.index] for layer in window}
        done = dict.fromkeys(tables, 0)
        left = sum(layer.num_experts - ctx.budget[layer.index] for layer in window)
        while left > 0:
            options = [(tables[i](done[i] + 1)[0], i) for i in tables if done[i] < most[i] and step[i] <= left]
            if not options:
                raise ValueError(f"sub_moe: MoE layers {sorted(tables)} cannot merge {left} more experts and keep "
                                 "top_k each; use a smaller ratio")
            i = min(options)[1]
            done[i], left = done[i] + 1, left - step[i]
        for layer in window:
            clusters = tables[layer.index](done[layer.index])[1] if done[layer.index] else \
                [[e] for e in range(layer.num_experts)]
            freq = frequency(ctx, layer)
            groups[layer.index] = [{**group(layer, c, freq, "all"), "svd": {"split": split, "rank": rank}}
                                   for c in clusters]
            ranks[layer.index] = [{name: min(r, rank or r) for name, r in full_ranks(layer, len(g["experts"])).items()}
                                  for g in groups[layer.index]]
    plan = merge_plan(ctx, groups, "all")
    plan.extra["svd_rank"] = ranks  # per group, the rank of its gate, up and down merge (stored dense)
    return plan
