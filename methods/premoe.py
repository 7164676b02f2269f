"""PreMoE's router-logit importance scores: v1 TCESS and v3 PEU (Pei et al., 2025/2026)."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.registry import score_method

PAPER = ("Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval' "
         "(arXiv 2505.17639 v1, TCESS) and 'PreMoE: Proactive Inference for Efficient Mixture-of-Experts' "
         "(v3, COLM 2026, PEU)")


def _top_logits(ctx, layer, k: int):
    s = ctx.stats[layer.index]
    k = min(k if k > 0 else layer.top_k, s["topk_logits"].shape[1])
    return s["topk_logits"][:, :k].double(), s["topk_ids"][:, :k]


def tcess_scores(logits, ids, n_experts: int, r: float) -> torch.Tensor:
    """TCESS_e = (1/N) sum_t z_{t,e} * 1[e in topK(z_t) and softmax(topK(z_t))_e >= r]; r < 0: no filter."""
    keep = torch.softmax(logits, dim=-1) >= r if r >= 0 else torch.ones_like(logits, dtype=torch.bool)
    marks = torch.zeros(logits.shape[0], n_experts, dtype=torch.float64)
    marks.scatter_(1, ids, torch.where(keep, logits, torch.zeros_like(logits)))
    return marks.mean(0)


@score_method("premoe", needs=("logits",), paper=PAPER, bounds={"r": (-1.0, 1.0), "confidence": (0.0, 1.0)})
def premoe(ctx, layer, *, version: Literal["v1", "v3"] = "v3", k: int = 0, r: float = -1.0,
           confidence: float = 0.5):
    """Task-conditioned expert importance from router logits on the calibration (task) tokens.

    v1 (TCESS, Probabilistic Expert Pruning): per token take the top-K router logits z (K = ``k``,
    default the model's top_k), softmax over them, keep the experts whose probability is >= ``r``
    (``r < 0`` keeps all K, as the authors' released code does by default), and average the kept raw
    logits over tokens: TCESS_e = (1/N) sum_t z_{t,e} 1[selected].

    v3 (PEU, Predicted Expert Utility): high-confidence filtering plus a logit transformation.
    Only the abstract and summaries of v3 are public to us; we implement: p = softmax over the
    top-K logits (the transformation: positive, shift-invariant), a per-layer threshold
    r_l = ``confidence`` x mean over tokens of the top-1 probability of layer l, and
    PEU_e = (1/N) sum_t p_{t,e} 1[p_{t,e} >= r_l].
    """
    logits, ids = _top_logits(ctx, layer, k)
    if version == "v1":
        return tcess_scores(logits, ids, layer.num_experts, r)
    p = torch.softmax(logits, dim=-1)
    r_l = confidence * p[:, 0].mean()
    marks = torch.zeros(p.shape[0], layer.num_experts, dtype=torch.float64)
    marks.scatter_(1, ids, torch.where(p >= r_l, p, torch.zeros_like(p)))
    return marks.mean(0)
