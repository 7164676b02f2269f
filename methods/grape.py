"""GRAPE: global, redundancy-aware expert budgets across layers (Zhang et al., arXiv 2604.06542)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from moebench.method.registry import get_method, planner

PAPER = ("Zhang et al. 2026, 'Does a Global Perspective Help Prune Sparse MoEs Elegantly?' (GRAPE), "
         "arXiv 2604.06542; no public code: similarity, pruning and gamma are moebench's choices")


def cka_similarity(outputs: torch.Tensor) -> torch.Tensor:
    """Linear CKA between every pair of experts' outputs ``[n, E, H]`` -> ``[E, E]`` in [0, 1]."""
    y = outputs.double() - outputs.double().mean(0, keepdim=True)
    gram = torch.einsum("nei,mei->enm", y, y)  # [E, n, n]
    flat = gram.reshape(gram.shape[0], -1)
    hsic = flat @ flat.T
    norm = hsic.diagonal().clamp_min(1e-30).sqrt()
    return hsic / norm[:, None] / norm[None, :]


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    h = -sum(c / total * math.log(c / total) for c in counts if c)
    return h / math.log(len(counts)) if len(counts) > 1 else 1.0


@planner("grape", needs=("outputs",), extra_needs=lambda params: get_method(params["score"]).needs,
         bounds={"gamma": (0.0, 1.0)}, global_budget=True, paper=PAPER,
         source="reconstruction (no code): CKA, pruning instead of merging, gamma = 0.1: ours; "
                "summed redundancy: the public summary's")
def grape(ctx, *, score: str = "reap", gamma: float = 0.1, redundancy: Literal["sum", "mean"] = "sum"):
    """Per-layer budgets under the uniform total, chosen greedily by cross-layer redundancy.

    S_l = linear CKA between expert outputs on cached tokens; layer redundancy R_l = the sum
    (``redundancy=sum``, the public summary's definition, the default) or the mean (``mean``) of the
    off-diagonal entries of S_l over the experts still kept. The sum grows with the square of the
    experts left: each removal lowers its layer's redundancy, a diminishing return that spreads
    removals over the redundant layers. The mean, which compares layers of different sizes at equal
    footing, does not fall as a layer loses experts, so one layer keeps winning until the entropy
    guard freezes it; on the testbed (testbed-8e, testbed_mc_quick, REAP within layers) that left a
    layer at top_k and cost accuracy: 26.1% / 24.0% at 25% / 50% with the mean against 50.3% /
    25.3% with the sum. So the sum, justified by this, stays the default. Until the global number of removed experts
    (the uniform budget's total) is met: take the most redundant layer not frozen and remove the
    lower-scored expert (by ``score``) of its most similar pair (with routing groups: one such
    removal inside every group, so drops stay equal per group). The experts left are the kept
    set: the pair rule decides both the budget and the experts. Entropy guard: if a removal would
    make the normalised entropy of the per-layer kept counts fall below 1 - ``gamma``, the layer
    is frozen; when all are frozen they are all unfrozen (restart).

    No official code is public; the public summary merges the most similar pair. moebench's
    choices, labelled as such: CKA for the similarity, removing (pruning) the lower-scored
    expert of the pair instead of merging it, gamma = 0.1 (a reimplementation's value; the paper's
    is unspecified).
    """
    scorer = get_method(score)
    if not scorer.scoring or scorer.name == "grape":
        raise ValueError(f"grape: score={score!r} must be a score method (e.g. reap, frequency, ean)")
    layers = {layer.index: layer for layer in ctx.view.layers}
    scores = {i: scorer.fn(ctx, layer) for i, layer in layers.items()}
    alive = {i: list(range(layer.num_experts)) for i, layer in layers.items()}
    sims = {i: cka_similarity(ctx.stats[i]["all_outputs"]) for i in layers}
    step = {i: (layer.groups[0] if layer.groups else 1) for i, layer in layers.items()}
    to_remove = sum(len(a) for a in alive.values()) - sum(ctx.budget.values())
    frozen: set[int] = set()
    while to_remove > 0:
        open_layers = [i for i in layers if _can_remove(layers[i], len(alive[i]) - step[i]) and step[i] <= to_remove]
        if not open_layers:
            raise ValueError(f"grape: cannot remove {to_remove} more experts without going below top_k")
        candidates = [i for i in open_layers if i not in frozen] or open_layers
        frozen = frozen if len(candidates) < len(open_layers) or not frozen else set()
        layer_id = max(candidates, key=lambda i: (_redundancy(sims[i], alive[i], redundancy), -i))
        counts = [len(alive[i]) - (step[i] if i == layer_id else 0) for i in layers]
        if _entropy(counts) < 1 - gamma and len(frozen) < len(open_layers) - 1:
            frozen.add(layer_id)
            continue
        size = layers[layer_id].num_experts // step[layer_id]
        for g in range(step[layer_id]):  # one removal per routing group (the whole layer without groups)
            members = [e for e in alive[layer_id] if e // size == g]
            alive[layer_id].remove(_most_similar_loser(members, sims[layer_id], scores[layer_id]))
        to_remove -= step[layer_id]
    return {i: sorted(alive[i]) for i in layers}


def _can_remove(layer, left: int) -> bool:
    """Whether ``left`` experts are a valid count for ``layer`` (>= top_k; per group enough for its routing)."""
    if left < layer.top_k:
        return False
    if not layer.groups:
        return True
    n_group, topk_group = layer.groups
    per_group = left // n_group
    return per_group >= max(layer.family.group_score_top, 1) and topk_group * per_group >= layer.top_k


def _redundancy(sim: torch.Tensor, alive: list[int], how: str) -> float:
    sub = sim[alive][:, alive]
    total = (sub.sum() - sub.diagonal().sum()).item()
    pairs = len(alive) * (len(alive) - 1)
    return total if how == "sum" else total / max(pairs, 1)


def _most_similar_loser(members: list[int], sim: torch.Tensor, scores: torch.Tensor) -> int:
    """Of the most similar pair among ``members``, the expert with the lower score (ties: the first)."""
    sub = sim[members][:, members].clone()
    sub.fill_diagonal_(-math.inf)
    a, b = divmod(int(sub.argmax()), len(members))
    ea, eb = members[a], members[b]
    return ea if scores[ea] <= scores[eb] else eb
