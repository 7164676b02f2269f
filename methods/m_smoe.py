"""M-SMoE: the merging stage of MC-SMoE, 'Merge, Then Compress' (Li et al., ICLR 2024)."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.merging import dominant_experts, frequency, global_counts, group, merge_plan, routing_groups
from moebench.method.registry import planner


def logit_similarity(gram: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the experts' router-logit columns over all calibration tokens,
    from their Gram matrix G = sum_t l_t l_t^T: G_ij / sqrt(G_ii G_jj)."""
    norm = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / norm[:, None] / norm[None, :]


ALIGN_MAX_UNITS = 4096  # expert width up to which weight matching is done (about 3 s per assignment at 4096)
ALIGN_SECONDS_AT_1024 = 0.041  # measured: scipy's linear_sum_assignment on a random dense 1024 x 1024 cost, 1 core
# (0.011 s at 512, 0.247 s at 2048); costs from real weights are not easier, so the estimate is a lower bound


def check_alignment_cost(layer, view) -> None:
    """Refuse weight matching where one assignment of I x I units would take too long, with the estimate."""
    from moebench.moe.merge import intermediate_size

    units = intermediate_size(layer)
    if units <= ALIGN_MAX_UNITS:
        return
    per_member = ALIGN_SECONDS_AT_1024 * (units / 1024) ** 3
    members = sum(max(0, layer_.num_experts - layer_.top_k) for layer_ in view.layers)
    total = per_member * members / 60
    raise ValueError(f"m_smoe align=true: weight matching solves a {units} x {units} assignment per merged expert, "
                     f"O(I^3): at least ~{per_member / 60:.0f} min each, up to {members} of them (~{total:.0f} min); "
                     f"moebench aligns up to {ALIGN_MAX_UNITS} units per expert. Use align=false (the authors' "
                     "Mixtral script does not align)")


@planner("m_smoe", kind="merge", needs=("routing", "router_gram"), global_budget=True,
         paper="Li et al. 2024, 'Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing "
               "Policy', ICLR 2024 (MC-SMoE's merging stage M-SMoE); code: UNITES-Lab/MC-SMoE",
         source="the authors' Mixtral script: no weight matching by default, all E router rows kept, each member's "
              "slot dispatching to its group's merged expert (router=all); align=true: the paper's weight matching "
              "on gate, up and down together, to the dominant (the authors' Switch code: to the lowest id; refused "
              "beyond 4096 units per expert); ours: weights summing to one (no 1e-7), router=dominant|average (one "
              "row per group), each layer keeps >= top_k",
         reads_weights=lambda params: params["align"])  # the weight matching reads the experts' weights
def m_smoe(ctx, *, scope: Literal["global", "layer"] = "global", align: bool = False,
           router: Literal["all", "dominant", "average"] = "all"):
    """Dominant experts by routing frequency; the others join the most similar dominant by router logits.

    Frequencies f_e = top-k selection counts. ``scope=global`` (the paper's adaptive layer-wise
    ratio): each layer's counts are normalised, f_e / sum_j f_j, and the experts with the highest
    normalised frequency across all layers are dominant, the total being the uniform budget's (every
    layer keeps at least top_k; with group-limited routing equally many per routing group).
    ``scope=layer``: the budget's count of most-used experts in every layer. Each non-dominant
    expert e joins the dominant d maximising cos(l_e, l_d), l_e the column of router logits of
    expert e over all calibration tokens (within e's routing group). ``align`` (the paper's weight
    matching; off by default, as the authors' Mixtral script merges without it): before averaging,
    each member's intermediate units are permuted to match the dominant's (linear assignment
    maximising sum_j <[gate_j, up_j, down_j]_d, [gate, up, down]_{e, perm(j)}>); it costs O(I^3) per
    member (I the expert width) and is refused, with the estimate, beyond `ALIGN_MAX_UNITS`. Merge:
    W_d <- sum_{e in group} f_e P_e(W_e) / sum f_e. ``router=all`` (the authors' code): the router keeps all its
    rows and every member's slot dispatches to the merged expert (`moebench.moe.expert_map`); ours: one row
    per group, the dominant's (``router=dominant``) or the f-weighted average (``router=average``).
    """
    if align:
        check_alignment_cost(ctx.view.layers[0], ctx.view)
    freqs = {layer.index: frequency(ctx, layer) for layer in ctx.view.layers}
    if scope == "global":
        counts = global_counts(ctx, {i: f / f.sum().clamp_min(1) for i, f in freqs.items()})
    else:
        counts = dict(ctx.budget)
    groups = {}
    for layer in ctx.view.layers:
        freq, sim = freqs[layer.index], logit_similarity(ctx.stats[layer.index]["logit_gram"])
        dominant = dominant_experts(layer, freq, counts[layer.index])
        members = {d: [d] for d in dominant}
        for ids in routing_groups(layer):
            cores = [d for d in dominant if d in ids]
            for e in ids:
                if e not in members:
                    members[cores[int(torch.argmax(sim[e, cores]))]].append(e)
        groups[layer.index] = [group(layer, m, freq, router, align) for _, m in sorted(members.items())]
    return merge_plan(ctx, groups, router)
