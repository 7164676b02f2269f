"""Input-aware expert selection at inference (method kind ``select``): signatures and selectors.

A select method's plan stores, in ``Plan.selector``, everything the selector needs (JSON data only).
At inference:

1. `context_signature(model, tokens)`: one forward of the request *context* ``[T]`` (never a
   continuation or answer choice) through the unmasked model; the signature is every MoE layer's
   router logits ``{layer: [T, E]}`` (what the routers see of the input).
2. `selector_from_plan(plan).select(signature)` -> ``{layer: kept expert ids}``.
3. The scored forward runs with that selection as a per-sample routing mask
   (`moebench.moe.ops.sample_mask`), so each input of a batch gets its own kept sets.

The signature pass runs each context alone (batch 1, no padding): a selection never depends on
the batch it is scored in. A selection that keeps every expert adds no mask (ratio 0 = unpruned).
"""

from __future__ import annotations

import torch

from moebench.method.plan import Plan
from moebench.method.registry import select_top
from moebench.moe.view import MoEView


class _SignatureDone(Exception):
    """Raised by the last needed router's hook: the rest of the forward is not run."""


@torch.no_grad()
def context_signature(model, tokens, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Router logits ``{layer: [T, E]}`` (float32, CPU) of one context ``tokens [T]``, unmasked.

    ``layers``: the MoE layers the selector reads (None: all). The forward stops at the last of them,
    so nothing after its router runs (for a key of the first MoE layer, no expert at all).
    """
    view = MoEView(model)
    wanted = set(view.indices if layers is None else layers)
    last = max(wanted)
    seen: dict[int, torch.Tensor] = {}

    def hook_for(layer):
        def hook(module, args, output):
            logits = output[1] if layer.family.router_output == "dense_scores" else output[0]
            seen[layer.index] = logits.detach().reshape(-1, logits.shape[-1]).float().cpu()
            if layer.index == last:
                raise _SignatureDone
        return hook

    handles = [layer.router.register_forward_hook(hook_for(layer)) for layer in view.layers
               if layer.index <= last]
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=device).view(1, -1), use_cache=False)
    except _SignatureDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {i: seen[i] for i in sorted(wanted)}


def topk_marker(logits: torch.Tensor, ids: torch.Tensor, n_experts: int, r: float) -> torch.Tensor:
    """PreMoE v1's per-layer vector: mean over tokens of the kept top-k raw logits, 0 elsewhere ``[E]``.

    ``logits``/``ids`` ``[T, k]`` are each token's top-k router logits and their expert ids; a logit
    is kept where softmax over the top-k >= ``r`` (``r < 0``: all k kept).
    """
    logits = logits.double()
    keep = torch.softmax(logits, dim=-1) >= r if r >= 0 else torch.ones_like(logits, dtype=torch.bool)
    marks = torch.zeros(logits.shape[0], n_experts, dtype=torch.float64)
    marks.scatter_(1, ids, torch.where(keep, logits, torch.zeros_like(logits)))
    return marks.mean(0)


class RetrievalSelector:
    """PreMoE TAER: nearest stored task pattern (L2 on the markers of the key layers, concatenated).

    ``extra``: ``layers`` (MoE layer indices), ``key_layers`` (those forming the retrieval key;
    absent: all), ``k``, ``r``, ``patterns``: list of ``{"task", "vector" [len(key_layers)*E],
    "scores" {layer: [E]}, "keep" {layer: ids}}``.
    """

    def __init__(self, extra: dict):
        self.layers = [int(i) for i in extra.get("key_layers", extra["layers"])]
        self.needed_layers = self.layers  # the signature pass stops after the last key layer's router
        self.k, self.r = int(extra["k"]), float(extra["r"])
        self.patterns = extra["patterns"]
        self.vectors = torch.tensor([p["vector"] for p in self.patterns], dtype=torch.float64)

    def vector(self, signature: dict[int, torch.Tensor]) -> torch.Tensor:
        """The query's index vector ``[L*E]`` from its router logits (as for a stored task)."""
        parts = []
        for index in self.layers:
            logits = signature[index]
            top = logits.topk(min(self.k, logits.shape[-1]), dim=-1)
            parts.append(topk_marker(top.values, top.indices, logits.shape[-1], self.r))
        return torch.cat(parts)

    def nearest(self, signature: dict[int, torch.Tensor]) -> int:
        """Index of the stored pattern nearest to the query."""
        return int(torch.cdist(self.vector(signature)[None], self.vectors)[0].argmin())

    def select(self, signature: dict[int, torch.Tensor]) -> dict[int, list[int]]:
        """The kept sets of the retrieved pattern."""
        keep = self.patterns[self.nearest(signature)]["keep"]
        return {int(i): list(ids) for i, ids in keep.items()}


class PredictiveSelector:
    """PREP: nearest expansion point, first-order importance prediction, adaptive per-layer budget.

    ``extra``: ``layers``, ``top_k`` {layer: k}, ``budget`` {layer: n}, ``groups`` {layer: [g, tg] or
    None}, ``centers`` [P, L*E] (mean router logits per layer, concatenated), ``importance``
    [P, L, E] at each expansion point, ``jacobian`` [L, E, E] (d importance / d mean logits).
    """

    def __init__(self, extra: dict):
        self.layers = [int(i) for i in extra["layers"]]
        self.needed_layers = self.layers
        self.top_k = {int(i): int(k) for i, k in extra["top_k"].items()}
        self.budget = {int(i): int(n) for i, n in extra["budget"].items()}
        self.groups = {int(i): (tuple(g) if g else None) for i, g in extra["groups"].items()}
        self.centers = torch.tensor(extra["centers"], dtype=torch.float64)
        self.importance = torch.tensor(extra["importance"], dtype=torch.float64)
        self.jacobian = torch.tensor(extra["jacobian"], dtype=torch.float64)

    def predict(self, signature: dict[int, torch.Tensor]) -> torch.Tensor:
        """Predicted importance ``[L, E]``: I_j + J (z - c_j) at the nearest expansion point j."""
        z = torch.stack([signature[i].double().mean(0) for i in self.layers])  # [L, E]
        j = int(torch.cdist(z.reshape(1, -1), self.centers)[0].argmin())
        delta = z - self.centers[j].view(z.shape)
        return self.importance[j] + torch.einsum("lef,lf->le", self.jacobian, delta)

    def select(self, signature: dict[int, torch.Tensor]) -> dict[int, list[int]]:
        """Keep the most important experts under an adaptive per-layer budget (see `allocate`)."""
        scores = self.predict(signature)
        counts = allocate(scores, [self.top_k[i] for i in self.layers], [self.budget[i] for i in self.layers],
                          [self.groups[i] for i in self.layers])
        return {i: select_top(scores[n], counts[n], self.groups[i]) for n, i in enumerate(self.layers)}


def allocate(scores: torch.Tensor, top_k: list[int], budget: list[int], groups: list) -> list[int]:
    """Per-layer kept counts: >= top_k each, summing to sum(budget) (the requested ratio per input).

    Each layer's importance ``scores [L, E]`` is normalised to shares of its layer (clamped at 0);
    beyond top_k per layer, the remaining slots go to the largest shares over all layers. Layers
    with group-limited routing keep their uniform budget (equal drops per group).
    """
    n_layers, n_exp = scores.shape
    counts = [b if g else k for k, b, g in zip(top_k, budget, groups, strict=True)]
    left = sum(budget) - sum(counts)
    share = scores.clamp_min(0)
    share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
    order = torch.sort(share, dim=1, descending=True, stable=True).values  # largest share first
    candidates = []
    for layer in range(n_layers):
        if groups[layer]:
            continue
        for rank in range(counts[layer], n_exp):
            candidates.append((-float(order[layer, rank]), layer, rank))
    for _, layer, _ in sorted(candidates)[:max(left, 0)]:
        counts[layer] += 1
    return counts


SELECTORS = {"retrieval": RetrievalSelector, "predictive": PredictiveSelector}


def selector_from_plan(plan: Plan):
    """The selector object a select plan describes (``plan.selector["name"]`` names its class)."""
    kind = (plan.selector or {}).get("name")
    if kind not in SELECTORS:
        raise ValueError(f"plan of {plan.method} has no selector (selector.name={kind!r}); "
                         f"known: {', '.join(SELECTORS)}")
    return SELECTORS[kind](plan.selector)


def full_selection(view: MoEView) -> dict[int, list[int]]:
    """Every expert of every MoE layer (the unpruned model)."""
    return {layer.index: list(range(layer.num_experts)) for layer in view.layers}
