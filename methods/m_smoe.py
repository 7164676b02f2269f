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


@planner("m_smoe", kind="merge", needs=("routing", "router_gram"), global_budget=True,
         paper="Li et al. 2024, 'Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing "
               "Policy', ICLR 2024 (MC-SMoE's merging stage M-SMoE); code: UNITES-Lab/MC-SMoE",
         source="ours: the router keeps one row per group, the dominant's (router=dominant) or the frequency-weighted "
              "average (router=average); weight matching on gate, up and down together; each layer keeps >= top_k",
         reads_weights=lambda params: params["align"])  # the weight matching reads the experts' weights
def m_smoe(ctx, *, scope: Literal["global", "layer"] = "global", align: bool = True,
           router: Literal["dominant", "average"] = "dominant"):
    """Dominant experts by routing frequency; the others join the most similar dominant by router logits.

    Frequencies f_e = top-k selection counts. ``scope=global`` (the paper's adaptive layer-wise
    ratio): each layer's counts are normalised, f_e / sum_j f_j, and the experts with the highest
    normalised frequency across all layers are dominant, the total being the uniform budget's (every
    layer keeps at least top_k; with group-limited routing equally many per routing group).
    ``scope=layer``: the budget's count of most-used experts in every layer. Each non-dominant
    expert e joins the dominant d maximising cos(l_e, l_d), l_e the column of router logits of
    expert e over all calibration tokens (within e's routing group). ``align`` (the paper's weight
    matching, our default): before averaging, each member's intermediate units are permuted to
    match the dominant's (linear assignment maximising sum_j <[gate_j, up_j, down_j]_d,
    [gate, up, down]_{e, perm(j)}>); the authors' Mixtral script merges without it, and the
    assignment costs O(I^3) per member (I the expert width). Merge: W_d <- sum_{e in group} f_e
    P_e(W_e) / sum f_e. The merged expert keeps the dominant's slot and router row
    (``router=dominant``) or the f-weighted average row (``router=average``, ours).
    """
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
    return merge_plan(ctx, groups)
