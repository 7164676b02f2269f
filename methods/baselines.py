"""The identity method `none` and the classic expert-importance baselines: random, frequency,
soft activation, EAN.

Each baseline is a score per expert of a layer; the registry keeps the highest-scoring experts.
Statistics are those of `moebench.calib.stats` (float64 sums over the calibration tokens).
"""

from __future__ import annotations

import torch

from moebench.method.registry import planner, score_method


@planner("none", takes_budget=False, paper="the unpruned model (the reference of every comparison)")
def none(ctx):
    """Keeps every expert: the unpruned model, which every recovery and speedup is measured against.

    Takes no budget (no ratio or keep) and no calibration; with ``skip=naee`` it is the unpruned
    model with dynamic skipping.
    """
    return {}


@score_method("random", paper="Lu et al. 2024, 'Not All Experts are Equal', ACL (random baseline)")
def random_scores(ctx, layer, *, seed: int = 0):
    """Uniformly random scores from a generator seeded by (seed, layer index): a seeded random kept set."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer.index)
    return torch.rand(layer.num_experts, generator=g)


@score_method("frequency", needs=("routing",),
              paper="Lu et al. 2024, 'Not All Experts are Equal', ACL (frequency baseline)")
def frequency(ctx, layer):
    """s_e = number of calibration tokens whose top-k contains expert e."""
    return ctx.stats[layer.index]["counts"]


@score_method("soft_activation", needs=("routing",),
              paper="Muzio et al. 2024, 'SEER-MoE', soft counting")
def soft_activation(ctx, layer):
    """s_e = sum over all calibration tokens of softmax(router logits)_e (SEER-MoE soft counting).

    The full softmax over all experts is used (not only the top-k gates), as SEER-MoE's soft
    counting accumulates the router's probability mass per expert.
    """
    return ctx.stats[layer.index]["softmax_sum"]


@score_method("ean", needs=("norms",),
              paper="Jaiswal et al. 2025, 'Finding Fantastic Experts in MoEs' (expert activation norm), "
                    "as the EAN baseline of Lasby et al., REAP, ICLR 2026")
def ean(ctx, layer):
    """s_e = sum over tokens routed to e of ||E_e(x)||_2 (expert activation norm, unnormalised)."""
    return ctx.stats[layer.index]["norm_sum"]
