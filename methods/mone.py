"""MoNE: Mixture of Novices and Experts (Zhang et al., ICLR 2026, arXiv 2507.00390)."""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.plan import Plan
from moebench.method.registry import planner, select_top
from moebench.moe.novice import novice_refusal
from moebench.moe.view import MoEError

FREQUENCIES = ("gate", "count")
VARIANCES = ("authors", "unbiased")


def mone_scores(s: dict, variance: str = "authors", frequency: str = "gate") -> torch.Tensor:
    """Redundancy scores ``[E]`` of one layer from its ``routing`` and ``routed_moments`` statistics
    (higher = keep): s_e = phi_freq(e) * phi_var(e) (see `mone`)."""
    tokens = s["tokens"].double().clamp_min(1)
    freq = (s["gate_sum"] if frequency == "gate" else s["counts"]).double() / tokens
    if variance == "authors":
        var = s["sequence_fluctuation"].double()
    else:  # the unbiased per-unit variance over the routed tokens (0 below two tokens)
        n = s["routed_count"].double().unsqueeze(-1)
        centred = s["routed_sq_sum"].double() - s["routed_sum"].double() ** 2 / n.clamp_min(1)
        var = torch.where(n > 1, centred / (n - 1).clamp_min(1), torch.zeros_like(centred))
    return freq * var.clamp_min(0).sqrt().norm(dim=-1)


def novice_vectors(s: dict, experts: list[int]) -> torch.Tensor:
    """``[n, H]`` float32: each expert's mean output over the tokens routed to it (0 if never routed)."""
    mean = s["routed_sum"].double() / s["routed_count"].double().clamp_min(1).unsqueeze(-1)
    return mean[experts].float()


@planner("mone", needs=("routing", "routed_moments"),
         paper="Zhang et al. 2026, 'MoNE: Replacing Redundant Experts with Lightweight Novices for Structured "
               "Pruning of MoE', ICLR 2026 (arXiv 2507.00390)",
         source="as the authors' code (zxgx/mode-pd, expert_prune_by_mone, --mone_ranking_metric fusion "
                "--expert_ranking_scope layer, their published runs): score, per-layer budget, novice means, "
                "variance estimator; the model's own gate on every family, ties broken by lower id and no MTP or "
                "Llama4 path: ours (variance=unbiased: the paper's formula)",
         sequential="a checkpoint with novice experts is written from the model in memory (its router keeps "
                    "every row beside the cut experts and the constants)",
         moebench_only="its replaced experts are constant vectors added by moebench's experts kernel, which no "
                       "other engine's checkpoint format holds")
def mone(ctx, *, variance: Literal["authors", "unbiased"] = "authors",
         frequency: Literal["gate", "count"] = "gate", novice: Literal["mean", "zero"] = "mean"):
    """Replace each layer's most redundant experts by constant "novices"; the router is unchanged.

    Per MoE layer, over the calibration tokens, with g_e(x) the gate the model applies (0 when x
    is not routed to e) and y_e(x) expert e's output on x (ungated):

        phi_freq(e) = mean over all tokens of g_e(x)          (frequency=count: share of tokens routed to e)
        phi_var(e)  = sqrt(sum over hidden units h of var_h(e)), var over the tokens routed to e
        s_e = phi_freq(e) * phi_var(e);   the budget's n_keep highest s_e are kept, the rest replaced
        v_e = mean of y_e(x) over the tokens routed to e                       (novice=zero: v_e = 0)

    A token routed to a replaced expert e then receives g_e(x) * v_e (no expert runs); routing is
    exactly the unpruned model's. ``variance=authors`` (default): var_h as their code estimates it,
    a running update once per calibration sequence (their batches hold one 4096-token sequence) that
    leaves each expert's first sequence out of the variance and divides by n + T, not n + T - 1
    (`moebench.calib.stats`, ``sequence_fluctuation``); ``variance=unbiased``: the paper's formula,
    sum of squared deviations over (count - 1). Their code multiplies w phi_var and (1 - w) phi_freq
    (``--fusion_io_weight`` w = 0.5): a constant factor per model, dropped here. Their threshold keeps
    experts scoring strictly above the (n_keep + 1)-th score, so exact ties there keep fewer than
    n_keep; moebench keeps n_keep, ties to the lower id. Their gate hook reads the gates the model
    returns (DeepSeek-V2/V3, OLMoE without renormalisation): moebench's gate statistics are the
    gates each family applies. Group-limited routers need no equal drops per group (the router is
    not cut). ``novice=zero`` is their ``--zero_out_novice`` ablation.
    """
    refusal = novice_refusal(ctx.view)
    if refusal:
        raise MoEError(refusal)
    keep, novices = {}, {}
    for layer in ctx.view.layers:
        s = ctx.stats[layer.index]
        kept = select_top(mone_scores(s, variance, frequency), ctx.budget[layer.index])
        replaced = [e for e in range(layer.num_experts) if e not in set(kept)]
        keep[layer.index] = kept
        if replaced:
            vectors = novice_vectors(s, replaced)
            novices[layer.index] = {"experts": replaced,
                                    "vectors": vectors if novice == "mean" else torch.zeros_like(vectors)}
    return Plan("mone", "prune", keep=keep, novice=novices)
