"""Dynamic expert skipping (Lu et al. 2024, Sec. 3.3), computed for real in moebench's kernel.

For each token with gate values w_1 >= w_2 >= ... >= w_k (those the model computes), the expert in
slot j >= 2 is skipped when w_j < beta_l * w_1; beta_l is the median of w_2 / w_1 over the
calibration tokens of layer l (every token by default, as the authors' code does; the median of an
even count is the mean of the two middle values, as numpy's, which their code uses). The weights of
the experts kept are rescaled to the token's original total gate mass: for Mixtral (weights
summing to one) this is the paper's renormalisation; for families that do not renormalise it
keeps their scale. Skipped pairs are removed before the kernel's
expert loop, so they cost no compute.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from moebench.moe.kernels import SKIP_ATTR, restore_kernel, switch_to_kernel
from moebench.moe.view import MoEError, MoEView


class SkipRule:
    """The per-layer rule ``w_j < beta * w_1 -> skip``, with counters of the pairs seen and skipped."""

    def __init__(self, beta: float):
        self.beta = float(beta)
        self.pairs = 0
        self.tokens = 0
        self._skipped = 0  # a device tensor once counting starts: read back only when asked (no sync per call)

    @property
    def skipped(self) -> int:
        """Pairs skipped so far."""
        return int(self._skipped)

    def __call__(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rescaled weights [T,k], active slots [T,k] bool)`` for gate values ``weights [T,k]``."""
        w = weights.float()
        top = w.max(dim=-1, keepdim=True).values
        active = (w >= self.beta * top) | (w == top)
        kept = torch.where(active, w, torch.zeros_like(w))
        scale = w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-30)
        self.pairs += active.numel()
        self.tokens += active.shape[0]
        self._skipped = self._skipped + (~active).sum()
        return (kept * scale).to(weights.dtype), active


def median(values: torch.Tensor) -> float:
    """The median of ``values``, numpy's way: the mean of the two middle values for an even count
    (``torch.median`` returns the lower one), computed in float64."""
    flat = values.reshape(-1).double().sort().values
    if flat.numel() == 0:
        raise ValueError("median of no values")
    n = flat.numel()
    return float((flat[(n - 1) // 2] + flat[n // 2]) / 2)


def naee_betas(stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
    """beta_l = median over calibration tokens of w_2 / w_1, per MoE layer (needs the routing group)."""
    betas = {}
    for index, s in stats.items():
        if "ratio_samples" not in s:
            raise MoEError(f"layer {index}: no top-2 gate ratios (the model routes to one expert); "
                           "dynamic skipping needs top_k >= 2")
        betas[index] = median(s["ratio_samples"])
    return betas


def enable_skipping(model: nn.Module, betas: dict[int, float]) -> None:
    """Attach a skip rule to each MoE layer and switch the model to moebench's kernel (`disable_skipping`
    gives the previous kernel back)."""
    view = MoEView(model)
    if not view.family.experts_slot:
        raise MoEError(f"{view.family.name} experts run outside transformers' experts slot; "
                       "dynamic skipping is not available for this family")
    for layer in view.layers:
        setattr(layer.experts, SKIP_ATTR, SkipRule(betas.get(layer.index, 0.0)))
    switch_to_kernel(model)


def disable_skipping(model: nn.Module) -> None:
    """Remove the skip rules and give the model back the experts kernel it had before skipping (unless
    offloading still needs moebench's)."""
    for layer in MoEView(model).layers:
        if hasattr(layer.experts, SKIP_ATTR):
            delattr(layer.experts, SKIP_ATTR)
    restore_kernel(model)


@contextmanager
def skipping_paused(model: nn.Module):
    """Inside the block the skip rules are detached (the kernel stays); afterwards they are back, counters intact."""
    rules = {}
    for layer in MoEView(model).layers:
        if hasattr(layer.experts, SKIP_ATTR):
            rules[layer.experts] = getattr(layer.experts, SKIP_ATTR)
            delattr(layer.experts, SKIP_ATTR)
    try:
        yield
    finally:
        for experts, rule in rules.items():
            setattr(experts, SKIP_ATTR, rule)


def skip_report(model: nn.Module) -> dict:
    """Realised skipping since enabling: ``skip_rate`` = skipped / routed (token, expert) pairs;
    ``slot_skip_rate`` = skipped / pairs below the top slot (for top-2: the share of second experts)."""
    per_layer, pairs, skipped, tokens = {}, 0, 0, 0
    for layer in MoEView(model).layers:
        rule = getattr(layer.experts, SKIP_ATTR, None)
        if rule is None:
            continue
        per_layer[str(layer.index)] = {"beta": rule.beta, "skip_rate": rule.skipped / max(rule.pairs, 1)}
        pairs, skipped, tokens = pairs + rule.pairs, skipped + rule.skipped, tokens + rule.tokens
    return {"skip_rate": skipped / max(pairs, 1), "slot_skip_rate": skipped / max(pairs - tokens, 1),
            "pairs": pairs, "skipped": skipped, "layers": per_layer}
