"""What the expert-merging methods (HC-SMoE, M-SMoE) share: clustering, merge groups, global budgets.

A merge method decides, per MoE layer, groups of experts that become one expert each (as many
groups as the budget keeps experts). `merge_plan` turns groups into a `Plan` of kind ``merge``:
each group merges by usage-frequency-weighted averaging, w_i = f_i / sum_{j in group} f_j (f the
top-k selection counts; uniform where a group was never selected), into its *dominant* expert,
the member the router selects most (ties: lower id). That expert's slot survives, so the merged
layer has the budget's expert count and an ordinary router; its router row is the dominant's own
(``router="dominant"``) or the w-weighted average of the members' rows (``router="average"``).

Choice of ours, labelled as such: the authors' code keeps all E router rows and lets every member's
slot point at the shared merged weights (so no memory is freed unless tensors are tied, and plain
transformers cannot express it). moebench reduces the router to one row per group, which makes a
merged model an ordinary checkpoint with the pruned expert count, and makes a group of one exactly
pruning. With group-limited routing (DeepSeek, GLM) groups never cross routing groups and each
routing group keeps the same number of experts.
"""

from __future__ import annotations

import math

import torch

from moebench.method.plan import Plan
from moebench.method.registry import PlanContext, select_top
from moebench.moe.merge import match_units
from moebench.moe.view import MoELayer

LINKAGES = ("average", "single", "complete")


def frequency(ctx: PlanContext, layer: MoELayer) -> torch.Tensor:
    """``[E]`` float64: how many calibration tokens selected each expert (top-k counts)."""
    return ctx.stats[layer.index]["counts"].double()


def routing_groups(layer: MoELayer) -> list[list[int]]:
    """The experts of each routing group (one group of all experts without group-limited routing)."""
    n_group = layer.groups[0] if layer.groups else 1
    size = layer.num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def agglomerate(distance: torch.Tensor, n_clusters: int, linkage: str = "average") -> list[list[int]]:
    """Hierarchical (agglomerative) clustering of ``distance [n, n]`` into ``n_clusters`` clusters.

    Repeatedly joins the two closest clusters; cluster distances follow ``linkage``: average (mean
    pairwise distance), single (minimum) or complete (maximum), updated by the Lance-Williams rule.
    Ties join the pair with the lowest indices. Returns clusters of positions, each sorted.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}: choose one of {', '.join(LINKAGES)}")
    d = distance.double().clone()
    n = d.shape[0]
    d.fill_diagonal_(math.inf)
    members = {i: [i] for i in range(n)}
    while len(members) > n_clusters:
        a, b = divmod(int(torch.argmin(d)), n)
        a, b = min(a, b), max(a, b)
        na, nb = len(members[a]), len(members[b])
        if linkage == "average":
            joined = (na * d[a] + nb * d[b]) / (na + nb)
        else:
            joined = torch.minimum(d[a], d[b]) if linkage == "single" else torch.maximum(d[a], d[b])
        d[a], d[:, a] = joined, joined
        d[a, a] = math.inf
        d[b], d[:, b] = math.inf, math.inf
        members[a] += members.pop(b)
    return [sorted(c) for c in sorted(members.values(), key=min)]


def group(layer: MoELayer, experts: list[int], freq: torch.Tensor, router: str = "dominant",
          align: bool = False) -> dict:
    """One merge group: frequency weights, the dominant expert, router coefficients, alignment.

    ``align``: each member's intermediate units are first permuted to match the dominant expert's
    (weight matching, `moebench.moe.merge.match_units`).
    """
    experts = sorted(experts)
    f = freq[experts]
    weights = (f / f.sum()) if f.sum() > 0 else torch.full((len(experts),), 1.0 / len(experts), dtype=torch.float64)
    into = experts[int(torch.argmax(f))]  # argmax returns the first maximum: the lowest id
    out = {"into": into, "experts": experts, "weights": weights.tolist()}
    if router == "average":
        out["router"] = out["weights"]
    elif router != "dominant":
        raise ValueError(f"router={router!r}: choose dominant (the dominant expert's row) or average")
    if align and len(experts) > 1:
        out["perms"] = [None if e == into else match_units(layer, into, e) for e in experts]
    return out


def merge_plan(ctx: PlanContext, groups: dict[int, list[dict]]) -> Plan:
    """A ``merge`` plan from per-layer groups: ``keep`` holds the dominant experts."""
    keep = {index: sorted(g["into"] for g in layer_groups) for index, layer_groups in groups.items()}
    return Plan("", "merge", keep=keep, merge=groups, extra={"n_experts": {
        layer.index: layer.num_experts for layer in ctx.view.layers}})


def minimum_keep(layer: MoELayer) -> int:
    """The fewest experts a layer can keep: ``top_k``, and with group-limited routing enough in each group."""
    if not layer.groups:
        return layer.top_k
    n_group, topk_group = layer.groups
    per = max(-(-layer.top_k // topk_group), layer.family.group_score_top, 1)
    return max(per * n_group, -(-layer.top_k // n_group) * n_group)


def global_counts(ctx: PlanContext, shares: dict[int, torch.Tensor]) -> dict[int, int]:
    """Experts kept per layer under the budget's total, chosen across layers by ``shares`` (higher first).

    Each layer starts at `minimum_keep`; then, while the total allows, the layer whose next expert
    (with group-limited routing: next expert of every routing group, their mean share) has the
    highest share keeps one more (ties: the lower layer index).
    """
    layers = {layer.index: layer for layer in ctx.view.layers}
    counts = {i: minimum_keep(layer) for i, layer in layers.items()}
    total = sum(ctx.budget.values())
    if sum(counts.values()) > total:
        raise ValueError(f"the budget keeps {total} experts in all, fewer than the {sum(counts.values())} "
                         "the routers need (top_k per layer); use a smaller ratio")
    ordered = {i: [shares[i][g].sort(descending=True).values for g in routing_groups(layer)]
               for i, layer in layers.items()}
    while True:
        room = total - sum(counts.values())
        options = [(float(torch.stack([col[counts[i] // len(cols)] for col in cols]).mean()), -i)
                   for i, cols in ordered.items()
                   if counts[i] + len(cols) <= layers[i].num_experts and len(cols) <= room]
        if not options:
            return counts
        i = -max(options)[1]
        counts[i] += len(ordered[i])


def dominant_experts(layer: MoELayer, freq: torch.Tensor, n_keep: int) -> list[int]:
    """The ``n_keep`` most-selected experts (the same number in every routing group)."""
    return select_top(freq, n_keep, layer.groups)
