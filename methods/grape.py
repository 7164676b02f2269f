"""GRAPE: global redundancy-aware expert budgets across layers (Zhang et al., arXiv 2604.06542)."""

from __future__ import annotations

import math

import torch

from moebench.method.registry import get_method, planner


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
         bounds={"gamma": (0.0, 1.0)}, global_budget=True,
         paper="Zhang et al. 2026, 'GRAPE: global redundancy-aware expert pruning', arXiv 2604.06542")
def grape(ctx, *, score: str = "reap", gamma: float = 0.1):
    """Per-layer budgets under the uniform total, chosen greedily by cross-layer redundancy.

    S_l = linear CKA between expert outputs on cached tokens; redundancy R_l = sum of the
    off-diagonal entries of S_l over the experts still kept. Until the global number of removed
    experts (the uniform budget's total) is met: take the most redundant layer not frozen, remove
    the lower-scored expert (by ``score``) of its most similar pair. Entropy guard: if a removal
    would make the normalised entropy of the per-layer kept counts fall below 1 - ``gamma``, the
    layer is frozen; when all are frozen they are all unfrozen (restart). The kept set of each
    layer is then the best experts by ``score`` under that layer's budget. No official code is
    public: this follows the public summary, with gamma = 0.1 as a reimplementation uses.
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
        open_layers = [i for i in layers if len(alive[i]) - step[i] >= max(layers[i].top_k, step[i])
                       and step[i] <= to_remove]
        if not open_layers:
            raise ValueError(f"grape: cannot remove {to_remove} more experts without going below top_k")
        candidates = [i for i in open_layers if i not in frozen] or open_layers
        frozen = frozen if len(candidates) < len(open_layers) or not frozen else set()
        layer_id = max(candidates, key=lambda i: (_redundancy(sims[i], alive[i]), -i))
        counts = [len(alive[i]) - (step[i] if i == layer_id else 0) for i in layers]
        if _entropy(counts) < 1 - gamma and len(frozen) < len(open_layers) - 1:
            frozen.add(layer_id)
            continue
        for _ in range(step[layer_id]):
            _drop_most_similar(alive[layer_id], sims[layer_id], scores[layer_id])
        to_remove -= step[layer_id]
    return {i: ctx.keep_best(layers[i], scores[i], len(alive[i])) for i in layers}


def _redundancy(sim: torch.Tensor, alive: list[int]) -> float:
    sub = sim[alive][:, alive]
    return (sub.sum() - sub.diagonal().sum()).item()


def _drop_most_similar(alive: list[int], sim: torch.Tensor, scores: torch.Tensor) -> None:
    sub = sim[alive][:, alive].clone()
    sub.fill_diagonal_(-math.inf)
    a, b = divmod(int(sub.argmax()), len(alive))
    ea, eb = alive[a], alive[b]
    alive.remove(ea if scores[ea] <= scores[eb] else eb)
