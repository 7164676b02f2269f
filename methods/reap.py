"""REAP: router-weighted expert activation pruning (Lasby et al., ICLR 2026)."""

from __future__ import annotations

from typing import Literal

from moebench.method.registry import score_method


@score_method("reap", needs=("norms",),
              paper="Lasby et al. 2026, 'REAP: Router-weighted Expert Activation Pruning', ICLR 2026",
              source="the paper's formula with the model's gate: ours (gate=reference: the authors' code)")
def reap(ctx, layer, *, gate: Literal["model", "reference"] = "model"):
    """s_e = (1 / |X_e|) * sum over x in X_e of g_e(x) * ||E_e(x)||_2, X_e = tokens routed to e.

    ``gate=model`` (default; the paper's reading, moebench's choice): g_e(x) E_e(x) is expert e's
    contribution to the layer output as the model computes it, with the gate the model really
    applies (its own softmax / sigmoid, renormalisation, bias and scaling); where the gate scales
    the expert's input (Llama4), the contribution is ||f_e(g_e x)||.
    ``gate=reference``: the authors' released code (CerebrasResearch/reap, src/reap/observer.py,
    ``MoETransformerObserver._hook_factory``): g = softmax over all router logits, renormalised
    over the token's top-k only when ``config.norm_topk_prob``, on every family, times the norm of
    the expert on the ungated input. The two agree on Qwen3-MoE (softmax, norm_topk_prob) and
    differ on Mixtral (renormalised gates, no norm_topk_prob key), GPT-OSS, DeepSeek-V3 / GLM4
    (sigmoid gates, scaling) and Llama4. X_e is the model's routing in both (the authors take the
    top-k of raw logits, the same set except where a correction bias or group limit changes the
    choice). Experts never routed to score 0.
    """
    s = ctx.stats[layer.index]
    total = s["gate_norm_sum"] if gate == "model" else s["ref_gate_norm_sum"]
    return total / s["norm_count"].clamp_min(1)
