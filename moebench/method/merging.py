"""What the expert-merging methods (HC-SMoE, M-SMoE) share: clustering, merge groups, global budgets.

A merge method decides, per MoE layer, groups of experts that become one expert each (as many
groups as the budget keeps experts). `merge_plan` turns groups into a `Plan` of kind ``merge``:
each group merges by usage-frequency-weighted averaging, w_i = f_i / sum_{j in group} f_j (f the
top-k selection counts; uniform where a group was never selected), into its *dominant* expert,
the member the router selects most (ties: lower id).

The router, three ways (the methods' ``router`` parameter):

- ``all`` (default; the authors' code): the router keeps all E rows, unchanged, and every member's
  slot dispatches to its group's merged expert (the plan's ``expert_map``, `moebench.moe.expert_map`):
  a token routed to any member reaches the merged expert with that member's gate, two members' gates
  add up. In memory the experts module holds the merged experts only; saved, the compact form needs
  moebench to load, the duplicated form (E experts, copies) is a plain checkpoint.
- ``dominant`` (ours): one row per group, the dominant's own; the merged layer is an ordinary
  pruned-size layer and a group of one is exactly pruning.
- ``average`` (ours): one row per group, the w-weighted average of the members' rows.

Weights: the authors divide by sum f + 1e-7 (f each expert's share of the layer's selections), which
scales a merged expert by 1 - 1e-7 / s (s its group's share); moebench's weights sum to one. With
group-limited routing (DeepSeek, GLM) groups never cross routing groups and each routing group keeps
the same number of experts.
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


ROUTERS = ("all", "dominant", "average")


def kmeans(points: torch.Tensor, n_clusters: int, generator: torch.Generator, iterations: int = 100,
           tolerance: float = 1e-4) -> list[list[int]]:
    """K-means of ``points [n, d]`` into ``n_clusters`` clusters as HC-SMoE's code runs it; clusters of positions.

    Start (k-means++): the first centre is a uniformly random point; each next one is drawn with probability
    proportional to the squared distance from the nearest centre so far. Step: distances
    D_ij = ||x_i - c_j|| / d, standardised per centre over the points, (D_ij - mean_i D_ij) / (std_i D_ij + 1e-6)
    (unbiased std); each point joins the centre of lowest standardised distance and each centre becomes the
    mean of its points; it stops once no centre coordinate moves by 1e-4 or more (``tolerance``), after at
    most 100 steps (``iterations``). Random draws come from ``generator`` (``torch.randint``, then one
    ``torch.multinomial`` per further centre). Ours: float64; with more centres than distinct points the next
    centre is the lowest unchosen id; a centre that loses all its points stays where it was, and a cluster
    still empty at the end takes the point farthest from its centre among clusters of two or more (the
    authors' code averages an empty set there). Clusters come sorted by their lowest position.
    """
    x = points.double()
    n = x.shape[0]
    if n_clusters >= n:
        return [[i] for i in range(n)]
    chosen = [int(torch.randint(0, n, (1,), generator=generator))]
    for _ in range(1, n_clusters):
        d2 = torch.cdist(x, x[chosen]).min(dim=1).values ** 2
        if float(d2.sum()) > 0:
            chosen.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
        else:
            chosen.append(next(i for i in range(n) if i not in chosen))
    centres = x[chosen].clone()
    for _ in range(iterations):
        d = torch.cdist(x, centres) / x.shape[1]
        labels = torch.argmin((d - d.mean(0)) / (d.std(0) + 1e-6), dim=1)
        moved = torch.stack([x[labels == j].mean(0) if bool((labels == j).any()) else centres[j]
                             for j in range(n_clusters)])
        converged = float((moved - centres).abs().max()) < tolerance
        centres = moved
        if converged:
            break
    clusters = [[i for i in range(n) if int(labels[i]) == j] for j in range(n_clusters)]
    for j in [j for j, c in enumerate(clusters) if not c]:
        far = max(((float(torch.dist(x[i], centres[k])), i, k) for k, c in enumerate(clusters) if len(c) > 1
                   for i in c))
        clusters[far[2]].remove(far[1])
        clusters[j] = [far[1]]
    return [sorted(c) for c in sorted(clusters, key=min)]


def group(layer: MoELayer, experts: list[int], freq: torch.Tensor, router: str = "dominant",
          align: bool = False) -> dict:
    """One merge group: frequency weights, the dominant expert, router coefficients, alignment.

    ``router``: ``all`` and ``dominant`` carry no router coefficients (all rows kept, or the dominant's
    row), ``average`` the weights. ``align``: each member's intermediate units are first permuted to match
    the dominant expert's (weight matching, `moebench.moe.merge.match_units`; the authors' MC-SMoE aligns
    to the group's lowest id instead, in its Switch/T5 path only).
    """
    experts = sorted(experts)
    f = freq[experts]
    weights = (f / f.sum()) if f.sum() > 0 else torch.full((len(experts),), 1.0 / len(experts), dtype=torch.float64)
    into = experts[int(torch.argmax(f))]  # argmax returns the first maximum: the lowest id
    out = {"into": into, "experts": experts, "weights": weights.tolist()}
    if router == "average":
        out["router"] = out["weights"]
    elif router not in ROUTERS:
        raise ValueError(f"router={router!r}: choose all (every router row kept), dominant (the dominant expert's "
                         "row) or average")
    if align and len(experts) > 1:
        out["perms"] = [None if e == into else match_units(layer, into, e) for e in experts]
    return out


def merge_plan(ctx: PlanContext, groups: dict[int, list[dict]], router: str = "dominant") -> Plan:
    """A ``merge`` plan from per-layer groups: ``keep`` holds the dominant experts; ``router="all"`` records each
    layer's expert map (`moebench.moe.expert_map`)."""
    from moebench.moe.expert_map import map_from_groups

    keep = {index: sorted(g["into"] for g in layer_groups) for index, layer_groups in groups.items()}
    maps = None
    if router == "all":
        maps = {index: map_from_groups(layer_groups, ctx.view.layer(index).num_experts)
                for index, layer_groups in groups.items()}
    return Plan("", "merge", keep=keep, merge=groups, expert_map=maps, extra={"n_experts": {
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
