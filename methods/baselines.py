"""The identity method `none` and the classic expert-importance baselines: random, frequency,
soft activation, EAN.

Each baseline is a score per expert of a layer; the registry keeps the highest-scoring experts.
Statistics are those of `moebench.calib.stats` (float64 sums over the calibration tokens).
"""

from __future__ import annotations

from typing import Literal

import torch

from moebench.method.registry import planner, score_method


@planner("none", takes_budget=False, paper="the unpruned model (the reference of every comparison)",
         source="-")
def none(ctx):
    """Keeps every expert: the unpruned model, which every recovery and speedup is measured against.

    Takes no budget (no ratio or keep) and no calibration; with ``skip=naee`` it is the unpruned
    model with dynamic skipping.
    """
    return {}


@score_method("random", paper="Lu et al. 2024, 'Not All Experts are Equal', ACL (random baseline)",
              source="the paper's baseline; seeding per layer: ours")
def random_scores(ctx, layer, *, seed: int = 0):
    """Uniformly random scores from a generator seeded by (seed, layer index): a seeded random kept set."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer.index)
    return torch.rand(layer.num_experts, generator=g)


@score_method("frequency", needs=("routing",),
              paper="Lu et al. 2024, 'Not All Experts are Equal', ACL (frequency baseline)",
              source="as the REAP authors' code, counting the model's own top-k")
def frequency(ctx, layer):
    """s_e = number of calibration tokens whose top-k contains expert e.

    The top-k is the model's own choice (with any correction bias or group limit), the experts a
    token really uses; the REAP authors' code counts the top-k of the raw logits, the same set on
    routers without a correction bias or group limit.
    """
    return ctx.stats[layer.index]["counts"]


@score_method("soft_activation", needs=("routing",),
              paper="Muzio et al. 2024, 'SEER-MoE', soft counting",
              source="the paper's soft counting; each family's score function: ours (score=softmax: the paper's)")
def soft_activation(ctx, layer, *, score: Literal["family", "softmax"] = "family"):
    """s_e = sum over all calibration tokens of the router's probability of expert e (SEER-MoE soft counting).

    SEER-MoE accumulates softmax(router logits) on Mixtral, where the softmax is the router's own
    score function. ``score=family`` (default, moebench's generalisation): each family's own score
    function on all logits: softmax, or sigmoid for sigmoid routers (DeepSeek-V3, GLM4, Llama4),
    whose experts are scored independently. ``score=softmax``: softmax over all logits on every
    family (the same on softmax routers).
    """
    s = ctx.stats[layer.index]
    return s["score_sum"] if score == "family" else s["softmax_sum"]


@score_method("ean", needs=("norms",),
              paper="Jaiswal et al. 2025, 'Finding Fantastic Experts in MoEs' (expert activation norm), "
                    "as the EAN baseline of Lasby et al., REAP, ICLR 2026",
              source="as the REAP authors' code (ean_sum); Llama4 gated outputs: ours (output=reference: theirs)")
def ean(ctx, layer, *, output: Literal["model", "reference"] = "model"):
    """s_e = sum over tokens routed to e of ||E_e(x)||_2 (expert activation norm, unnormalised).

    ``output=model`` (default): E_e(x) is the expert's output as the model computes it, f_e(g_e x)
    where the gate scales the input (Llama4). ``output=reference``: the expert on the ungated
    input, f_e(x), as the REAP authors' code computes EAN (src/reap/observer.py, ``ean_sum``); the
    two differ only where the gate scales the input.
    """
    s = ctx.stats[layer.index]
    return s["norm_sum"] if output == "model" else s["ref_norm_sum"]
