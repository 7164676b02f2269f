"""NAEE layer-wise expert enumeration (Lu et al. 2024), by recombining cached expert outputs."""

from __future__ import annotations

import itertools

import torch

from moebench.method import planner
from moebench.moe_ops import layer_mask


def reconstruction_loss(layer, stats: dict, kept, reference: torch.Tensor | None = None) -> float:
    """L(C) = sum over calibration sequences s of ||F(X_s) - F(X_s; C)||_F on the cached token subsample.

    F(x) = sum over the top-k experts e of g_e(x) E_e(x), the routed output of the layer (shared
    experts cancel). F(x; C) re-runs the model's own router on x with the logits of experts outside C
    at -inf, then combines the cached outputs ``all_outputs [n, E, H]``; no expert is re-run.
    """
    x, outputs, seq = stats["inputs"], stats["all_outputs"], stats["outputs_sample_ids"]
    if reference is None:
        reference = _combine(layer, x, outputs, None)
    pruned = _combine(layer, x, outputs, kept)
    diff = (reference - pruned).pow(2).sum(-1)
    per_seq = torch.zeros(int(seq.max()) + 1, dtype=torch.float64).index_add_(0, seq, diff.double())
    return per_seq.sqrt().sum().item()


def _combine(layer, x, outputs, kept):
    with torch.no_grad():
        if kept is None:
            routing = layer.route(x.to(layer.router.weight.dtype))
        else:
            with layer_mask(layer, kept):
                routing = layer.route(x.to(layer.router.weight.dtype))
    picked = outputs.gather(1, routing.indices.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]).cpu())
    return (picked * routing.weights.float().cpu().unsqueeze(-1)).sum(1)


def _valid(layer, subset) -> bool:
    if layer.groups is None:
        return True
    n_group = layer.groups[0]
    size = layer.num_experts // n_group
    counts = [sum(1 for e in subset if e // size == g) for g in range(n_group)]
    return len(set(counts)) == 1


def exhaustive(layer, stats, r: int) -> list[int]:
    """The r-subset with the smallest loss over all valid subsets (ties: first in lexicographic order)."""
    best, best_loss = None, float("inf")
    reference = _combine(layer, stats["inputs"], stats["all_outputs"], None)
    for subset in itertools.combinations(range(layer.num_experts), r):
        if _valid(layer, subset):
            loss = reconstruction_loss(layer, stats, subset, reference)
            if loss < best_loss:
                best, best_loss = list(subset), loss
    return best


def naive_exhaustive(layer, stats, r: int) -> list[int]:
    """Reference enumeration without caches: re-run the real block under a routing mask per subset.

    Same loss as `reconstruction_loss`, but every expert is recomputed for every subset, as a direct
    implementation of the paper would. Used to check and to benchmark the recombination.
    """
    x, seq = stats["inputs"].to(layer.router.weight.dtype).unsqueeze(0), stats["outputs_sample_ids"]

    def run():
        out = layer.block(x)
        return (out[0] if isinstance(out, tuple) else out).squeeze(0).float()

    best, best_loss = None, float("inf")
    with torch.no_grad():
        reference = run()
        for subset in itertools.combinations(range(layer.num_experts), r):
            if not _valid(layer, subset):
                continue
            with layer_mask(layer, subset):
                diff = (reference - run()).pow(2).sum(-1).double()
            per_seq = torch.zeros(int(seq.max()) + 1, dtype=torch.float64).index_add_(0, seq, diff.cpu())
            loss = per_seq.sqrt().sum().item()
            if loss < best_loss:
                best, best_loss = list(subset), loss
    return best


def beam(layer, stats, r: int, width: int) -> list[int]:
    """Backward elimination with a beam of ``width`` sets, then 1-for-1 swaps until none helps."""
    n = layer.num_experts
    reference = _combine(layer, stats["inputs"], stats["all_outputs"], None)
    frontier = [tuple(range(n))]
    for size in range(n - 1, r - 1, -1):
        scored = {}
        for subset in frontier:
            for drop in subset:
                child = tuple(e for e in subset if e != drop)
                if child not in scored and (size > r or _valid(layer, child)) and len(child) >= layer.top_k:
                    scored[child] = reconstruction_loss(layer, stats, child, reference)
        frontier = sorted(scored, key=lambda c: (scored[c], c))[:width]
    best = list(frontier[0])
    return _swap_refine(layer, stats, best, reference)


def _swap_refine(layer, stats, kept: list[int], reference) -> list[int]:
    loss = reconstruction_loss(layer, stats, kept, reference)
    improved = True
    while improved:
        improved = False
        for out_e, in_e in itertools.product(list(kept), [e for e in range(layer.num_experts) if e not in kept]):
            cand = sorted([e for e in kept if e != out_e] + [in_e])
            if _valid(layer, cand):
                cand_loss = reconstruction_loss(layer, stats, cand, reference)
                if cand_loss < loss - 1e-12:
                    kept, loss, improved = cand, cand_loss, True
                    break
    return kept


@planner("naee", needs=("outputs",), bounds={"beam_width": (1, 1024), "max_exhaustive": (1, 64)},
         paper="Lu et al. 2024, 'Not All Experts are Equal: Efficient Expert Pruning and Skipping for "
               "Mixture-of-Experts Large Language Models', ACL (Sec. 3.2, layer-wise enumeration)")
def naee(ctx, *, search: str = "auto", beam_width: int = 8, max_exhaustive: int = 16):
    """Keep, per layer, the set C of r experts minimising sum over batches of ||F(x) - F(x; C)||_F.

    ``search``: ``exhaustive`` (all C(E, r) sets, the paper's method), ``beam`` (backward
    elimination keeping the ``beam_width`` best sets, then 1-for-1 swaps), or ``auto`` (exhaustive
    when E <= ``max_exhaustive``, else beam). Losses come from cached expert outputs on a token
    subsample (recombination), so no expert is re-run per subset.
    """
    if search not in ("auto", "exhaustive", "beam"):
        raise ValueError(f"naee: search={search!r} must be auto, exhaustive or beam")
    keep = {}
    for layer in ctx.view.layers:
        r, stats = ctx.budget[layer.index], ctx.stats[layer.index]
        if r >= layer.num_experts:
            keep[layer.index] = list(range(layer.num_experts))
        elif search == "exhaustive" or (search == "auto" and layer.num_experts <= max_exhaustive):
            keep[layer.index] = exhaustive(layer, stats, r)
        else:
            keep[layer.index] = beam(layer, stats, r, beam_width)
    return keep
