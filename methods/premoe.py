"""PreMoE's router-logit importance scores: v1 TCESS (the released code) and our reconstruction of v3 PEU."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.registry import score_method

PAPER = ("Pei et al., 'PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and Retrieval' "
         "(arXiv 2505.17639 v1, TCESS; released code JarvisPei/PreMoe) and 'PreMoE: Proactive Inference for "
         "Efficient Mixture-of-Experts' (v3, COLM 2026, PEU: reconstructed from the abstract)")


def _top_logits(ctx, layer, k: int):
    s = ctx.stats[layer.index]
    k = min(k, s["topk_logits"].shape[1])
    return s["topk_logits"][:, :k].double(), s["topk_ids"][:, :k]


def tcess_scores(logits, ids, n_experts: int, r: float) -> torch.Tensor:
    """TCESS_e = (1/N) sum_t z_{t,e} * 1[e in topK(z_t) and softmax(topK(z_t))_e >= r]; r < 0: no filter."""
    keep = torch.softmax(logits, dim=-1) >= r if r >= 0 else torch.ones_like(logits, dtype=torch.bool)
    marks = torch.zeros(logits.shape[0], n_experts, dtype=torch.float64)
    marks.scatter_(1, ids, torch.where(keep, logits, torch.zeros_like(logits)))
    return marks.mean(0)


@score_method("premoe", needs=("logits",), paper=PAPER, bounds={"k": (0, 16), "r": (-1.0, 1.0),
                                                               "confidence": (0.0, 1.0)},
              source="v1: the released code (default); v3 PEU: our reconstruction from the abstract")
def premoe(ctx, layer, *, version: Literal["v1", "v3"] = "v1", k: int = 0, r: float = -1.0,
           confidence: float = 0.5):
    """Task-conditioned expert importance from router logits on the calibration (task) tokens.

    v1 (TCESS, Probabilistic Expert Pruning; default), as the released code computes it
    (JarvisPei/PreMoe, collect_utils.py, ``collect_moe_gate_logits_r1``'s hook): per token take the
    top-K raw router logits z (K = ``k``; the default 0 means K = 1, as in the released code; any
    K up to 16 is an option of ours), softmax over them, keep those with probability >= ``r``
    (``r < 0`` keeps all K, the released default), and average the kept raw logits over all tokens, 0 elsewhere:
    TCESS_e = (1/N) sum_t z_{t,e} 1[selected]. An expert never selected scores 0, above a
    selected expert whose mean kept logit is negative: so does the released code.

    v3 (PEU, Predicted Expert Utility): a reconstruction of ours. Only the abstract and summaries
    of v3 are public; we implement high-confidence filtering plus a logit transformation as:
    p = softmax over the top-K logits (positive, shift-invariant; K = ``k``, by default the model's
    top_k, since a softmax over one logit is constant), a per-layer threshold
    r_l = ``confidence`` x mean over tokens of the top-1 probability of layer l, and
    PEU_e = (1/N) sum_t p_{t,e} 1[p_{t,e} >= r_l].
    """
    logits, ids = _top_logits(ctx, layer, k or (1 if version == "v1" else layer.top_k))
    if version == "v1":
        return tcess_scores(logits, ids, layer.num_experts, r)
    p = torch.softmax(logits, dim=-1)
    r_l = confidence * p[:, 0].mean()
    marks = torch.zeros(p.shape[0], layer.num_experts, dtype=torch.float64)
    marks.scatter_(1, ids, torch.where(p >= r_l, p, torch.zeros_like(p)))
    return marks.mean(0)
